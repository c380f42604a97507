"""The ``dmfs`` command.

Exit status (the same for every command, see ``EXIT_STATUS_HELP``):
0 done; 1 the operation failed; 2 usage or configuration error, nothing
touched; 3 the machine is not ready (kernel support, a tool, privileges, the
pool, the mountpoint), nothing touched; 130 interrupted.

Adding a command: write ``add_<name>_parser(commands)`` that adds a sub-parser
with ``parents=[common_options()]`` and ``set_defaults(run=<function>)``, and
list it in ``COMMAND_PARSERS``.  ``run(args) -> int`` returns the exit status
or raises: ConfigError / UsageError -> 2, EnvironmentProblem -> 3,
OperationFailed / DmError / OSError -> 1; ``main`` logs the one-line message.
Print data to stdout with :func:`emit` (it handles ``--json``); everything else
goes through ``logging``.

The commands that need the snapshot engine come with it: ``mount``, ``status``,
``tree``, ``check``, ``demo``.  ``mount`` reads its config with
:func:`dmfs.config.load_config` and checks the machine with
:mod:`dmfs.preflight`.  It must also accept the calling convention of
``mount.fuse3`` for fstab lines of type ``fuse.dmfs`` (contrib/fstab.example):
``dmfs CONFIG MOUNTPOINT -o OPTIONS``, returning only once mounted (mount(8)
waits for it).  With the example line, OPTIONS is ``rw,nodev,nosuid``:
libmount keeps ``x-*`` options to itself and mount.fuse3 drops ``nofail`` and
``_netdev``.  Under systemd (contrib/systemd/dmfs@.service, ``Type=notify``)
it runs as ``dmfs mount FILE --foreground`` and calls
``dmfs.sdnotify.notify("READY=1")`` once mounted, ``"STOPPING=1"`` on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

from dmfs import __version__
from dmfs.config import CONFIG_KEYS, LOG_LEVELS, Config, ConfigError, dm_name_problem, load_config
from dmfs.pool.dm import DmError
from dmfs.pool.drivers import DRIVERS
from dmfs.pooladmin import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LOW_WATER,
    LowWater,
    PoolAdminError,
    PoolSpecError,
    create_loop_pool,
    destroy_pool,
    plan_loop_pool,
)
from dmfs.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_root,
    require_tool,
)
from dmfs.units import SIZE_EXAMPLES, format_size, parse_size

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


# ---- parsers -----------------------------------------------------------------------


def common_options(suppress_defaults: bool = True) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name.

    On sub-commands their defaults are suppressed so that a value given before
    the command name is not overwritten by the sub-command's default.
    """
    parser = argparse.ArgumentParser(add_help=False)
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{before}{heading}\n{lines}\n\n{EXIT_STATUS_HELP}")


def driver_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", choices=DRIVERS, default=DRIVERS[0],
                        help=f"how to talk to device-mapper (default: {DRIVERS[0]}: ioctls "
                             "on /dev/mapper/control; dmsetup runs the command)")


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as a JSON object instead of text")


def add_pool_parser(commands: argparse._SubParsersAction) -> None:
    pool = commands.add_parser(
        "pool", help="create or destroy a loop-backed thin pool",
        description="Create or destroy a thin pool on two sparse files (for tests, demos\n"
                    "and small machines). For a production pool on disks or LVM, see\n"
                    "contrib/PRODUCTION-POOL.md.",
        epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)

    create = add_command(
        actions, "create", "create a loop-backed thin pool",
        (
            "Create thin pool NAME on two sparse files in DIR, NAME.data and NAME.metadata,\n"
            "each on a loop device. The pool fails writes at once when full\n"
            "(error_if_no_space) and raises a device event when its free data blocks fall\n"
            "below the low-water mark.\n\n"
            "Running it again is harmless: a pool NAME already on those files is reported\n"
            "as it is (with different options it is an error, pools are not changed). If\n"
            "the files exist but the pool does not (after a reboot, or `pool destroy`\n"
            "without --loopback), they are attached again and the pool comes back with\n"
            "its thin devices and data."),
        ["dmfs pool create --loopback /var/lib/dmfs-pools --size 20GiB --name pool0"],
        notes=(f"sizes: {SIZE_EXAMPLES};\n"
               "every unit is 1024-based, as in containerd (10GB = 10GiB)."))
    create.add_argument("--loopback", metavar="DIR", type=directory_argument, required=True,
                        help="existing directory for the pool's files")
    create.add_argument("--size", type=size_argument, required=True,
                        help="data size (the file is sparse: space is used as data is written)")
    create.add_argument("--name", type=pool_name_argument, required=True,
                        help="device-mapper name of the pool (/dev/mapper/NAME)")
    create.add_argument("--metadata-size", metavar="SIZE", type=size_argument,
                        help="metadata size (default: 96 bytes per data block, at least "
                             "16MiB; sparse as well)")
    create.add_argument("--block-size", metavar="SIZE", type=size_argument,
                        default=DEFAULT_BLOCK_SIZE,
                        help=f"data block size, the unit of allocation and copy-on-write: a "
                             f"multiple of 64KiB up to 1GiB (default: "
                             f"{format_size(DEFAULT_BLOCK_SIZE)})")
    create.add_argument("--low-water", metavar="SIZE|PERCENT", type=low_water_argument,
                        default=LowWater.parse(DEFAULT_LOW_WATER),
                        help=f"free space below which the kernel raises an event, as a size or "
                             f"a percentage of the data blocks (default: "
                             f"{DEFAULT_LOW_WATER.replace('%', '%%')})")
    create.add_argument("--overcommit", action="store_true",
                        help="create the files even if DIR's filesystem cannot hold them "
                             "full (a pool whose file cannot grow fails and needs repair)")
    driver_option(create)
    json_option(create)
    create.set_defaults(run=run_pool_create)

    destroy = add_command(
        actions, "destroy", "remove a thin pool and its loop devices",
        (
            "Remove thin pool NAME and detach its loop devices. Refuses while any device\n"
            "is active on the pool (a thin device, mounted or not): stop dmfs first.\n"
            "Without --loopback the files stay, and `pool create` with the same options\n"
            "brings the pool back; with --loopback DIR they are deleted, and with them\n"
            "every snapshot in the pool."),
        ["dmfs pool destroy --name pool0 --loopback /var/lib/dmfs-pools"])
    destroy.add_argument("--name", type=pool_name_argument, required=True,
                         help="device-mapper name of the pool")
    destroy.add_argument("--loopback", metavar="DIR", type=directory_argument,
                         help="also delete NAME.data and NAME.metadata in DIR (they must be "
                              "the pool's files)")
    driver_option(destroy)
    json_option(destroy)
    destroy.set_defaults(run=run_pool_destroy)


