"""The ``dmfs`` parser, with every command family's sub-commands, and the entry point."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dmfs.cli import config, demo, diff, inspect, mount, mount_helper, pool
from dmfs.cli.common import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
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

#: Every command family, in the order ``dmfs --help`` lists their commands.
COMMANDS = (mount, inspect, diff, pool, config, demo)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``dmfs`` and every sub-command (also for generated docs)."""
    parser = argparse.ArgumentParser(
        prog="dmfs", parents=[common_options(suppress_defaults=False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the snapshots of a device-mapper thin pool as a directory tree.",
        epilog=EXIT_STATUS_HELP)
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family in COMMANDS:
        family.add_parser(commands)
    return parser


def mount_helper_argv(argv: Sequence[str], parser: argparse.ArgumentParser,
                      program: str = "dmfs") -> list[str]:
    """The command line for ``parser``: a mount(8) or mount.fuse3 call (see
    :mod:`dmfs.cli.mount_helper`) becomes ``mount ...``; others stay as they are."""
    if not mount_helper.is_helper_call(argv, program, mount_helper.command_names(parser)):
        return list(argv)
    try:
        return mount_helper.helper_argv(argv)
    except mount_helper.HelperCallError as error:
        parser.exit(EXIT_USAGE, f"dmfs: error: {error}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmfs`` console script; returns the exit status."""
    complete_path()
    parser = build_parser()
    program = sys.argv[0] if argv is None else "dmfs"
    args = parser.parse_args(mount_helper_argv(sys.argv[1:] if argv is None else argv, parser,
                                               program))
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
