"""Filesystem driver: mkfs, mount(2)/umount2(2) through ctypes, syncfs, mountinfo.

Mounting through the system calls instead of mount(8) saves a process per
mount (≈9 ms in the test guest).  mkfs stays a process: it runs once, for the
base device (:func:`dmfs.pool.housekeeping.mkfs`).

What differs between the filesystem types dmfs makes (``fs_type``: ext4 or
xfs) is in :mod:`dmfs.filesystems`: the mkfs command line and the options of
every snapshot mount.  The engine only passes ``fs_type`` along.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmfs.filesystems import mount_options
from dmfs.pool.failpoints import failpoint

if TYPE_CHECKING:
    import ctypes

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library the interpreter itself runs on (dlopen(NULL), as in
    dmfs.pool.dmioctl; ctypes.util.find_library would run ``ldconfig -p``).

    Loaded on the first mount, umount or syncfs, not at import: every dmfs
    command imports this module (mountinfo), and ctypes with libffi is ~50 ms
    of a command's start in the test guest after drop_caches.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.syncfs.argtypes = [ctypes.c_int]
    return libc


def _check(result: int, what: str, path: str | os.PathLike[str]) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what} {os.fspath(path)}: {os.strerror(err)}", os.fspath(path))


def mount(source: str, target: Path, fs_type: str, *, read_only: bool = False,
          options: str = "") -> None:
    """mount(2) a block device; raises OSError with the errno.

    The options every snapshot of ``fs_type`` needs (:func:`mount_options`) come
    first, then ``options``.
    """
    flags = MS_NODEV | (MS_RDONLY if read_only else 0)
    data = ",".join(part for part in (mount_options(fs_type), options) if part)
    failpoint("fs:mount")
    _check(_libc().mount(source.encode(), os.fsencode(target), fs_type.encode(), flags,
                       data.encode() or None), f"mount {source} on", target)


def umount(target: Path, *, lazy: bool = False) -> None:
    """umount2(2); EBUSY (files in use) reaches the caller as OSError."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    failpoint("fs:umount")
    _check(_libc().umount2(os.fsencode(target), flags), "umount", target)


def syncfs(path: Path) -> None:
    """Write back everything of the filesystem mounted at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc().syncfs(fd), "syncfs", path)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    devnum: tuple[int, int]
    mountpoint: Path
    fs_type: str
    source: str
    read_only: bool


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount visible to this process, in mount order."""
    entries = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            major, minor = fields[2].split(":")
            options = fields[5].split(",")
            entries.append(MountEntry((int(major), int(minor)), Path(_unescape(fields[4])),
                                      tail[0], _unescape(tail[1]), "ro" in options))
    return entries


def mounts_under(directory: Path) -> dict[Path, MountEntry]:
    """The mounts whose mountpoint is directly inside ``directory`` (last one wins)."""
    found = {}
    for entry in mountinfo():
        if entry.mountpoint.parent == directory:
            found[entry.mountpoint] = entry
    return found


def is_busy(error: OSError) -> bool:
    return error.errno == errno.EBUSY


def discard(device: str) -> None:
    """Give a device's blocks back to the pool before it is deleted."""
    import subprocess  # (not at import: every dmfs command imports this module)

    subprocess.run(["blkdiscard", device], check=True, capture_output=True)
