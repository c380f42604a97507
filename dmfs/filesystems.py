"""The filesystem types dmfs makes on thin devices, and what differs between them.

``fs_type`` is ext4 (the default) or xfs, as containerd's devmapper snapshotter
offers: here are the mkfs command line, the smallest filesystem mkfs makes,
what ``fs_options`` means and the options of every snapshot mount.  Facts only,
below both the configuration (which checks them) and the pool's filesystem
driver (:mod:`dmfs.pool.fs`, which runs them).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


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
