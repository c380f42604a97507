"""The ``dmfs`` parser, with every command family's sub-commands, and the entry point."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dmfs.cli import mount_helper
from dmfs.cli.common import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    HelpFormatter,
    OperationFailed,
    UsageError,
    common_options,
    complete_path,
    log,
    setup_logging,
)
from dmfs.cli.preflight import EnvironmentProblem
from dmfs.cli.version_info import VersionAction
from dmfs.config import ConfigError
from dmfs.pool import PoolAdminError

#: Every command family, in the order ``dmfs --help`` lists their commands: its
#: module under dmfs.cli and the commands its ``add_parser`` adds (a unit test holds
#: the two to each other).
COMMANDS: dict[str, tuple[str, ...]] = {
    "mount": ("mount",),
    "inspect": ("status", "tree", "check"),
    "diff": ("diff",),
    "pool": ("pool",),
    "config": ("config",),
    "demo": ("demo",),
}
COMMAND_NAMES = tuple(name for names in COMMANDS.values() for name in names)
#: the options ``dmfs`` takes before a command name that take a value
_VALUE_OPTIONS = ("--log-level", "--log-format")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line: ``dmfs`` and every sub-command (also for generated docs).

    ``command``: only the family of that command is imported and its parsers added.
    Each command family's module is one more to read at the start of a command,
    a few ms each in the test guest with cold caches, and bench/diff_ops.py times
    ``dmfs diff`` as a whole command.
    """
    parser = argparse.ArgumentParser(
        prog="dmfs", parents=[common_options(suppress_defaults=False)],
        formatter_class=HelpFormatter,
        description="Show the snapshots of a device-mapper thin pool as a directory tree.",
        epilog=EXIT_STATUS_HELP)
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family, names in COMMANDS.items():
        if command is None or command in names:
            importlib.import_module(f"dmfs.cli.{family}").add_parser(commands)
    return parser


def command_to_run(argv: Sequence[str], program: str = "dmfs") -> str | None:
    """The command ``argv`` names, when only logging options come before it; None
    when the whole parser is needed (help, --version, a mount helper call, an
    abbreviated option or a mistake: argparse says what is wrong)."""
    if mount_helper.is_helper_call(argv, program, COMMAND_NAMES):
        return None
    words = iter(argv)
    for word in words:
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith(tuple(f"{option}=" for option in _VALUE_OPTIONS)):
            return word if word in COMMAND_NAMES else None
    return None


def mount_helper_argv(argv: Sequence[str], parser: argparse.ArgumentParser,
                      program: str = "dmfs") -> list[str]:
    """The command line for ``parser``: a mount(8) or mount.fuse3 call (see
    :mod:`dmfs.cli.mount_helper`) becomes ``mount ...``; others stay as they are."""
    if not mount_helper.is_helper_call(argv, program, COMMAND_NAMES):
        return list(argv)
    try:
        return mount_helper.helper_argv(argv)
    except mount_helper.HelperCallError as error:
        parser.exit(EXIT_USAGE, f"dmfs: error: {error}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmfs`` console script; returns the exit status."""
    complete_path()
    program = sys.argv[0] if argv is None else "dmfs"
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_to_run(words, program))
    args = parser.parse_args(mount_helper_argv(words, parser, program))
    setup_logging(args.log_level, args.log_format)
    try:
        return args.run(args)
    except (ConfigError, UsageError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    except EnvironmentProblem as error:
        log.error("%s", error)
        return EXIT_ENVIRONMENT
    except BrokenPipeError:
        # The reader of our output went away (`dmfs ... | head`): nothing to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (OperationFailed, PoolAdminError, OSError) as error:  # a DmError is an OSError
        log.debug("details", exc_info=True)
        log.error("%s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
