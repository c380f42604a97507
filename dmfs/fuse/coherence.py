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

import logging
from dataclasses import dataclass, field

import trio

from dmfs.fuse import inodes
from dmfs.fuse.inodes import EntryRole, Identity
from dmfs.fuse.linkcache import LinkInvalidator
from dmfs.fuse.names import encode_key
from dmfs.fuse.namespace import Namespace
from dmfs.pool import Info

log = logging.getLogger(__name__)


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


class KernelFollower:
    """Follows the engine's state for the mount's life and tells the kernel what
    each change, by whichever front end, made stale (:func:`stale`)."""

    def __init__(self, ns: Namespace, links: LinkInvalidator) -> None:
        self.ns = ns
        self.engine = ns.engine
        self.links = links
        #: the state version whose changes the kernel has been told of
        self._kernel_version: int = getattr(self.engine, "state_version", 0)
        self._kernel_told = trio.Event()
        self._following = False

    async def changed_elsewhere(self, before: Info) -> None:
        """Another front end (containerd's socket) committed or removed the
        snapshot that was ``before``: return once the kernel has been told what
        that made stale (:meth:`follow` does the telling, for every change; this
        only waits for it), so that a client that looks at the tree after its
        request was answered never sees the old name."""
        if not self._following:
            return  # no kernel to tell (not mounted, or the session is over)
        target = self.engine.state_version
        while self._following and self._kernel_version < target:
            await self._kernel_told.wait()

    async def follow(self) -> None:
        """For the mount's life: after every change of the engine's state,
        invalidate what the kernel caches that is no longer so, in a worker
        thread and never once the session closes (``links.refresh``).  Never
        raises: a failure is logged and the next change tries again."""
        version = self._kernel_version = self.engine.state_version
        self._following = True
        try:
            while True:
                since, version = version, await self.engine.changed(version)
                try:
                    await self.refresh(self.engine.touched_since(since))
                except Exception:
                    log.exception("unexpected error bringing the kernel's caches up to date "
                                  "(ignored)")
                self._kernel_version = version
                self._kernel_told.set()
                self._kernel_told = trio.Event()
        finally:
            self._following = False
            self._kernel_told.set()

    async def refresh(self, touched: tuple[set[int], set[str | None]] | None = None) -> None:
        """Invalidate what the kernel holds that a change of the nodes ``touched``
        (the engine's ``touched_since``; None: any node) made stale."""
        found = stale(self.ns, touched)
        for parent, name, _, removed in found.entries:
            log.debug("invalidating %s (%s elsewhere)", self.ns.path(parent, name),
                      "removed" if removed else "renamed")
        for identity in found.gone:
            self.ns.inodes.snapshot_gone(identity)
        if found.entries or found.attributes:
            await self.links.refresh([(parent, name) for parent, name, _, _ in found.entries],
                                     found.attributes)
