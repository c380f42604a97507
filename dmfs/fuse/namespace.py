"""The tree's namespace: which snapshot an inode or a name stands for, and the
attributes the kernel sees, all from the engine's in-memory state (no I/O).

Kept apart from the handlers (:mod:`dmfs.fuse.operations`) so that the rules
of the tree (DESIGN.md §1: nodes, ``fs`` links, ``.dmfs``, names) can be read,
and tested on the host with a fake engine, without FUSE.
"""

from __future__ import annotations

import os
import stat
import time
from datetime import datetime

import pyfuse3

from dmfs.fuse import inodes
from dmfs.fuse.containerd import ContainerdIndex
from dmfs.fuse.inodes import CONTROL_DIRS, CONTROL_ENTRIES, EntryRole, InodeTable
from dmfs.fuse.names import BadName, decode_entry, display, encode_key
from dmfs.pool import Info, Kind, Snapshotter

#: how long the kernel may cache node entries and attributes; every change made
#: through the tree keeps the cache right (the kernel's own or an invalidation)
NODE_TIMEOUT = 300.0
FS = b"fs"
CONTROL = b".dmfs"


def _ns(stamp: str) -> int:
    try:
        return int(datetime.fromisoformat(stamp).timestamp() * 1e9)
    except ValueError:
        return 0


