"""``dmfs mount``: check the machine, then serve the tree (daemon or foreground).

Also the program behind ``mount -t fuse.dmfs CONFIG MOUNTPOINT -o OPTIONS`` and
fstab lines of type ``fuse.dmfs``: mount.fuse3 runs ``dmfs CONFIG MOUNTPOINT -o
OPTIONS`` (:func:`dmfs.cli.main.mount_helper_argv` reads that as ``mount``) and
waits for it, so without ``--foreground`` the command returns once the tree is
mounted and a daemon serves it.  With contrib/fstab.example's line, OPTIONS is
``rw,nodev,nosuid``: libmount keeps ``x-*`` options to itself and mount.fuse3
drops ``nofail`` and ``_netdev``.  Under systemd (contrib/systemd/dmfs@.service,
``Type=notify``) it runs as ``dmfs mount FILE --foreground`` and notifies
``READY=1`` once mounted, ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import sys
from dataclasses import replace
from pathlib import Path

from dmfs.cli.common import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_command,
)
from dmfs.cli.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_fuse,
    require_mountpoint,
    require_root,
    require_thin_pool,
)
from dmfs.config import Config, load_config
from dmfs.pool import PoolError, SnapshotError, mountinfo, umount
from dmfs.units import parse_duration

log = logging.getLogger("dmfs.mount")

#: mount(8) options that say nothing to dmfs
IGNORED_OPTIONS = frozenset({
    "rw", "dev", "suid", "exec", "auto", "noauto", "user", "users", "nouser", "owner",
    "defaults", "_netdev", "nofail", "async", "atime", "noatime", "relatime", "strictatime",
    "nodiratime", "diratime", "lazytime", "nolazytime", "silent", "loud"})
#: passed on to the FUSE mount itself
FUSE_OPTIONS = frozenset({"nodev", "nosuid", "noexec"})
PIDFILE = "dmfs.pid"


def add_parser(commands: argparse._SubParsersAction) -> None:
    mount = add_command(
        commands, "mount", "mount the snapshot tree",
        (
            "Mount the snapshots of the thin pool that CONFIG describes as a directory tree\n"
            "at MOUNTPOINT (default: the config's mountpoint). Without --foreground it\n"
            "returns once the tree is mounted and a daemon serves it; `umount MOUNTPOINT`\n"
            "stops the daemon, which first unmounts every snapshot.\n\n"
            "mount -t fuse.dmfs CONFIG MOUNTPOINT -o OPTIONS and fstab lines of type\n"
            "fuse.dmfs run this command."),
        ["dmfs mount /etc/dmfs/pool0.toml /srv/snapshots",
         "mount -t fuse.dmfs /etc/dmfs/pool0.toml /srv/snapshots -o admin_group=wheel"],
        notes=(
            "mount options (-o, comma-separated):\n"
            "  allow_other / noallow_other   let every user browse (default: the config)\n"
            "  admin_group=GROUP             who may mkdir/mv/rmdir besides root\n"
            "  idle_timeout=DURATION         unmount unused read-only snapshots after it\n"
            "  log_level=LEVEL, debug        log detail of the daemon\n"
            "  nodev, nosuid, noexec         passed to the FUSE mount\n"
            "  rw, defaults, _netdev, nofail, ... ignored; ro is refused"))
    mount.add_argument("config", metavar="CONFIG", type=Path, help="the pool's TOML file")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?",
                       help="an empty directory (default: mountpoint in CONFIG)")
    mount.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                       help="mount options, see below")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in this process, log to stderr, notify systemd when ready")
    mount.add_argument("--fake", action="store_true",
                       help="check CONFIG, the options and the mountpoint's name, then stop "
                            "without mounting (what `mount -f` asks of a mount helper)")
    mount.set_defaults(run=run_mount)


def apply_mount_options(config: Config, option_args: list[str]) -> tuple[Config, set[str]]:
    """The config as the -o options change it, and the options for libfuse."""
    fuse: set[str] = set()
    changes: dict[str, object] = {}
    for option in (o for arg in option_args for o in arg.split(",") if o):
        name, has_value, value = option.partition("=")
        if option in IGNORED_OPTIONS or name.startswith("x-"):
            continue
        if option in FUSE_OPTIONS:
            fuse.add(option)
        elif option in ("allow_other", "noallow_other"):
            changes["allow_other"] = option == "allow_other"
        elif name == "admin_group" and has_value and value:
            changes["admin_group"] = value
        elif name == "idle_timeout" and has_value:
            try:
                changes["idle_timeout"] = parse_duration(value)
            except ValueError as error:
                raise UsageError(f"mount option {option}: {error}") from None
        elif name == "log_level" and has_value:
            changes["log_level"] = value
        elif option == "debug":
            changes["log_level"] = "debug"
        elif option == "ro":
            raise UsageError("mount option ro: dmfs cannot be mounted read-only (the tree is "
                             "how snapshots are managed; committed snapshots are read-only)")
        else:
            raise UsageError(f"unknown mount option {option!r} (see dmfs mount --help)")
    return replace(config, **changes), fuse  # type: ignore[arg-type]


def clear_stale_mount(mountpoint: Path) -> bool:
    """Detach a dead dmfs FUSE mount (its daemon was killed); True if there was one."""
    try:
        os.stat(mountpoint)
        return False
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            return False
    entries = [e for e in mountinfo() if e.mountpoint == mountpoint]
    if not entries or entries[-1].fs_type != "fuse.dmfs":
        return False
    log.warning("%s: clearing the mount of a dmfs that died (transport endpoint is not "
                "connected)", mountpoint)
    umount(mountpoint, lazy=True)
    return True


def run_mount(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    config, fuse = apply_mount_options(config, args.options)
    mountpoint = args.mountpoint or config.mountpoint
    if mountpoint is None:
        raise UsageError(f"no MOUNTPOINT given and {args.config} sets no mountpoint")
    mountpoint = Path(os.path.abspath(mountpoint))
    if args.fake:
        return EXIT_OK
    logging.getLogger("dmfs").setLevel(config.log_level.upper())
    require_root("dmfs mount")
    require_device_mapper()
    require_fuse()
    dm = open_device_mapper(config.driver, udev_timeout=config.activation_timeout)
    try:
        require_thin_pool(dm, config.pool_name)
    finally:
        dm.close()
    clear_stale_mount(mountpoint)
    mountpoint = require_mountpoint(mountpoint)
    if config.grpc_address is not None:
        require_socket_path(config.grpc_address)
    if args.foreground:
        from dmfs import sdnotify

        return _serve(config, mountpoint, fuse, on_ready=_notify_ready,
                      on_stopping=lambda: sdnotify.notify("STOPPING=1"))
    return _daemonize(config, mountpoint, fuse)


def require_socket_path(path: Path) -> None:
    """grpc_address can be served (dmfs.grpc.address); EnvironmentProblem otherwise."""
    from dmfs.grpc.address import SocketProblem, check_socket_path

    try:
        check_socket_path(path)
    except SocketProblem as problem:
        raise EnvironmentProblem(str(problem)) from None


def wait_for_exit(pid: int, timeout: float = 60.0) -> bool:
    """Wait for a process that is not our child to end (a pidfd: no polling);
    False if it still runs after ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _notify_ready() -> None:
    from dmfs import sdnotify

    sdnotify.notify("READY=1")


