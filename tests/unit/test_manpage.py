"""dmfs(8), generated from the parser: valid for groff and man, and complete."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dmfs.cli import build_parser
from dmfs.cli.common import EXIT_STATUS_HELP
from dmfs.cli.manpage import escape, exit_statuses, own_actions, render, subcommands
from dmfs.config import CONFIG_KEYS

PARSER = build_parser()
PAGE = render(PARSER, EXIT_STATUS_HELP, date=datetime.date(2025, 1, 2))

needs_groff = pytest.mark.skipif(shutil.which("groff") is None,
                                 reason="groff is not installed (Debian package groff-base)")


def groff_warnings(page: str) -> tuple[int, str]:
    """groff's exit status and warnings (-ww: all of them) for a man page."""
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page,
                            capture_output=True, text=True, check=False)
    return result.returncode, result.stderr


@needs_groff
def test_groff_finds_nothing_to_warn_about() -> None:
    assert groff_warnings(PAGE) == (0, "")


@needs_groff
def test_the_check_catches_a_broken_page() -> None:
    _, warnings = groff_warnings(PAGE.replace(".SH FILES", ".XX FILES"))
    assert "XX" in warnings


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (man-db)")
def test_man_renders_every_section(tmp_path: Path) -> None:
    page = tmp_path / "dmfs.8"
    page.write_text(PAGE)
    result = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                            check=False, env={**os.environ, "MANWIDTH": "80"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS",
                    "MOUNT HELPER AND FSTAB", "CONFIGURATION", "EXIT STATUS", "FILES",
                    "SEE ALSO"):
        assert f"\n{heading}\n" in text, heading


def test_every_command_has_a_section_with_every_option() -> None:
    commands = list(subcommands(PARSER))
    assert {path for path, _ in commands} >= {("mount",), ("status",), ("tree",), ("check",),
                                             ("pool",), ("pool", "create"),
                                             ("pool", "destroy"), ("config",), ("demo",)}
    sections = PAGE.split("\n.SS ")[1:]
    assert len(sections) == len(commands)
    for (path, parser), section in zip(commands, sections, strict=True):
        assert section.startswith(f"\\fBdmfs {escape(' '.join(path))}\\fR"), path
        for action in own_actions(parser):
            for option in action.option_strings:
                assert f"\\fB{escape(option)}\\fR" in section, (path, option)
            assert action.help is None or "%(" not in section


def test_exit_statuses_and_config_keys_come_from_the_code() -> None:
    statuses = exit_statuses(EXIT_STATUS_HELP)
    assert [status for status, _ in statuses] == ["0", "1", "2", "3", "130"]
    assert statuses[3][1].endswith("the mountpoint); nothing was touched")
    exit_section = PAGE.split(".SH EXIT STATUS\n")[1].split(".SH")[0]
    for status, _ in statuses:
        assert f".TP\n\\fB{status}\\fR\n" in exit_section
    configuration = PAGE.split(".SH CONFIGURATION\n")[1].split(".SH")[0]
    for key in CONFIG_KEYS:
        assert escape(key) in configuration, key


def test_date_and_version_in_the_title_line() -> None:
    assert PAGE.startswith('.TH DMFS 8 "2025-01-02" "dmfs ')
