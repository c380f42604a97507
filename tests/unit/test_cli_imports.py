"""What a dmfs command's start imports: not the daemon's libraries.

Every command builds the whole parser, so what the command modules import at
their top is paid by every command; ``dmfs diff`` is measured against
``diff -rq`` as a whole command (bench/diff_ops.py), and in the test guest
trio and pyudev alone were ~0.2 s of it.  A fresh interpreter does what
``dmfs diff`` does before and around its comparison, short of touching a
device, and lists the modules it ended up with: a regression guard that needs
no timing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from dmfs.cli.main import COMMAND_NAMES, COMMANDS, build_parser, command_to_run

#: libraries only the daemon (or dmfs --version) needs, with what they cost
#: at a command's start in the test guest (-X importtime, bytecode cached)
NOT_AT_START = {
    "trio": "~0.2 s with its dependencies (attrs, ssl, hashlib)",
    "pyudev": "libudev through ctypes",
    "pyfuse3": "libfuse",
    "grpc": "the gRPC runtime",
    "importlib.metadata": "90 ms (only --version reads package versions)",
    "tomllib": "15 ms (only commands that read a config file)",
    "logging.handlers": "socket and pickle (only the daemon logs to syslog)",
}

DIFF_START = """
import contextlib, io, sys
from dmfs.cli.main import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["--log-level", "debug", "diff", "--help"])
# what run_diff imports before it compares: the comparison, the tree's names,
# and for a thin delta the ioctl driver (its node strategy included)
import dmfs.cli.diff, dmfs.diff, dmfs.diff.lineage, dmfs.fuse.names
print(" ".join(sorted(sys.modules)))
from dmfs.pool import ThinPool, device_node, mountinfo, open_driver, read_delta, thin_device_of
from dmfs.pool.dmioctl import IoctlDriver
from dmfs.pool.dmnodes import UdevNodes
UdevNodes()
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
print(" ".join(sorted(sys.modules)))
"""


def loaded(modules: set[str], names: dict[str, str]) -> dict[str, str]:
    return {name: why for name, why in names.items()
            if name in modules or any(m.startswith(f"{name}.") for m in modules)}


def test_dmfs_diff_and_help_start_without_the_daemons_libraries() -> None:
    result = subprocess.run([sys.executable, "-c", DIFF_START], capture_output=True,
                            text=True, check=True)
    diff_start, everything = (set(line.split()) for line in result.stdout.splitlines())
    assert "dmfs.diff.compare" in diff_start and "dmfs.pool.dmioctl" in everything
    assert not loaded(everything, NOT_AT_START), "imported at the start of dmfs diff"
    # dmfs diff reads no other command family's module, nor what only they need
    others = {f"dmfs.cli.{family}": "another command's family"
              for family in COMMANDS if family != "diff"}
    others |= {"subprocess": "only commands that run a tool (dmfs diff: for a thin delta)",
               "dmfs.pool.thinpool": "only commands that use the pool",
               "dmfs.pool.dm": "the device-mapper API (dmfs diff: for a thin delta)",
               "shutil": "~20 ms with bz2, lzma and zlib; argparse imports it for the "
                         "terminal's width unless told it (dmfs.cli.common.HelpFormatter)",
               "ctypes": "~50 ms after drop_caches in the guest (libffi); only to mount, "
                         "sync or identify a file by its handle"}
    assert not loaded(diff_start, others), "imported by dmfs diff before it compares"


def test_the_registry_names_the_commands_each_family_adds() -> None:
    def added(parser: argparse.ArgumentParser) -> list[str]:
        return [name for action in parser._actions
                if isinstance(action, argparse._SubParsersAction) for name in action.choices]

    assert added(build_parser()) == list(COMMAND_NAMES)
    for names in COMMANDS.values():
        for name in names:
            assert added(build_parser(name)) == list(names)


@pytest.mark.parametrize(("argv", "command"), [
    (["diff", "a", "b"], "diff"),
    (["--log-level", "debug", "status", "pool0.toml"], "status"),
    (["--log-format=text", "pool", "create"], "pool"),
    (["--help"], None), (["--version"], None), (["--log-level", "debug", "-h", "diff"], None),
    (["nosuch"], None), ([], None), (["--log-l", "debug", "diff"], None),
])
def test_the_command_to_run_is_read_before_the_parser_is_built(
        argv: list[str], command: str | None) -> None:
    assert command_to_run(argv) == command


def test_a_mount_helper_call_builds_the_whole_parser(tmp_path: Path) -> None:
    config = tmp_path / "diff"  # a config file named like a command
    config.write_text("")
    assert command_to_run([str(config), "/srv/snapshots"]) is None
    assert command_to_run(["diff", "/srv/snapshots"], "/sbin/mount.fuse.dmfs") is None


def test_help_is_laid_out_for_the_width_shutil_would_say(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import shutil

    from dmfs.cli.common import terminal_columns

    for columns in ("50", "", "zero", "-3"):
        monkeypatch.setenv("COLUMNS", columns)
        assert terminal_columns() == shutil.get_terminal_size().columns
    usage = {}
    for columns in ("50", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        usage[columns] = build_parser("diff").format_usage().splitlines()
    assert len(usage["50"]) > len(usage["200"]) == 1
