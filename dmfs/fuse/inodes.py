"""Inode numbers for the tree, with the kernel's lookup counts.

Fixed inodes serve the root and ``.dmfs``.  A snapshot's node, its ``fs`` link,
its ``by-name`` link and its ``containerd`` link get numbers from a counter the
first time the kernel sees them, keyed by the snapshot's identity: its thin
device id and creation time, which a commit or a rename keep (so the kernel's
cached dentry simply moves) and which a removed-and-recreated key does not
reuse.  Numbers are never reused within a mount; an entry is dropped once the
kernel forgot it and its snapshot is gone.  The directories of containerd's
namespaces (``.dmfs/containerd/<namespace>``) get numbers from the same counter,
by name; they are few (one per namespace ever seen) and kept for the mount's life.
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
CONTAINERD_DIR = ROOT + 5
FIRST_DYNAMIC = ROOT + 15

#: names inside .dmfs
CONTROL_ENTRIES = {b"pool": POOL_FILE, b"snapshots.json": SNAPSHOTS_FILE,
                   b"by-name": BY_NAME_DIR, b"containerd": CONTAINERD_DIR}
#: the directories under .dmfs (the others are files)
CONTROL_DIRS = (CONTROL_DIR, BY_NAME_DIR, CONTAINERD_DIR)


class EntryRole(Enum):
    NODE = "node"  # M/.../<name>/
    FS_LINK = "fs"  # M/.../<name>/fs
    BY_NAME = "by-name"  # M/.dmfs/by-name/<name>
    CONTAINERD = "containerd"  # M/.dmfs/containerd/<namespace>/<name>


#: what stays the same for a snapshot through commit and rename
Identity = tuple[int, str]  # (thin device id, created)


@dataclass
class Entry:
    inode: int
    role: EntryRole
    identity: Identity
    lookups: int = 0
    #: where the kernel last learnt a node's entry: (parent inode, name)
    known_as: tuple[int, bytes] | None = None
    #: the node's attributes as last reported (see dmfs.fuse.coherence)
    reported: tuple[int, int, int] | None = None
    #: a by-name or containerd link's target, fixed for the inode's life
    target: bytes | None = None
    #: replaced by a newer inode of the same link (its target changed)
    retired: bool = False


class InodeTable:
    """Dynamic inode numbers by (role, identity), with lookup counts."""

    def __init__(self) -> None:
        self._next = FIRST_DYNAMIC
        self._by_inode: dict[int, Entry] = {}
        self._by_identity: dict[tuple[EntryRole, Identity], Entry] = {}
        #: node entries by thin device id (an id reused after a removal: several)
        self._nodes_by_device: dict[int, list[Entry]] = {}
        self._namespace_dirs: dict[str, int] = {}
        self._namespace_names: dict[int, str] = {}

    def inode(self, role: EntryRole, identity: Identity, target: bytes | None = None) -> int:
        """The inode of a snapshot's node or link (allocated on first use).

        A link whose ``target`` is given gets a new inode whenever the target
        changes (a by-name or containerd link, after a commit or rename of its
        node or of an ancestor): the kernel caches a link's target with the
        inode (FUSE_CAP_CACHE_SYMLINKS, dmfs.fuse.linkcache) and nothing but an
        invalidation, which can block, would refresh it; these links have entry
        timeout 0, so the next path walk looks the name up and meets the new
        inode.  The old one goes once the kernel forgets it."""
        entry = self._by_identity.get((role, identity))
        if entry is not None and target is not None and entry.target != target:
            self._retire(entry)
            entry = None
        if entry is None:
            entry = Entry(self._next, role, identity, target=target)
            self._next += 1
            self._by_inode[entry.inode] = entry
            self._by_identity[(role, identity)] = entry
            if role is EntryRole.NODE:
                self._nodes_by_device.setdefault(identity[0], []).append(entry)
        return entry.inode

    def node_entry(self, identity: Identity) -> Entry | None:
        """A snapshot's node entry, if it has one (allocates none)."""
        return self._by_identity.get((EntryRole.NODE, identity))

    def nodes_on_device(self, device_id: int) -> list[Entry]:
        """The node entries of the snapshots that had thin device ``device_id``."""
        return self._nodes_by_device.get(device_id, [])

    def namespace_dir(self, namespace: str) -> int:
        """The inode of containerd namespace ``namespace``'s directory."""
        inode = self._namespace_dirs.get(namespace)
        if inode is None:
            inode = self._namespace_dirs[namespace] = self._next
            self._namespace_names[inode] = namespace
            self._next += 1
        return inode

    def namespace_of(self, inode: int) -> str | None:
        """The containerd namespace whose directory ``inode`` is, if it is one."""
        return self._namespace_names.get(inode)

    def get(self, inode: int) -> Entry | None:
        return self._by_inode.get(inode)

    def entries(self, role: EntryRole) -> list[Entry]:
        return [entry for entry in self._by_inode.values() if entry.role is role]

    def known_as(self, inode: int, parent_inode: int, name: bytes) -> None:
        """The kernel now has ``inode`` as entry ``name`` of ``parent_inode``."""
        entry = self._by_inode.get(inode)
        if entry is not None:
            entry.known_as = (parent_inode, name)

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
        if entry.lookups == 0 and (entry.retired or not still_exists):
            self._drop(entry)

    def _retire(self, entry: Entry) -> None:
        if entry.lookups == 0:
            self._drop(entry)
            return
        entry.retired = True
        del self._by_identity[(entry.role, entry.identity)]

    def snapshot_gone(self, identity: Identity) -> None:
        """A snapshot was removed: drop its entries the kernel no longer holds
        (the others go when the kernel forgets them)."""
        for role in EntryRole:
            entry = self._by_identity.get((role, identity))
            if entry is not None and entry.lookups == 0:
                self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        del self._by_inode[entry.inode]
        if not entry.retired:
            del self._by_identity[(entry.role, entry.identity)]
        if entry.role is EntryRole.NODE:
            same_device = self._nodes_by_device[entry.identity[0]]
            same_device.remove(entry)
            if not same_device:
                del self._nodes_by_device[entry.identity[0]]

    def __len__(self) -> int:
        return len(self._by_inode)