def _serve(config: Config, mountpoint: Path, fuse: set[str], **callbacks: object) -> int:
    # The daemon's parts (trio, pyfuse3, the whole engine) are imported here, when
    # it starts, not with this module: every dmfs command imports it to build its
    # parser, and they cost 1 s of the 1.3 s `dmfs --help` took in the test guest.
    import trio

    from dmfs.fuse.mount import serve

    pidfile = config.runtime_dir / PIDFILE
    try:
        trio.run(lambda: serve(config, mountpoint, extra_options=fuse, **callbacks))
    except PoolError as error:
        raise EnvironmentProblem(str(error)) from None
    except SnapshotError as error:
        log.error("%s", error)
        return EXIT_FAILED
    finally:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
    return EXIT_OK


def _daemonize(config: Config, mountpoint: Path, fuse: set[str]) -> int:
    """Fork a daemon; return when it reports the tree mounted, or its failure."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            if pipe.read() == b"ready":
                return EXIT_OK
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or EXIT_FAILED
    os.close(read_end)
    os.setsid()
    code = EXIT_FAILED
    try:
        code = _daemon_main(config, mountpoint, fuse, write_end)
    except EnvironmentProblem as error:
        log.error("%s", error)
        code = EXIT_ENVIRONMENT
    except BaseException:
        log.exception("dmfs daemon failed")
    finally:
        sys.stdout.flush()
        os._exit(code)


def _daemon_main(config: Config, mountpoint: Path, fuse: set[str], ready_fd: int) -> int:
    def ready() -> None:
        (config.runtime_dir / PIDFILE).write_text(f"{os.getpid()}\n")
        _log_to_system(config)
        os.write(ready_fd, b"ready")
        os.close(ready_fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    return _serve(config, mountpoint, fuse, on_ready=ready)


def _log_to_system(config: Config) -> None:
    """From now on the daemon logs to syslog, or to a file when there is none."""
    import logging.handlers  # (with socket and pickle: only the daemon needs them)

    logger = logging.getLogger("dmfs")
    if Path("/dev/log").exists():
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"dmfs[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.FileHandler(config.runtime_dir / "dmfs.log")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s dmfs[%(process)d] %(levelname)s %(message)s"))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
