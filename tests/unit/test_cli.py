from __future__ import annotations

import subprocess
import sys

import pytest

from dmfs import __version__
from dmfs.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dmfs {__version__}"


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "dmfs", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "usage: dmfs" in result.stdout
