"""The test guest runner itself: status, output, timeout, failure reports.

These boot the User-Mode Linux guest from the host (a few seconds each); they
are skipped where the user-mode-linux package is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "contrib" / "guest" / "run"

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/linux.uml").exists() or os.geteuid() != 0,
    reason="needs root and the user-mode-linux package (contrib/run-tests installs it)")


def guest(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUNNER), *argv], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=ROOT)


def test_status_output_cwd_and_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    script = (f"echo to-stdout; echo to-stderr >&2; pwd; echo kept > {results}/kept;"
              " touch /usr/thrown-away; exit 7")
    result = guest("--results", str(results), "--", "sh", "-c", script)
    assert result.returncode == 7, result.stderr
    assert result.stdout.splitlines() == ["to-stdout", str(ROOT)]
    assert "to-stderr" in result.stderr
    assert (results / "kept").read_text() == "kept\n"
    assert not Path("/usr/thrown-away").exists()


def test_guest_has_dm_thin_fuse_loop_and_passes_environment() -> None:
    env_probe = "import os; print(os.environ['DMFS_PROBE'])"
    result = subprocess.run(
        [str(RUNNER), "--", "sh", "-c",
         f"dmsetup targets; ls /dev/fuse /dev/loop-control; {sys.executable} -c \"{env_probe}\""],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env=dict(os.environ, DMFS_PROBE="passed through"))
    assert result.returncode == 0, result.stderr
    assert "thin-pool" in result.stdout
    assert "/dev/fuse" in result.stdout
    assert "passed through" in result.stdout


def test_udev_mode_runs_udevd() -> None:
    probe = "test -S /run/udev/control && echo udevd=$DMFS_GUEST_UDEV"
    assert guest("--udev", "--", "sh", "-c", probe).stdout.strip() == "udevd=1"
    result = guest("--no-udev", "--", "sh", "-c", "test -e /run/udev/control; echo $?")
    assert result.stdout.strip() == "1"


def test_hanging_guest_times_out_with_124() -> None:
    result = guest("--timeout", "8", "--", "sleep", "600")
    assert result.returncode == 124
    assert "timed out after 8 s" in result.stderr


def test_guest_that_dies_reports_no_status() -> None:
    result = guest("--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert result.returncode == 125
    assert "without reporting an exit status" in result.stderr


def test_missing_dm_thin_fails_the_guest_tier() -> None:
    # Unload dm-thin, then run the smoke test the way contrib/run-tests does.
    result = guest("--", "sh", "-c",
                   "modprobe -r dm_thin_pool && DMFS_REQUIRE_GUEST=1 "
                   f"{sys.executable} -m pytest -p no:cacheprovider -m guest "
                   "tests/guest/test_stack_smoke.py", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dm-thin target is not loaded" in result.stdout
