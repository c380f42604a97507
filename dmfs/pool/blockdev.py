"""Block devices by ``major:minor`` through sysfs, and loop devices through losetup(8).

Sysfs answers without udev (the test guest may run without it): the node of a
device, the file behind a loop device, the device-mapper devices stacked on a
device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmfs.pool.errors import PoolAdminError, PoolError
from dmfs.units import SECTOR_SIZE

LOOP_MAJOR = 7
SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device."""

    path: str
    devnum: str  # "7:N"


def sysfs_block(devnum: str) -> Path:
    """The sysfs directory of block device ``major:minor``."""
    return SYS_DEV_BLOCK / devnum


def device_node(devnum: str) -> str:
    """``/dev/<name>`` of block device ``major:minor``, from sysfs (no udev needed)."""
    for line in (sysfs_block(devnum) / "uevent").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            return f"/dev/{value}"
    raise PoolError(f"no device node for block device {devnum}")


def devnum_of(device_path: str) -> str:
    """``major:minor`` of a device node."""
    rdev = os.stat(device_path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def holders_of(devnum: str) -> list[str]:
    """Names of the dm devices stacked on block device ``major:minor`` (sysfs holders)."""
    names = []
    holders = sysfs_block(devnum) / "holders"
    for holder in sorted(holders.iterdir()) if holders.is_dir() else []:
        try:
            names.append((holder / "dm" / "name").read_text().strip())
        except OSError:
            names.append(holder.name)
    return names


# ---- loop devices -------------------------------------------------------------------


def losetup(*args: str) -> str:
    """Run losetup(8) and return its output; PoolAdminError with what it said."""
    import subprocess  # (not at import: every dmfs command imports this module)

    argv = ("losetup", *args)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as error:
        raise PoolAdminError(f"cannot run {argv[0]}: {error.strerror}") from None
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).replace("\n", "; ")
        raise PoolAdminError(f"{' '.join(argv)} failed: {detail}")
    return result.stdout


def loop_devices_of(file: Path) -> list[LoopDevice]:
    """The loop devices attached to ``file`` (``losetup -j``), matched by inode."""
    out = losetup("--list", "--noheadings", "--output", "NAME,MAJ:MIN", "--associated",
                  str(file))
    devices = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2:
            devices.append(LoopDevice(fields[0], fields[1]))
    return devices


def attach_loop(file: Path) -> LoopDevice:
    """Attach ``file`` to a free loop device."""
    path = losetup("--find", "--show", str(file)).strip()
    return LoopDevice(path, devnum_of(path))


def detach_loop_quietly(path: str) -> None:
    """Detach a loop device while undoing a failed step: its errors would hide the first one."""
    import subprocess

    subprocess.run(["losetup", "--detach", path], capture_output=True, check=False)


def is_loop(devnum: str) -> bool:
    """Whether block device ``major:minor`` is a loop device."""
    return devnum.split(":")[0] == str(LOOP_MAJOR) and (sysfs_block(devnum) / "loop").is_dir()


def loop_backing_file(devnum: str) -> str | None:
    """The file behind loop device ``major:minor``, as the kernel recorded its path."""
    try:
        return (sysfs_block(devnum) / "loop" / "backing_file").read_text().strip()
    except OSError:
        return None


def sync_loop_capacity(loop: LoopDevice, file: Path) -> None:
    """Give ``loop`` the size of ``file`` again: a loop device attached before its
    file was resized keeps the old size."""
    sectors = int((sysfs_block(loop.devnum) / "size").read_text())
    if sectors * SECTOR_SIZE != file.stat().st_size:
        losetup("--set-capacity", loop.path)
