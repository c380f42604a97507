"""Inode numbers for the tree, with the kernel's lookup counts.

Fixed inodes serve the root and ``.dmfs``.  A snapshot's node, its ``fs`` link
and its ``by-name`` link get numbers from a counter the first time the kernel
sees them, keyed by the snapshot's identity: its thin device id and creation
time, which a commit or a rename keep (so the kernel's cached dentry simply
moves) and which a removed-and-recreated key does not reuse.  Numbers are never
reused within a mount; an entry is dropped once the kernel forgot it and its
snapshot is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
CONTROL_DIR = ROOT + 1
POOL_FILE = ROOT + 2
SNAPSHOTS_FILE = ROOT + 3
BY_NAME_DIR = ROOT + 4
FIRST_DYNAMIC = ROOT + 15

#: names inside .dmfs
CONTROL_ENTRIES = {b"pool": POOL_FILE, b"snapshots.json": SNAPSHOTS_FILE,
                   b"by-name": BY_NAME_DIR}


class EntryRole(Enum):
    NODE = "node"  # M/.../<name>/
    FS_LINK = "fs"  # M/.../<name>/fs
    BY_NAME = "by-name"  # M/.dmfs/by-name/<name>


#: what stays the same for a snapshot through commit and rename
Identity = tuple[int, str]  # (thin device id, created)


@dataclass
class Entry:
    inode: int
    role: EntryRole
    identity: Identity
    lookups: int = 0


class InodeTable:
    """Dynamic inode numbers by (role, identity), with lookup counts."""

    def __init__(self) -> None:
        self._next = FIRST_DYNAMIC
        self._by_inode: dict[int, Entry] = {}
        self._by_identity: dict[tuple[EntryRole, Identity], Entry] = {}

    def inode(self, role: EntryRole, identity: Identity) -> int:
        """The inode of a snapshot's node or link (allocated on first use)."""
        entry = self._by_identity.get((role, identity))
        if entry is None:
            entry = Entry(self._next, role, identity)
            self._next += 1
            self._by_inode[entry.inode] = entry
            self._by_identity[(role, identity)] = entry
        return entry.inode

    def get(self, inode: int) -> Entry | None:
        return self._by_inode.get(inode)

    def known_to_kernel(self, role: EntryRole, identity: Identity) -> int | None:
        """The inode of a snapshot's node or link if the kernel holds it now
        (it has looked it up and not forgotten it), else None."""
        entry = self._by_identity.get((role, identity))
        return entry.inode if entry is not None and entry.lookups > 0 else None

    def looked_up(self, inode: int) -> None:
        """The kernel now holds one more reference (lookup, mkdir, readdirplus)."""
        entry = self._by_inode.get(inode)
        if entry is not None:
            entry.lookups += 1

    def forget(self, inode: int, count: int, still_exists: bool) -> None:
        """The kernel dropped ``count`` references."""
        entry = self._by_inode.get(inode)
        if entry is None:
            return
        entry.lookups = max(0, entry.lookups - count)
        if entry.lookups == 0 and not still_exists:
            self._drop(entry)

    def snapshot_gone(self, identity: Identity) -> None:
        """A snapshot was removed: drop its entries the kernel no longer holds
        (the others go when the kernel forgets them)."""
        for role in EntryRole:
            entry = self._by_identity.get((role, identity))
            if entry is not None and entry.lookups == 0:
                self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        del self._by_inode[entry.inode]
        del self._by_identity[(entry.role, entry.identity)]

    def __len__(self) -> int:
        return len(self._by_inode)
