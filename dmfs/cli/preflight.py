"""Checks that the machine is ready, run before a command touches anything.

Each check raises :class:`EnvironmentProblem` (exit status 3) with one line that
says what is missing and what to do about it.  Every command that touches the
kernel starts with :func:`require_root` and :func:`require_device_mapper`, then
opens its driver with :func:`open_device_mapper`; ``mount`` goes on with
:func:`require_fuse`, :func:`require_thin_pool` and :func:`require_mountpoint`,
``demo`` with :func:`require_fuse`, ``pool create`` / ``pool destroy`` with
:func:`require_tool` for losetup.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dmfs.config import DRIVERS
from dmfs.pool import mountinfo

if TYPE_CHECKING:
    from dmfs.pool import DeviceMapper, Target

DM_CONTROL = Path("/dev/mapper/control")
FUSE_DEVICE = Path("/dev/fuse")
SYS_MODULE = Path("/sys/module")
THIN_POOL_MODULE = "dm_thin_pool"


class EnvironmentProblem(Exception):
    """The machine is not ready for the operation; the message says what to do."""


def require_root(action: str) -> None:
    """Refuse unless running as root: device-mapper and loop devices need it."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"{action} must run as root (device-mapper, loop devices and mounts need "
            f"CAP_SYS_ADMIN): run it with sudo")


def load_kernel_module(module: str) -> bool:
    """Try ``modprobe MODULE``; True when it succeeded."""
    # shutil and subprocess (with a dozen modules they import) load where they
    # are used: every dmfs command imports this module, few run a tool.
    import shutil
    import subprocess

    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    try:
        result = subprocess.run([modprobe, "-q", module], capture_output=True, check=False)
    except OSError:
        return False
    return result.returncode == 0


def require_device_mapper(*, load_module: Callable[[str], bool] = load_kernel_module,
                          control: Path = DM_CONTROL, sys_module: Path = SYS_MODULE) -> None:
    """Make sure the kernel has device-mapper and its thin-pool target.

    When either is missing, ``modprobe dm_thin_pool`` (which pulls in dm_mod)
    is tried once.  The thin-pool target is recognised by
    ``/sys/module/dm_thin_pool``, present whether it is a loaded module or
    built in (it has module parameters), so this needs neither dmsetup nor
    an ioctl.
    """
    def missing() -> str | None:
        if not control.exists():
            return f"the kernel has no device-mapper ({control} is missing)"
        if not (sys_module / THIN_POOL_MODULE).is_dir():
            return "the kernel has no dm-thin target (thin-pool)"
        return None

    if missing() is None:
        return
    load_module(THIN_POOL_MODULE)
    problem = missing()
    if problem is not None:
        raise EnvironmentProblem(
            f"{problem}, and `modprobe {THIN_POOL_MODULE}` did not load it: use a kernel "
            f"with CONFIG_DM_THIN_PROVISIONING (Debian: the standard linux-image packages; "
            f"containers: load the module on the host)")


def require_tool(name: str, package: str) -> str:
    """The path of a command needed on PATH; EnvironmentProblem naming its package."""
    import shutil

    path = shutil.which(name)
    if path is None:
        raise EnvironmentProblem(f"{name} not found on PATH: install the {package} package")
    return path


def open_device_mapper(driver: str, *, udev_timeout: float = 10.0) -> DeviceMapper:
    """An instance of the named device-mapper driver, or EnvironmentProblem."""
    if driver not in DRIVERS:
        raise EnvironmentProblem(f"unknown device-mapper driver {driver!r}: use one of "
                                 f"{', '.join(repr(name) for name in DRIVERS)}")
    # The drivers and the thin pool's module load when a command opens one, not
    # with this module: every dmfs command imports it (EnvironmentProblem), and
    # dmfs diff opens a driver only when it reads a thin delta.
    from dmfs.pool import open_driver

    if driver == "dmsetup":
        require_tool("dmsetup", "dmsetup (Fedora/RHEL: device-mapper)")
    try:
        return open_driver(driver, udev_timeout=udev_timeout)
    except (OSError, RuntimeError) as error:  # a DmError is an OSError
        raise EnvironmentProblem(f"the {driver} device-mapper driver cannot be used: "
                                 f"{error}") from None


def require_fuse(device: Path = FUSE_DEVICE) -> None:
    """Make sure /dev/fuse exists (the kernel's FUSE module is loaded)."""
    try:
        mode = device.stat().st_mode
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{device} is missing: load the kernel module with `modprobe fuse` and install "
            f"fuse3 (in a container, pass the host's {device} in)") from None
    if not stat.S_ISCHR(mode):
        raise EnvironmentProblem(f"{device} is not a character device: recreate it with "
                                 f"`mknod {device} c 10 229`")


def require_thin_pool(dm: DeviceMapper, name: str) -> Target:
    """The live table line of thin pool ``name``; EnvironmentProblem if it is not one."""
    from dmfs.pool import PoolError, find_thin_pool

    try:
        return find_thin_pool(dm, name)
    except PoolError as error:
        raise EnvironmentProblem(str(error)) from None


def require_mountpoint(path: Path) -> Path:
    """Make sure ``path`` is an existing directory with nothing mounted on it.

    Returns the resolved path.  A FUSE mount whose daemon died answers
    ENOTCONN; the message says how to clear it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"mountpoint {path} does not exist: create it with `mkdir -p {path}`") from None
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise EnvironmentProblem(
                f"mountpoint {path} is a stale FUSE mount whose daemon is gone: "
                f"clear it with `umount -l {path}`") from None
        raise EnvironmentProblem(f"mountpoint {path}: {error.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise EnvironmentProblem(f"mountpoint {path} is not a directory")
    resolved = path.resolve()
    for mount in mountinfo():
        if mount.mountpoint == resolved:
            raise EnvironmentProblem(
                f"mountpoint {path} is busy: {mount.source} ({mount.fs_type}) is already "
                f"mounted there; "
                f"unmount it first (findmnt {resolved})")
    return resolved
