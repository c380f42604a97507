"""The kernel's caches of the tree, kept right when something else changes the state.

The kernel keeps each node's entry and attributes for ``NODE_TIMEOUT`` (300 s:
the biggest metadata win, DESIGN.md §4).  What the tree itself does keeps those
caches right: the kernel moves or drops its own entries on rename and rmdir,
and the handlers invalidate the attributes they change.  What the other front
end does (containerd's snapshots API: its garbage collector removing a
snapshot, a Commit renaming one) never reaches the kernel, which would go on
showing a removed node, or a committed one under its old name, for minutes.

So after every change of the engine's state, :func:`stale` compares what the
kernel was told about the nodes it holds (the name each is an entry under, and
its mode, link count and times) and the root's link count with the state now,
and says what the view must invalidate: the entries of nodes that are gone or
renamed, and the attributes that changed.  It compares only the nodes the
kernel has seen that the engine says changed (``touched_since``: the snapshots
stored or dropped and their parents), and all the nodes the kernel has seen
only when the engine no longer knows (comparing 10,000 took 39 ms on the
host).  A change made through the tree finds nothing left to do but an
invalidation the kernel no longer needs.

The kernel's copies of the ``fs`` link targets are another cache, with its own
mechanism (:mod:`dmfs.fuse.linkcache`): the engine calls ``before_unmount``
before it takes a snapshot's files away, whichever front end asked, and the
link's inode (its cached target) is invalidated then, in a worker thread.
This module follows the state after the change: node entries and attributes,
which the kernel never needs to ask for again until told.  The two never
invalidate the same inode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmfs.fuse import inodes
from dmfs.fuse.inodes import EntryRole, Identity
from dmfs.fuse.names import encode_key
from dmfs.fuse.namespace import Namespace


@dataclass
class Stale:
    """What the kernel may hold that is no longer so."""

    #: (parent inode, name, inode, removed): entries to invalidate
    entries: list[tuple[int, bytes, int, bool]] = field(default_factory=list)
    #: inodes whose attributes changed
    attributes: list[int] = field(default_factory=list)
    #: snapshots gone, whose inode entries the kernel no longer holds can go too
    gone: list[Identity] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entries or self.attributes or self.gone)


def stale(ns: Namespace, touched: tuple[set[int], set[str | None]] | None = None) -> Stale:
    """Compare what the kernel was told with the engine's state, for the nodes
    on the devices and the parents in ``touched`` (as the engine's
    ``touched_since`` gives them; None: every node); updates the records of what
    the kernel was told to what it will be told after the invalidations."""
    found = Stale()
    if touched is None:
        candidates = ns.inodes.entries(EntryRole.NODE)
        root_may_change = True
    else:
        devices, parents = touched
        chosen = {entry.inode: entry for device_id in devices
                  for entry in ns.inodes.nodes_on_device(device_id)}
        for key in parents:
            parent = ns.engine.get(key) if key is not None else None
            entry = ns.inodes.node_entry(parent.identity) if parent is not None else None
            if entry is not None:
                chosen[entry.inode] = entry
        candidates = list(chosen.values())
        root_may_change = None in parents
    for entry in candidates:
        info = ns.engine.by_device(entry.identity[0])
        if info is None or info.identity != entry.identity:
            if entry.known_as is not None:
                found.entries.append((*entry.known_as, entry.inode, True))
                entry.known_as = None
            entry.reported = None
            found.gone.append(entry.identity)
            continue
        if entry.known_as is not None:
            parent = ns.engine.get(info.parent) if info.parent else None
            now_as = (ns.node_inode(parent) if parent else inodes.ROOT,
                      encode_key(info.key).encode())
            if now_as != entry.known_as:
                found.entries.append((*entry.known_as, entry.inode, False))
                entry.known_as = now_as
        if entry.reported is not None:
            values = ns.node_values(info)
            if values != entry.reported:
                found.attributes.append(entry.inode)
                entry.reported = values
    root_values = ns.root_values() if root_may_change else ns.root_reported
    if ns.root_reported is not None and ns.root_reported != root_values:
        found.attributes.append(inodes.ROOT)
        ns.root_reported = root_values
    return found