def add_config_parser(commands: argparse._SubParsersAction) -> None:
    config = add_command(
        commands, "config", "check a configuration file",
        (
            "Check a configuration file and print every setting it gives, defaults\n"
            "included, with sizes in bytes and durations in seconds. A bad file gives one\n"
            "line naming the file, the key and what is wrong, and exit status 2.\n"
            "contrib/dmfs.toml.example describes every key."),
        ["dmfs config /etc/dmfs/pool0.toml"])
    config.add_argument("file", metavar="FILE", type=Path, help="the TOML file to check")
    json_option(config)
    config.set_defaults(run=run_config)


#: Every command's parser; the engine's commands are added here when they land.
COMMAND_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_pool_parser, add_config_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmfs", parents=[common_options(suppress_defaults=False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the snapshots of a device-mapper thin pool as a directory tree.",
        epilog=EXIT_STATUS_HELP)
    parser.add_argument("--version", action="version", version=f"dmfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The engine's commands import this module for its helpers: load them here.
    from dmfs.cli_diff import add_diff_parser
    from dmfs.cli_engine import add_engine_parsers
    from dmfs.cli_mount import add_mount_parser
    from dmfs.demo import add_demo_parser

    for add_parser in (add_mount_parser, add_engine_parsers, add_diff_parser, *COMMAND_PARSERS,
                       add_demo_parser):
        add_parser(commands)
    return parser


def mount_helper_argv(argv: Sequence[str]) -> list[str]:
    """mount.fuse3 runs ``dmfs CONFIG MOUNTPOINT -o OPTIONS``: that means ``mount``."""
    args = list(argv)
    if args and not args[0].startswith("-") and os.path.isfile(args[0]):
        return ["mount", *args]
    return args


# ---- commands ----------------------------------------------------------------------


def run_pool_create(args: argparse.Namespace) -> int:
    try:
        spec = plan_loop_pool(args.name, args.loopback, args.size,
                              metadata_size=args.metadata_size, block_size=args.block_size,
                              low_water=args.low_water)
    except PoolSpecError as error:
        raise UsageError(str(error)) from None
    require_root("dmfs pool create")
    require_device_mapper()
    dm = open_device_mapper(args.driver)
    require_tool("losetup", "util-linux")
    report = create_loop_pool(dm, spec, overcommit=args.overcommit)
    emit(args, report.as_dict(), report.lines())
    return EXIT_OK


def run_pool_destroy(args: argparse.Namespace) -> int:
    require_root("dmfs pool destroy")
    require_device_mapper()
    dm = open_device_mapper(args.driver)
    require_tool("losetup", "util-linux")
    report = destroy_pool(dm, args.name, loopback_dir=args.loopback)
    emit(args, report.as_dict(), report.lines())
    return EXIT_OK


def config_settings(config: Config) -> dict[str, Any]:
    """Every key of ``config`` with the value dmfs will use (defaults resolved)."""
    settings: dict[str, Any] = {key: getattr(config, key) for key in CONFIG_KEYS}
    settings["root_path"] = config.state_dir
    settings["runtime_path"] = config.runtime_dir
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in settings.items()}


def run_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    settings = config_settings(config)
    width = max(map(len, settings))
    lines = [f"{key:<{width}}  {'-' if value is None else json.dumps(value)}"
             for key, value in settings.items()]
    lines[CONFIG_KEYS.index("base_image_size")] += f"  # {format_size(config.base_image_size)}"
    emit(args, settings, [f"# {args.file}: valid", *lines])
    return EXIT_OK


#: where the tools dmfs runs live; mount(8) starts helpers with a minimal PATH
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def complete_path() -> None:
    """Add the system directories missing from PATH (thin_ls, mkfs.ext4, losetup)."""
    present = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in SYSTEM_PATH if d not in present]
    os.environ["PATH"] = os.pathsep.join([p for p in present if p] + missing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmfs`` console script; returns the exit status."""
    complete_path()
    args = build_parser().parse_args(mount_helper_argv(sys.argv[1:] if argv is None else argv))
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
    except (OperationFailed, PoolAdminError, DmError, OSError) as error:
        log.debug("details", exc_info=True)
        log.error("%s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
