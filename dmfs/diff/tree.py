"""One side of a comparison: a mounted snapshot filesystem, read through its path.

Directory listings come from ``getdents`` (``os.scandir``): names, inode
numbers and file types without a system call per entry.  Everything else
(``lstat``, link targets, extended attributes, file contents) is read only
for the entries the comparison asks about, and cached.  The root directory
stays open for the whole comparison, which keeps the filesystem mounted
(dmfs unmounts idle read-only snapshots, but not busy ones).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import ctypes

MAX_HANDLE_SIZE = 128
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BTIME = 0x800
STATX_SIZE = 256
#: bytes per read when comparing contents.  Small enough that each read's buffer
#: comes from (and goes back to) malloc's heap instead of a fresh mapping: in the
#: test guest a page first touched by the program costs ~60 us, and 1 MiB reads
#: cost 961 such faults (0.09 s) for the 100 file pairs of bench/diff_ops.py's
#: A -> B, 64 KiB reads 5.
READ_CHUNK = 64 << 10


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, already loaded (no find_library: it runs ldconfig, a process).
    Loaded when a file's identity is first asked for (lstat comparisons), not at
    import: ctypes with libffi is ~50 ms of dmfs diff's start in the test guest
    after drop_caches, and the comparison of inode tables needs neither."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


class DiffError(Exception):
    """The comparison cannot be made (a file cannot be read, ...); the message says why."""


class Unreadable(DiffError):
    """Permission denied on one path: the comparison goes on without it."""

    def __init__(self, rel: str, message: str) -> None:
        super().__init__(message)
        self.rel = rel


class Entry(NamedTuple):
    """A directory entry: name, inode number, and file type (S_IFMT bits, 0 when
    the listing did not say).  A tuple: a tree holds one per file, and a tuple is
    the smallest and quickest record to make (240 fewer page faults than a
    dataclass for bench/diff_ops.py's 10,000 files; see :data:`READ_CHUNK`)."""

    name: str
    ino: int
    file_type: int


@dataclass
class Directory:
    path: str  # "/" for the root, else "/a/b"
    entries: list[Entry]

    def child_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


@dataclass
class Tree:
    """Every directory of one side, by inode number."""

    root_ino: int
    dirs: dict[int, Directory] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # other filesystems mounted inside


def _entry_type(entry: os.DirEntry[str]) -> int:
    # DirEntry answers these from d_type, without a system call.
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return 0


def _file_handle(path: str) -> bytes | None:
    """The file handle of ``path`` itself (name_to_handle_at, not following a
    symlink), None when the filesystem gives none."""
    import ctypes

    handle = ctypes.create_string_buffer(8 + MAX_HANDLE_SIZE)
    struct.pack_into("<Ii", handle, 0, MAX_HANDLE_SIZE, 0)
    mount_id = ctypes.c_int()
    if _libc().name_to_handle_at(AT_FDCWD, os.fsencode(path), handle, ctypes.byref(mount_id),
                               0) != 0:
        return None
    size, kind = struct.unpack_from("<Ii", handle, 0)
    return struct.pack("<i", kind) + handle.raw[8:8 + size]


def _statx_btime(path: str) -> int | None:
    """The inode's birth time in ns (statx), None when unknown."""
    import ctypes

    buffer = ctypes.create_string_buffer(STATX_SIZE)
    if _libc().statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, STATX_BTIME, buffer) != 0:
        return None
    mask = struct.unpack_from("<I", buffer, 0)[0]
    if not mask & STATX_BTIME:
        return None
    seconds, nanoseconds = struct.unpack_from("<qI", buffer, 80)
    return seconds * 1_000_000_000 + nanoseconds


