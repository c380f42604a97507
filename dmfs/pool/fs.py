"""Filesystem driver: mkfs, mount(2)/umount2(2) through ctypes, syncfs, mountinfo.

Mounting through the system calls instead of mount(8) saves a process per
mount (≈9 ms in the test guest).  mkfs stays a process: it runs once, for the
base device.

Everything that differs between the filesystem types dmfs makes (``fs_type``:
ext4, the default, or xfs, as containerd's devmapper snapshotter offers) is
in :data:`FILESYSTEMS` and the functions below: the mkfs command line, the
smallest filesystem mkfs makes, what ``fs_options`` means, and the options of
every snapshot mount.  The engine only passes ``fs_type`` along.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]


def _check(result: int, what: str, path: str | os.PathLike[str]) -> None:
    if result != 0:
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
    _check(_libc.mount(source.encode(), os.fsencode(target), fs_type.encode(), flags,
                       data.encode() or None), f"mount {source} on", target)


def umount(target: Path, *, lazy: bool = False) -> None:
    """umount2(2); EBUSY (files in use) reaches the caller as OSError."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    _check(_libc.umount2(os.fsencode(target), flags), "umount", target)


def syncfs(path: Path) -> None:
    """Write back everything of the filesystem mounted at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd), "syncfs", path)
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


@dataclass(frozen=True)
class Filesystem:
    """What dmfs needs to know about one ``fs_type``."""

    #: the mkfs program, and the Debian package that has it
    mkfs: str
    package: str
    #: the smallest filesystem that mkfs makes, in bytes (0: no limit that matters)
    min_size: int = 0
    #: data options of every snapshot mount
    mount_options: str = ""


FILESYSTEMS: dict[str, Filesystem] = {
    "ext4": Filesystem("mkfs.ext4", "e2fsprogs"),
    # Every snapshot is a block-level copy of one base device, so all of them carry the
    # base's UUID, and XFS refuses to mount a second filesystem with a UUID already
    # mounted ("Filesystem has duplicate UUID", seen in the test guest for a read-write
    # child while its read-only parent was mounted).  nouuid on every mount, read-only
    # or not, as containerd's devmapper snapshotter does.
    #
    # mkfs.xfs (xfsprogs >= 5.19) refuses filesystems under 300 MiB: upstream no longer
    # supports them (too small a log).  It skips the check for its own test suite
    # (TEST_DIR, TEST_DEV and QA_CHECK_FS all set); dmfs does not, and refuses such a
    # base_image_size in the config instead, so that users get supported filesystems.
    "xfs": Filesystem("mkfs.xfs", "xfsprogs", min_size=300 * 1024**2, mount_options="nouuid"),
}
FS_TYPES = tuple(FILESYSTEMS)
DEFAULT_FS_TYPE = "ext4"


def mount_options(fs_type: str) -> str:
    """The mount(2) data options every snapshot of ``fs_type`` is mounted with."""
    known = FILESYSTEMS.get(fs_type)
    return known.mount_options if known else ""


def _is_argument_list(fs_options: str) -> bool:
    """fs_options given as command-line arguments (``-O ^has_journal``), not as
    containerd's mkfs.ext4 ``-E`` list (``nodiscard,lazy_itable_init=1``)."""
    return fs_options.lstrip().startswith("-")


def fs_options_problem(fs_type: str, fs_options: str, *, lazy_init: bool = False) -> str | None:
    """Why ``fs_options`` (and ``mkfs_lazy_init``) cannot work for ``fs_type``, or None.

    ``fs_options`` is one of two things, told apart by its first character:
    mkfs arguments, shell-style, when it starts with ``-`` (for both types); or,
    for ext4 only, what containerd's devmapper snapshotter makes of it, the value
    of mkfs.ext4's ``-E`` (extended options, comma-separated), which then replaces
    dmfs's default list.  containerd ignores fs_options for xfs.
    """
    if fs_type not in FILESYSTEMS:
        return f"fs_type {fs_type!r} is not supported"
    if _is_argument_list(fs_options):
        try:
            shlex.split(fs_options)
        except ValueError as error:
            return f"{fs_options!r} cannot be split into mkfs arguments: {error}"
    elif fs_options and fs_type == "ext4":
        if any(c.isspace() for c in fs_options):
            return (f"{fs_options!r} is read as mkfs.ext4's -E list, as containerd reads "
                    f"it (e.g. \"nodiscard,lazy_itable_init=1\"), which has no spaces; give "
                    f"mkfs arguments with a leading '-' instead (e.g. \"-O ^has_journal\")")
        if lazy_init:
            return ("mkfs_lazy_init has no effect when fs_options is mkfs.ext4's -E list "
                    "(it replaces dmfs's list, as in containerd): add lazy_itable_init=1,"
                    "lazy_journal_init=1 to fs_options instead")
    elif fs_options:
        return (f"{fs_options!r}: for {fs_type}, fs_options are {FILESYSTEMS[fs_type].mkfs} "
                f"arguments starting with '-', e.g. \"-m reflink=0\" (containerd ignores "
                f"fs_options for {fs_type})")
    if lazy_init and fs_type != "ext4":
        return "mkfs_lazy_init applies to ext4 only"
    return None


def mkfs_argv(fs_type: str, device: str, fs_options: str = "", *,
              lazy_init: bool = False) -> list[str]:
    """The mkfs command line for a base device (see :func:`fs_options_problem`).

    No discard (``nodiscard``, ``-K``): the thin device is new and maps nothing.
    ext4's inode tables and journal are written at once unless ``lazy_init``, so the
    kernel does not write them in the background of the first snapshots.
    """
    problem = fs_options_problem(fs_type, fs_options, lazy_init=lazy_init)
    if problem:
        raise ValueError(problem)
    arguments = shlex.split(fs_options) if _is_argument_list(fs_options) else []
    if fs_type == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-K", *arguments, device]
    lazy = "1" if lazy_init else "0"
    extended = (fs_options if fs_options and not arguments
                else f"nodiscard,lazy_itable_init={lazy},lazy_journal_init={lazy}")
    return ["mkfs.ext4", "-q", "-F", "-E", extended, *arguments, device]


async def mkfs(device: str, fs_type: str, extra_options: str = "", *,
               lazy_init: bool = False) -> None:
    """Make a filesystem on ``device``; OSError says why mkfs failed."""
    argv = mkfs_argv(fs_type, device, extra_options, lazy_init=lazy_init)
    try:
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{argv[0]} not found on PATH: install the "
                      f"{FILESYSTEMS[fs_type].package} package") from None
    if result.returncode != 0:
        raise OSError(errno.EIO, f"{' '.join(argv)} failed: "
                      f"{result.stderr.decode(errors='replace').strip()}")


def discard(device: str) -> None:
    """Give a device's blocks back to the pool before it is deleted."""
    subprocess.run(["blkdiscard", device], check=True, capture_output=True)