class Namespace:
    """Inodes and names of the tree, resolved against the engine."""

    def __init__(self, engine: Snapshotter, admin_gid: int | None = None) -> None:
        self.engine = engine
        self.admin_gid = admin_gid
        self.inodes = InodeTable()
        self.containerd = ContainerdIndex(engine)
        #: the root's link count as last reported (dmfs.fuse.coherence)
        self.root_reported: tuple[int, int] | None = None
        self._started_ns = time.time_ns()  # the times of the root and .dmfs

    # ------------------------------------------------------------------ resolving
    def snapshot(self, inode: int) -> tuple[EntryRole, Info] | None:
        """The snapshot entry (node, fs link, by-name or containerd link) an inode
        stands for."""
        entry = self.inodes.get(inode)
        if entry is None:
            return None
        info = self.engine.by_device(entry.identity[0])
        if info is None or info.identity != entry.identity:
            return None
        return entry.role, info

    def node(self, inode: int) -> Info | None:
        found = self.snapshot(inode)
        return found[1] if found and found[0] is EntryRole.NODE else None

    def node_inode(self, info: Info) -> int:
        return self.inodes.inode(EntryRole.NODE, info.identity)

    def link_inode(self, role: EntryRole, info: Info) -> int:
        """The inode of a by-name or containerd link to ``info``'s node: one per
        target (see :meth:`InodeTable.inode`)."""
        return self.inodes.inode(role, info.identity, target=self.link_target(role, info))

    def info_by_name(self, name: bytes) -> Info | None:
        try:
            return self.engine.get(decode_entry(name))
        except BadName:
            return None

    def child_inode(self, parent_inode: int, name: bytes) -> int | None:
        """The inode of ``name`` in a directory of the tree, or None."""
        if parent_inode == inodes.CONTROL_DIR:
            return CONTROL_ENTRIES.get(name)
        if parent_inode == inodes.BY_NAME_DIR:
            info = self.info_by_name(name)
            return self.link_inode(EntryRole.BY_NAME, info) if info else None
        if parent_inode == inodes.CONTAINERD_DIR:
            namespace = name.decode("ascii", errors="replace")
            return (self.inodes.namespace_dir(namespace)
                    if self.containerd.has_namespace(namespace) else None)
        namespace = self.inodes.namespace_of(parent_inode)
        if namespace is not None:
            key = self.containerd.key(namespace, name)
            info = self.engine.get(key) if key is not None else None
            return self.link_inode(EntryRole.CONTAINERD, info) if info else None
        if parent_inode == inodes.ROOT:
            if name == CONTROL:
                return inodes.CONTROL_DIR
            parent_key = None
        else:
            parent = self.node(parent_inode)
            if parent is None:
                return None
            if name == FS:
                return self.inodes.inode(EntryRole.FS_LINK, parent.identity)
            parent_key = parent.key
        info = self.info_by_name(name)
        if info is None or info.parent != parent_key:
            return None
        return self.node_inode(info)

    def node_entries(self, parent_key: str | None) -> list[tuple[bytes, int]]:
        """The child nodes of a node (None: the root) as (name, inode)."""
        # A child keyed "fs" (possible through the engine API, not through the
        # tree) would collide with its parent's fs link: it shows only in by-name.
        return [(os.fsencode(encode_key(info.key)), self.node_inode(info))
                for info in self.engine.children(parent_key)
                if parent_key is None or encode_key(info.key).encode() != FS]

    def containerd_entries(self, inode: int) -> list[tuple[bytes, int]] | None:
        """The entries of ``.dmfs/containerd`` or of one of its namespaces as
        (name, inode); None when ``inode`` is neither."""
        if inode == inodes.CONTAINERD_DIR:
            return [(namespace.encode(), self.inodes.namespace_dir(namespace))
                    for namespace in self.containerd.namespaces()]
        namespace = self.inodes.namespace_of(inode)
        if namespace is None:
            return None
        entries = []
        for entry, key in self.containerd.entries(namespace):
            info = self.engine.get(key)
            if info is not None:
                entries.append((entry, self.link_inode(EntryRole.CONTAINERD, info)))
        return entries

    def is_control_dir(self, inode: int) -> bool:
        """Whether ``inode`` is a directory of ``.dmfs`` (read-only, no snapshot)."""
        return inode in CONTROL_DIRS or self.inodes.namespace_of(inode) is not None

    def path(self, inode: int, name: bytes | None = None) -> str:
        """The path in the tree, for log lines."""
        parts: list[str] = []
        if name is not None:
            parts.append(display(name))
        namespace = self.inodes.namespace_of(inode)
        if inode in CONTROL_DIRS:
            parts.append({inodes.CONTROL_DIR: ".dmfs", inodes.BY_NAME_DIR: ".dmfs/by-name",
                          inodes.CONTAINERD_DIR: ".dmfs/containerd"}[inode])
        elif namespace is not None:
            parts.append(f".dmfs/containerd/{namespace}")
        elif inode != inodes.ROOT:
            found = self.snapshot(inode)
            if found:
                role, info = found
                if role is EntryRole.FS_LINK:
                    parts.append("fs")
                parts.extend(self.node_path(info))
        return "/" + "/".join(reversed(parts))

    def node_path(self, info: Info) -> list[str]:
        """Encoded names from the node up to the root (innermost first)."""
        names, current = [], info
        while current is not None:
            names.append(encode_key(current.key))
            current = self.engine.get(current.parent) if current.parent else None
        return names

    # ------------------------------------------------------------------ attributes
    def attrs(self, inode: int, mode: int, *, size: int = 0, nlink: int = 1,
              timeout: float = NODE_TIMEOUT, times: tuple[str, str] | None = None,
              entries_changed_ns: int = 0) -> pyfuse3.EntryAttributes:
        """Attributes of one inode of the tree.  A directory's mtime (and ctime)
        is also when its entries last changed (``entries_changed_ns``), as on any
        filesystem: the kernel drops its cached listing of a directory whose
        mtime moved (:mod:`dmfs.fuse.listings`)."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = mode
        attrs.st_nlink = nlink
        attrs.st_size = size
        attrs.st_uid = 0
        attrs.st_gid = self.admin_gid or 0
        attrs.st_blksize = 4096
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        stamp = _ns(times[1]) if times else self._started_ns
        attrs.st_atime_ns = stamp
        attrs.st_ctime_ns = attrs.st_mtime_ns = max(stamp, entries_changed_ns)
        return attrs

    def node_values(self, info: Info) -> tuple[int, int, int]:
        """What a node's attributes say that can change: mode, link count, mtime."""
        permissions = 0o755 if info.kind is Kind.ACTIVE else 0o555
        return (stat.S_IFDIR | permissions, 2 + self.engine.child_count(info.key),
                max(_ns(info.updated), self.engine.children_changed_ns(info.key)))

    def node_attrs(self, info: Info) -> pyfuse3.EntryAttributes:
        """A node's attributes, as the kernel is told them (and remembered, so
        that a change made elsewhere can be invalidated: dmfs.fuse.coherence)."""
        inode = self.node_inode(info)
        mode, nlink, changed_ns = values = self.node_values(info)
        entry = self.inodes.get(inode)
        if entry is not None:
            entry.reported = values
        return self.attrs(inode, mode, nlink=nlink, times=(info.created, info.updated),
                          entries_changed_ns=changed_ns)

    def root_values(self) -> tuple[int, int]:
        """What the root's attributes say that can change: link count, when its
        entries last changed."""
        return 3 + self.engine.child_count(None), self.engine.children_changed_ns(None)

    def fs_target(self, info: Info) -> bytes:
        return os.fsencode(self.engine.mount_path(info.device_id))

    def by_name_target(self, info: Info) -> bytes:
        return os.fsencode("../../" + "/".join(reversed(self.node_path(info))))

    def link_target(self, role: EntryRole, info: Info) -> bytes:
        """Where a link to a snapshot points (``fs``: its files; the others: its
        node, relative to the directory of the link)."""
        if role is EntryRole.FS_LINK:
            return self.fs_target(info)
        if role is EntryRole.BY_NAME:
            return self.by_name_target(info)
        return os.fsencode("../../../" + "/".join(reversed(self.node_path(info))))

    def served_target(self, inode: int, role: EntryRole, info: Info) -> bytes:
        """The target link inode ``inode`` answers: the one it was made for, as
        the kernel may have cached it (an inode since replaced keeps it)."""
        entry = self.inodes.get(inode)
        if entry is not None and entry.target is not None:
            return entry.target
        return self.link_target(role, info)

    def fixed_attrs(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """The attributes of the root and the .dmfs directories (None: not one)."""
        if inode == inodes.ROOT:
            self.root_reported = self.root_values()
            nlink, changed_ns = self.root_reported
            return self.attrs(inode, stat.S_IFDIR | 0o755, nlink=nlink,
                              entries_changed_ns=changed_ns)
        if inode == inodes.CONTROL_DIR:
            return self.attrs(inode, stat.S_IFDIR | 0o555, nlink=4, timeout=0)
        if inode == inodes.BY_NAME_DIR:
            return self.attrs(inode, stat.S_IFDIR | 0o555, nlink=2, timeout=0,
                              entries_changed_ns=self.engine.keys_changed_ns())
        if inode == inodes.CONTAINERD_DIR:
            return self.attrs(inode, stat.S_IFDIR | 0o555,
                              nlink=2 + len(self.containerd.namespaces()), timeout=0)
        namespace = self.inodes.namespace_of(inode)
        if namespace is not None and self.containerd.has_namespace(namespace):
            return self.attrs(inode, stat.S_IFDIR | 0o555, nlink=2, timeout=0)
        return None

    def snapshot_attrs(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """The attributes of a node or link (None: no such inode)."""
        found = self.snapshot(inode)
        if found is None:
            return None
        role, info = found
        if role is EntryRole.NODE:
            return self.node_attrs(info)
        target = self.served_target(inode, role, info)
        timeout = NODE_TIMEOUT if role is EntryRole.FS_LINK else 0
        return self.attrs(inode, stat.S_IFLNK | 0o777, size=len(target), timeout=timeout,
                          times=(info.created, info.updated))