class Side:
    """A snapshot's mounted filesystem at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._prefix = os.fspath(self.root).rstrip("/")
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise DiffError(f"cannot open {self.root}: {error.strerror}") from None
        root_stat = os.fstat(self._root_fd)
        self.device = root_stat.st_dev
        self.root_ino = root_stat.st_ino
        self._stats: dict[str, os.stat_result | None] = {"/": root_stat}
        self._identities: dict[str, bytes | None] = {}
        self.unreadable: set[str] = set()  # directories that could not be listed

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @property
    def empty(self) -> bool:
        return False

    def absolute(self, rel: str) -> str:
        return self._prefix if rel == "/" else self._prefix + rel

    # -- listings ------------------------------------------------------------------
    def scan(self, reuse: Callable[[int, str], list[Entry] | None] | None = None) -> Tree:
        """Every directory under the root.  ``reuse(ino, path)`` may give a
        directory's entries instead of reading them (they are known to be the same)."""
        tree = Tree(self.root_ino)
        pending = [(self.root_ino, "/")]
        while pending:
            ino, path = pending.pop()
            if ino in tree.dirs:
                continue
            entries = reuse(ino, path) if reuse is not None else None
            if entries is None:
                entries = self._list(path, tree)
            directory = tree.dirs[ino] = Directory(path, entries)
            pending.extend((e.ino, directory.child_path(e.name)) for e in entries
                           if e.file_type == stat.S_IFDIR)
        return tree

    def _list(self, path: str, tree: Tree) -> list[Entry]:
        try:
            fd = os.open(self.absolute(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except FileNotFoundError:
            return []  # removed while we looked (an active snapshot being written)
        except PermissionError:
            self.unreadable.add(path)
            return []
        except OSError as error:
            raise self._unreadable(path, error) from None
        try:
            if os.fstat(fd).st_dev != self.device:
                tree.skipped.append(path)
                return []
            with os.scandir(fd) as listing:
                return [Entry(e.name, e.inode(), _entry_type(e)) for e in listing]
        except OSError as error:
            raise self._unreadable(path, error) from None
        finally:
            os.close(fd)

    def _unreadable(self, path: str, error: OSError) -> DiffError:
        if error.errno in (errno.EACCES, errno.EPERM):
            return Unreadable(path, f"cannot read {self.absolute(path)}: {error.strerror}")
        return DiffError(f"cannot read {self.absolute(path)}: {error.strerror}")

    # -- one file ------------------------------------------------------------------
    def lstat(self, rel: str) -> os.stat_result | None:
        """lstat of a path, cached; None when it no longer exists."""
        if rel not in self._stats:
            try:
                self._stats[rel] = os.lstat(self.absolute(rel))
            except FileNotFoundError:
                self._stats[rel] = None
            except OSError as error:
                raise self._unreadable(rel, error) from None
        return self._stats[rel]

    def identity(self, rel: str) -> bytes | None:
        """What tells this inode from another that got the same number after it
        was freed: its file handle (for ext4, inode number and generation;
        name_to_handle_at needs no privilege and works on every file type), else
        its birth time; None when neither is known."""
        if rel not in self._identities:
            self._identities[rel] = _file_handle(self.absolute(rel))
            if self._identities[rel] is None:
                birth = _statx_btime(self.absolute(rel))
                self._identities[rel] = None if birth is None else b"btime:%d" % birth
        return self._identities[rel]

    def readlink(self, rel: str) -> str | None:
        try:
            return os.readlink(self.absolute(rel))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._unreadable(rel, error) from None

    def xattrs(self, rel: str) -> dict[str, bytes]:
        path = self.absolute(rel)
        try:
            names = os.listxattr(path, follow_symlinks=False)
            return {name: os.getxattr(path, name, follow_symlinks=False)
                    for name in sorted(names)}
        except FileNotFoundError:
            return {}
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.ENODATA):
                return {}
            raise self._unreadable(rel, error) from None

    def open_file(self, rel: str) -> int | None:
        """A read-only descriptor of a regular file (without following a
        symlink, without touching its access time where allowed)."""
        path = self.absolute(rel)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(path, flags | os.O_NOATIME)
        except PermissionError:
            pass  # O_NOATIME needs ownership or CAP_FOWNER
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._unreadable(rel, error) from None
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._unreadable(rel, error) from None


class EmptySide(Side):
    """An empty filesystem: what a snapshot without a parent is compared with."""

    def __init__(self) -> None:  # nothing to open
        self.root = Path("/")
        self.device = -1
        self.root_ino = 0
        self._stats = {}
        self._identities = {}
        self.unreadable = set()
        self._root_fd = -1

    @property
    def empty(self) -> bool:
        return True

    def scan(self, reuse: Callable[[int, str], list[Entry] | None] | None = None) -> Tree:
        return Tree(0, {0: Directory("/", [])})


def same_bytes(old: Side, old_rel: str, new: Side, new_rel: str) -> tuple[bool, int]:
    """Whether two files hold the same bytes, and how many bytes were read."""
    old_fd, new_fd = old.open_file(old_rel), new.open_file(new_rel)
    read = 0
    try:
        if old_fd is None or new_fd is None:
            return False, read
        while True:
            a, b = os.read(old_fd, READ_CHUNK), os.read(new_fd, READ_CHUNK)
            read += len(a) + len(b)
            if a != b:
                return False, read
            if not a:
                return True, read
    finally:
        for fd in (old_fd, new_fd):
            if fd is not None:
                os.close(fd)
