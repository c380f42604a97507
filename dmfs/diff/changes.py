"""What ``dmfs diff`` reports: one change per path, as text lines or JSON.

The text follows ``zfs diff``: a change letter, a tab, the path (relative to
the snapshot's filesystem, starting with ``/``), and for a rename
``old -> new``.  dmfs adds a fifth letter for a path whose file type changed,
and after another tab the attributes that changed.  Paths are escaped so that
every change stays on one line and splits on whitespace: a backslash, white
space, control characters and bytes that are not UTF-8 become ``\\ooo``
(three octal digits of each byte), as in /proc/self/mountinfo.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(Enum):
    """A change type: its letter, and its name in JSON."""

    ADDED = ("+", "added")
    REMOVED = ("-", "removed")
    MODIFIED = ("M", "modified")
    RENAMED = ("R", "renamed")
    TYPE_CHANGED = ("T", "type changed")

    @property
    def letter(self) -> str:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


#: file types as ``zfs diff -F`` prints them, and as JSON names them
FILE_TYPES: dict[int, tuple[str, str]] = {
    stat.S_IFREG: ("F", "file"), stat.S_IFDIR: ("/", "directory"),
    stat.S_IFLNK: ("@", "symlink"), stat.S_IFIFO: ("|", "fifo"),
    stat.S_IFSOCK: ("=", "socket"), stat.S_IFBLK: ("B", "block device"),
    stat.S_IFCHR: ("C", "character device"),
}

#: the attributes a change can name, in the order they are listed
ATTRIBUTES = ("inode", "content", "target", "device", "mode", "owner", "mtime", "links",
              "xattrs")


def type_letter(file_type: int) -> str:
    return FILE_TYPES.get(file_type, ("?", "unknown"))[0]


def type_name(file_type: int) -> str:
    return FILE_TYPES.get(file_type, ("?", "unknown"))[1]


@dataclass(frozen=True)
class Change:
    """One line of a diff.  ``file_type`` is the S_IFMT bits of the file as it
    is in the newer snapshot (the older one for a removal); ``old_type`` only
    for a type change."""

    kind: Kind
    path: str
    file_type: int
    new_path: str | None = None
    old_type: int | None = None
    attributes: tuple[str, ...] = ()

    def line(self, types: bool = False) -> str:
        """The text line: ``M\\t/etc/passwd\\t(content, mtime)``."""
        fields = [self.kind.letter]
        if types:
            letter = type_letter(self.file_type)
            if self.old_type is not None:
                letter = f"{type_letter(self.old_type)}>{letter}"
            fields.append(letter)
        where = escape(self.path)
        if self.new_path is not None:
            where += f" -> {escape(self.new_path)}"
        fields.append(where)
        if self.attributes:
            fields.append(f"({', '.join(self.attributes)})")
        return "\t".join(fields)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"change": self.kind.label, "path": self.path,
                                "file_type": type_name(self.file_type)}
        if self.new_path is not None:
            data["new_path"] = self.new_path
        if self.old_type is not None:
            data["old_file_type"] = type_name(self.old_type)
        data["attributes"] = list(self.attributes)
        return data

    @property
    def sort_key(self) -> tuple[str, str]:
        return (self.path, self.kind.letter)


def ordered_attributes(names: set[str]) -> tuple[str, ...]:
    return tuple(name for name in ATTRIBUTES if name in names)


@dataclass
class Summary:
    """How many changes of each kind."""

    counts: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))

    @classmethod
    def of(cls, changes: list[Change]) -> Summary:
        summary = cls()
        for change in changes:
            summary.counts[change.kind] += 1
        return summary

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {kind.label.replace(" ", "_"): count for kind, count in self.counts.items()}

    def line(self) -> str:
        if not self.total:
            return "no differences"
        return ", ".join(f"{count} {kind.label}" for kind, count in self.counts.items())


_SAFE = frozenset(range(0x21, 0x7F)) - {ord("\\")}
_PLAIN = re.compile(r"[!-\[\]-~]*")  # printable ASCII but space and backslash


def escape(path: str) -> str:
    """``path`` with a backslash, white space, control characters and bytes
    that are not UTF-8 as ``\\ooo`` octal escapes (one per byte)."""
    if _PLAIN.fullmatch(path):
        return path
    out = []
    for char in path:
        if len(char.encode("utf-8", "surrogateescape")) > 1 and char.isprintable() \
                and not 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(char)
            continue
        for byte in char.encode("utf-8", "surrogateescape"):
            out.append(chr(byte) if byte in _SAFE else f"\\{byte:03o}")
    return "".join(out)
