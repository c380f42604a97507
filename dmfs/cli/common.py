"""What every ``dmfs`` command shares: exit statuses, errors, logging, output,
argument types and the parser helpers.

It imports no command module, so that every command module can import it (see
the package docstring for how a command is added).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from dmfs.config import DRIVERS, LOG_LEVELS, dm_name_problem
from dmfs.units import parse_size

if TYPE_CHECKING:
    from dmfs.pool import LowWater

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130
EXIT_STATUS_HELP = """\
exit status:
  0    done
  1    the operation failed
  2    usage or configuration error; nothing was touched
  3    the machine is not ready (kernel support, a tool, root, the pool, the
       mountpoint); nothing was touched
  130  interrupted"""
LOG_FORMATS = ("auto", "text", "journal")

log = logging.getLogger("dmfs")


class UsageError(Exception):
    """Arguments that parse but cannot work together (exit status 2)."""


class OperationFailed(Exception):
    """The requested operation failed (exit status 1)."""


# ---- logging -----------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``dmfs: message``, with the level named for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"dmfs: {level}{text}"


class JournalFormatter(logging.Formatter):
    """Each line prefixed with its syslog priority, ``<3>``, which journald reads
    from a service's stderr (sd-daemon(3)); journald adds time and unit itself."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
        logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        priority = next((value for level, value in self.PRIORITIES.items()
                         if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}"
                         for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected (JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def setup_logging(level: str = "info", log_format: str = "auto",
                  stream: TextIO | None = None) -> None:
    """Send dmfs's log to stderr: readable text, or journald's priority prefixes.

    ``auto`` picks ``journal`` when stderr is the journal stream systemd set up
    for a service (JOURNAL_STREAM matches it), and ``text`` otherwise.
    """
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "journal" if stderr_is_journal(stream) else "text"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if log_format == "journal" else TextFormatter())
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


# ---- output ------------------------------------------------------------------------


def emit(args: argparse.Namespace, data: dict[str, Any], lines: Sequence[str]) -> None:
    """Print a command's result: ``data`` as JSON with ``--json``, else ``lines``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


# ---- argument types ----------------------------------------------------------------


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def low_water_argument(text: str) -> LowWater:
    from dmfs.pool import LowWater

    try:
        return LowWater.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def pool_name_argument(text: str) -> str:
    problem = dm_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"pool name {problem}")
    return text


def directory_argument(text: str) -> Path:
    path = Path(text).resolve()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return path


def new_directory_argument(text: str) -> Path:
    """A directory that may not exist yet (``pool create`` makes it), under no file."""
    path = Path(text).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a directory")
    return path


# ---- parsers -----------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter for descriptions laid out as written, told the width.

    Left to itself argparse asks ``shutil.get_terminal_size`` for it each time it
    makes a formatter, which every ``add_argument`` does; importing shutil (and
    the bz2, lzma and zlib it loads) was ~20 ms at the start of every command in
    the test guest.  The width is found the same way: ``COLUMNS``, else the
    terminal on standard output, else 80.
    """

    def __init__(self, prog: str, **options: Any) -> None:
        options.setdefault("width", terminal_columns() - 2)
        super().__init__(prog, **options)


def terminal_columns() -> int:
    """The width shutil.get_terminal_size would say, without importing shutil."""
    with contextlib.suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def common_options(suppress_defaults: bool = True) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name.

    On sub-commands their defaults are suppressed so that a value given before
    the command name is not overwritten by the sub-command's default.
    """
    parser = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    group = parser.add_argument_group("logging")

    def default(value: str) -> str:
        return argparse.SUPPRESS if suppress_defaults else value

    group.add_argument("--log-level", choices=LOG_LEVELS, default=default("info"),
                       help="least important messages shown (default: info)")
    group.add_argument("--log-format", choices=LOG_FORMATS, default=default("auto"),
                       help="text: 'dmfs: error: ...' lines for people; journal: syslog "
                            "priority prefixes such as <3> that journald reads; auto "
                            "(default): journal when stderr is systemd's journal stream, "
                            "else text")
    return parser


def add_command(commands: argparse._SubParsersAction, name: str, help_text: str,
                description: str, examples: Sequence[str], notes: str = ""
                ) -> argparse.ArgumentParser:
    """A sub-command with the common options, its description laid out as
    written, and an epilog of ``notes``, ``examples`` and the exit statuses."""
    heading = "example:" if len(examples) == 1 else "examples:"
    lines = "\n".join(f"  {example}" for example in examples)
    before = f"{notes}\n\n" if notes else ""
    return commands.add_parser(
        name, parents=[common_options()], help=help_text, description=description,
        formatter_class=HelpFormatter,
        epilog=f"{before}{heading}\n{lines}\n\n{EXIT_STATUS_HELP}")


def driver_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", choices=DRIVERS, default=DRIVERS[0],
                        help=f"how to talk to device-mapper (default: {DRIVERS[0]}: ioctls "
                             "on /dev/mapper/control; dmsetup runs the command)")


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as a JSON object instead of text")


#: where the tools dmfs runs live; mount(8) starts helpers with a minimal PATH
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def complete_path() -> None:
    """Add the system directories missing from PATH (thin_ls, mkfs.ext4, losetup)."""
    present = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in SYSTEM_PATH if d not in present]
    os.environ["PATH"] = os.pathsep.join([p for p in present if p] + missing)
