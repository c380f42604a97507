"""Directory listings of the tree, and the kernel's cache of them.

Without help, the kernel sends every listing of a FUSE directory to the daemon:
``ls`` of a node with 10,000 children took about 900 ms in the test guest each
time, warm or not (10,000 entries in about 50 READDIR requests, each entry's
attributes built in Python).  When opendir's reply carries ``FOPEN_CACHE_DIR``
and ``FOPEN_KEEP_CACHE`` (Linux 4.20 and newer) the kernel keeps the entries
and answers later listings itself.  pyfuse3 3.5.0 cannot send those flags;
contrib/pyfuse3's second patch lets opendir return a ``FileInfo`` with
``cache_readdir`` (:data:`PYFUSE3_CAN_CACHE` says whether this pyfuse3 has it;
without it listings are answered by the daemon every time, as before).

The kernel drops a cached listing (``fs/fuse/readdir.c``) when the daemon
changes an entry of the directory through the kernel (mkdir, rmdir, rename),
when the daemon invalidates the directory's inode, and, when a listing starts,
if the directory's mtime is no longer the one it had when the cache was
filled.  Every directory of the tree has an mtime that moves whenever its
entries change (:meth:`Namespace.attrs`), so a change made by any front end
reaches the kernel as soon as it learns the directory's new attributes: at
once for ``.dmfs/by-name``, whose attributes are never cached, and for nodes
and the root on the attribute invalidation that follows any change made
elsewhere than through the tree.

The entries are computed when a listing starts (offset 0), not at opendir:
the kernel fetches the directory's mtime just before it asks for offset 0 and
stamps its cache with that mtime, so the entries must be at least as new as
the mtime.  Later offsets of the same listing read the same entries, so that a
listing split over several requests is one consistent picture.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import pyfuse3

from dmfs.fuse import inodes
from dmfs.fuse.inodes import CONTROL_ENTRIES, EntryRole
from dmfs.fuse.names import encode_key
from dmfs.fuse.namespace import CONTROL, FS, Namespace

#: this pyfuse3 lets opendir ask the kernel to cache listings (contrib/pyfuse3)
PYFUSE3_CAN_CACHE: bool = hasattr(pyfuse3.FileInfo(), "cache_readdir")


@dataclass
class _Listing:
    """One open directory handle."""

    inode: int
    #: computed when a listing starts (offset 0); None before
    entries: list[tuple[bytes, int]] | None = field(default=None)


class Listings:
    """The open directory handles of the tree and what each lists."""

    def __init__(self, ns: Namespace, *, cache: bool | None = None) -> None:
        self.ns = ns
        self.cache = PYFUSE3_CAN_CACHE if cache is None else cache
        self._open: dict[int, _Listing] = {}
        self._next_fh = 1

    def __len__(self) -> int:
        return len(self._open)

    def open(self, inode: int) -> int | pyfuse3.FileInfo:
        """A handle for listing directory ``inode`` (opendir's answer): with the
        flags that let the kernel cache the listing when pyfuse3 can send them.
        ENOTDIR for a link, ENOENT for an inode that is gone."""
        containerd = (inode == inodes.CONTAINERD_DIR
                      or self.ns.inodes.namespace_of(inode) is not None)
        if inode not in (inodes.ROOT, inodes.CONTROL_DIR, inodes.BY_NAME_DIR) \
                and not containerd and self.ns.node(inode) is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR if self.ns.snapshot(inode) else errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = _Listing(inode)
        # .dmfs/containerd's names come from labels, whose changes move no mtime:
        # listed by the daemon every time (they are small).
        if not self.cache or containerd:
            return fh
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    def directory_of(self, fh: int) -> int:
        """The directory an open handle lists (the root for an unknown handle)."""
        listing = self._open.get(fh)
        return listing.inode if listing is not None else inodes.ROOT

    async def entries(self, fh: int, start: int) -> list[tuple[bytes, int]]:
        """The (name, inode) entries of an open directory; computed again at
        offset 0 (a listing starting, or rewinddir), kept for later offsets."""
        listing = self._open.get(fh)
        if listing is None:
            return []
        if start == 0 or listing.entries is None:
            listing.entries = await self._compute(listing.inode)
        return listing.entries

    def release(self, fh: int) -> None:
        self._open.pop(fh, None)

    async def _compute(self, inode: int) -> list[tuple[bytes, int]]:
        ns = self.ns
        if inode == inodes.ROOT:
            return [(CONTROL, inodes.CONTROL_DIR), *ns.node_entries(None)]
        if inode == inodes.CONTROL_DIR:
            return sorted(CONTROL_ENTRIES.items())
        if inode == inodes.BY_NAME_DIR:
            return [(os.fsencode(encode_key(info.key)), ns.link_inode(EntryRole.BY_NAME, info))
                    for info in await ns.engine.walk()]
        containerd = ns.containerd_entries(inode)
        if containerd is not None:
            return containerd
        node = ns.node(inode)
        if node is None:
            return []  # removed since opendir: an empty directory, as rmdir leaves it
        return [(FS, ns.inodes.inode(EntryRole.FS_LINK, node.identity)),
                *ns.node_entries(node.key)]
