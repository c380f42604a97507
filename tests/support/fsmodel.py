"""File changes applied to a snapshot and to a plain directory, and compared.

A layer is a list of operations.  Tests apply each layer both to a snapshot's
mounted filesystem and, cumulatively, to a plain "model" directory on tmpfs;
:func:`tree` describes either side (type, mode, owner, content or link
target, and which paths share an inode) so the two can be compared exactly.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

IGNORED = {"lost+found"}


@dataclass(frozen=True)
class Op:
    """One file change: ``kind`` and its arguments, paths relative to the root."""

    kind: str
    path: str
    arg: str | int | bytes | tuple[int, int] | None = None

    def apply(self, root: Path) -> None:
        target = root / self.path
        if self.kind == "write":
            assert isinstance(self.arg, bytes)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.arg)
        elif self.kind == "append":
            assert isinstance(self.arg, bytes)
            with open(target, "ab") as f:
                f.write(self.arg)
        elif self.kind == "mkdir":
            target.mkdir(parents=True, exist_ok=True)
        elif self.kind == "chmod":
            assert isinstance(self.arg, int)
            os.chmod(target, self.arg, follow_symlinks=False)
        elif self.kind == "chown":
            assert isinstance(self.arg, tuple)
            os.chown(target, *self.arg, follow_symlinks=False)
        elif self.kind == "remove":
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        elif self.kind == "symlink":
            assert isinstance(self.arg, str)
            target.symlink_to(self.arg)
        elif self.kind == "link":
            assert isinstance(self.arg, str)
            os.link(root / self.arg, target)
        elif self.kind == "rename":
            assert isinstance(self.arg, str)
            os.rename(target, root / self.arg)
        else:
            raise ValueError(f"unknown op {self.kind}")


def apply(root: Path, ops: list[Op]) -> None:
    for op in ops:
        op.apply(root)


def tree(root: Path) -> dict[str, tuple]:
    """Everything under ``root`` that a layer can change, keyed by relative path."""
    entries: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in IGNORED]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", os.readlink(path), st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", mode, st.st_uid, st.st_gid)
            else:
                entries[rel] = ("file", mode, st.st_uid, st.st_gid, path.read_bytes())
                inodes.setdefault(st.st_ino, []).append(rel)
    for paths in inodes.values():
        if len(paths) > 1:
            for rel in paths:
                entries[rel] = (*entries[rel], tuple(sorted(paths)))
    root_st = root.stat()
    entries["."] = ("dir", stat.S_IMODE(root_st.st_mode), root_st.st_uid, root_st.st_gid)
    return entries
