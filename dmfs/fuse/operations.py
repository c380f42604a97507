"""The pyfuse3 handlers: the snapshot namespace of DESIGN.md §1.

Only the namespace passes through here; file data never does (each node's
``fs`` is a symlink to the snapshot's ext4 mount).  Every refused operation
answers the documented errno and logs one line saying why.  Permission checks
are made here, not by the kernel (no ``default_permissions``): browsing is
open to everyone, changes need root or the admin group, and each refusal can
then be logged.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from typing import NoReturn

import pyfuse3

from dmfs.fuse import coherence, control, inodes, linkcache, listings, requests, xattrs
from dmfs.fuse.boundary import errno_of, failsafe, refuse
from dmfs.fuse.inodes import EntryRole
from dmfs.fuse.names import BadName, NameTooLong, check_new_key, decode_entry, display
from dmfs.fuse.namespace import FS, Namespace
from dmfs.fuse.permissions import is_admin, why_not_admin
from dmfs.pool import Info, Kind, SnapshotError, Snapshotter

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
#: what the tree's snapshots are marked with: only the tree removes them (rmdir)
MADE_BY_TREE = "tree"


@requests.counted
class DmfsOperations(pyfuse3.Operations):
    """The namespace served at the mountpoint, backed by a :class:`Snapshotter`.

    Every handler is wrapped in :func:`~dmfs.fuse.boundary.failsafe`: no error
    of any kind ends the daemon.  The kernel caches ``fs`` link targets when
    pyfuse3 can ask for it (:mod:`dmfs.fuse.linkcache`); the view then drops
    the kernel's copy whenever a snapshot's mount goes away."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    #: the kernel caches fs link targets (pyfuse3 built with contrib/pyfuse3)
    enable_cache_symlinks = linkcache.PYFUSE3_CAN_ASK

    def __init__(self, engine: Snapshotter, admin_gid: int | None = None,
                 on_change: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.admin_gid = admin_gid
        self.ns = Namespace(engine, admin_gid)
        self.inodes = self.ns.inodes
        self.listings = listings.Listings(self.ns)
        self._open_files: dict[int, bytes] = {}
        self._control_sizes: dict[int, int] = {}
        self._next_fh = 1
        # How the handlers' attribute changes reach the kernel; tests may replace
        # it.  On this thread: with attr_only the kernel only bumps the inode's
        # attribute version and takes no lock that a request holds.  What other
        # front ends change reaches the kernel through the follower, in a
        # worker thread (coherence.KernelFollower: an entry's invalidation takes
        # the directory's lock, which a request waiting for this loop may hold).
        self._invalidate = on_change or (lambda inode: pyfuse3.invalidate_inode(
            inode, attr_only=True))
        self.requests: Counter[str] = Counter()  # by handler (requests.counted)
        self.links = linkcache.LinkInvalidator(
            self.inodes, lambda inode: pyfuse3.invalidate_inode(inode, attr_only=False))
        #: what other front ends change reaches the kernel through it
        self.follower = coherence.KernelFollower(self.ns, self.links)
        engine.before_unmount = self._unmount_coming

    def init(self) -> None:
        """pyfuse3 has negotiated with the kernel: say whether fs links are cached."""
        self.links.state = linkcache.negotiated(getattr(self, "cache_symlinks_granted", None))
        linkcache.announce(self.links.state, self.engine.config.runtime_dir)

    async def _unmount_coming(self, device_id: int) -> None:
        """The engine is about to take a snapshot's files away (its hook)."""
        info = self.engine.by_device(device_id)
        if info is not None:
            await self.links.drop(info.identity)

    # ------------------------------------------------------------------ helpers
    def _refuse(self, code: int, operation: str, path: str, why: str) -> NoReturn:
        refuse(code, operation, path, why)

    def _engine_refusal(self, error: SnapshotError, operation: str, path: str) -> NoReturn:
        refuse(errno_of(error), operation, path, str(error))

    def _check_admin(self, ctx: pyfuse3.RequestContext, operation: str, path: str) -> None:
        if not is_admin(ctx, self.admin_gid):
            self._refuse(errno.EACCES, operation, path, why_not_admin(ctx, self.admin_gid))

    def _existing_node(self, parent_inode: int, name: bytes, operation: str, path: str,
                       done: str) -> Info:
        """The snapshot node ``name`` names: ENOENT if nothing, EPERM if not a node."""
        inode = self.ns.child_inode(parent_inode, name)
        node = self.ns.node(inode) if inode else None
        if node is None:
            if inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self._refuse(errno.EPERM, operation, path, f"only snapshot nodes can be {done}")
        return node

    # ------------------------------------------------------------------ attributes
    async def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = self.ns.fixed_attrs(inode)
        if attrs is not None:
            return attrs
        if inode in (inodes.POOL_FILE, inodes.SNAPSHOTS_FILE):
            # The size of the last rendering (files are read with direct_io, to
            # their end whatever the size says): a stat need not render 10,000
            # snapshots.
            if inode not in self._control_sizes:
                self._control_sizes[inode] = len(await self._control_content(inode))
            return self.ns.attrs(inode, stat.S_IFREG | 0o444,
                                 size=self._control_sizes[inode], timeout=0)
        attrs = self.ns.snapshot_attrs(inode)
        if attrs is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attrs

    @failsafe
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return await self._getattr(inode)

    @failsafe
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        current = await self._getattr(inode)
        path = self.ns.path(inode)
        self._check_admin(ctx, "setattr", path)
        # mkdir -m may chmod the new node to the mode it already has: allow that.
        unchanged = (fields.update_mode and stat.S_IMODE(attr.st_mode)
                     == stat.S_IMODE(current.st_mode)
                     and not (fields.update_uid or fields.update_gid or fields.update_size
                              or fields.update_atime or fields.update_mtime))
        if not unchanged:
            self._refuse(errno.EPERM, "setattr", path,
                         "owners, modes and times in the tree follow the snapshots")
        return current

    # ------------------------------------------------------------------ lookup
    @failsafe
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        inode = self.ns.child_inode(parent_inode, name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = await self._getattr(inode)
        self.inodes.looked_up(inode)
        self.inodes.known_as(inode, parent_inode, name)
        return attrs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # No reply goes back for a forget, and an exception would end the
        # daemon: nothing may escape from here.
        try:
            for inode, count in inode_list:
                self.inodes.forget(inode, count, still_exists=self.ns.snapshot(inode) is not None)
        except Exception:
            log.exception("unexpected error in the forget handler (ignored)")

    # ------------------------------------------------------------------ directories
    @failsafe
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> int | pyfuse3.FileInfo:
        return self.listings.open(inode)

    @failsafe
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self.listings.entries(fh, start_id)
        directory = self.listings.directory_of(fh)
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                attrs = await self._getattr(inode)
            except pyfuse3.FUSEError:
                continue  # removed since the listing started
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return
            self.inodes.looked_up(inode)
            self.inodes.known_as(inode, directory, name)

    @failsafe
    async def releasedir(self, fh: int) -> None:
        self.listings.release(fh)

    @failsafe
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        found = self.ns.snapshot(inode)
        if found is None or found[0] is EntryRole.NODE:
            raise pyfuse3.FUSEError(errno.EINVAL if found else errno.ENOENT)
        role, info = found
        if role is not EntryRole.FS_LINK:
            return self.ns.served_target(inode, role, info)
        try:
            await self.engine.mountpoint(info.key)
        except SnapshotError as error:
            log.error("cannot make the files of %s available: %s", self.ns.path(inode), error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        # Always this spelling: the kernel may cache it, cut to the size getattr gave.
        return self.ns.fs_target(info)

    # ------------------------------------------------------------------ mkdir
    def _new_key(self, name: bytes, operation: str, path: str) -> str:
        """The key a new name stands for; refused (ENAMETOOLONG, EINVAL) if none."""
        try:
            key = decode_entry(name)
            check_new_key(key)
        except NameTooLong as error:
            self._refuse(errno.ENAMETOOLONG, operation, path, str(error))
        except BadName as error:
            self._refuse(errno.EINVAL, operation, path, str(error))
        return key

    @failsafe
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.ns.path(parent_inode, name)
        self._check_admin(ctx, "mkdir", path)
        if parent_inode == inodes.ROOT:
            parent_key = None
        else:
            parent = self.ns.node(parent_inode)
            if parent is None:
                self._refuse_parentless_mkdir(parent_inode, path)
            if parent.kind is not Kind.COMMITTED:
                self._refuse(errno.EPERM, "mkdir", path,
                             f"the parent is {parent.kind.value}; only committed snapshots "
                             "can have children")
            parent_key = parent.key
        key = self._new_key(name, "mkdir", path)
        # No owner-write bit asks for a read-only view (mkdir -m 0555).
        make = self.engine.prepare if mode & stat.S_IWUSR else self.engine.view
        try:
            info = await make(key, parent_key, made_by=MADE_BY_TREE)
        except SnapshotError as error:
            self._engine_refusal(error, "mkdir", path)
        log.info("mkdir %s: %s snapshot %r (device %d)", path, info.kind.value, key,
                 info.device_id)
        attrs = self.ns.node_attrs(info)
        self.inodes.looked_up(attrs.st_ino)
        self.inodes.known_as(attrs.st_ino, parent_inode, name)
        return attrs

    def _refuse_parentless_mkdir(self, parent_inode: int, path: str) -> NoReturn:
        """mkdir in a directory that is no node: ENOENT in a node removed since the
        kernel looked it up (by containerd, through the snapshots socket), as in
        any removed directory; EPERM anywhere else."""
        entry = self.inodes.get(parent_inode)
        if entry is not None and entry.role is EntryRole.NODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._refuse(errno.EPERM, "mkdir", path, "only nodes and the root hold snapshots")

    # ------------------------------------------------------------------ rename
    @failsafe
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        path = self.ns.path(parent_inode_old, name_old)
        self._check_admin(ctx, "rename", path)
        if flags & ~RENAME_NOREPLACE:
            self._refuse(errno.EINVAL, "rename", path,
                         "only plain renames (no RENAME_EXCHANGE or WHITEOUT)")
        if parent_inode_old != parent_inode_new:
            self._refuse(errno.EPERM, "rename", path,
                         f"to {self.ns.path(parent_inode_new, name_new)}: a snapshot's "
                         "lineage cannot change (rename within its directory only)")
        source = self._existing_node(parent_inode_old, name_old, "rename", path, "renamed")
        new_key = self._new_key(name_new, "rename", path)
        if self.engine.get(new_key) is not None or (name_new == FS and parent_inode_new
                                                     != inodes.ROOT):
            self._refuse(errno.EEXIST, "rename", path,
                         f"{display(name_new)!r} exists; renames never replace")
        if source.kind is Kind.VIEW:
            self._refuse(errno.EPERM, "rename", path, "a view cannot be committed or renamed")
        try:
            if source.kind is Kind.ACTIVE:
                info = await self.engine.commit(new_key, source.key)
                log.info("committed %r as %r", source.key, new_key)
            else:
                info = await self.engine.rename(source.key, new_key)
                log.info("renamed %r to %r", source.key, new_key)
        except SnapshotError as error:
            self._engine_refusal(error, "rename", path)
        # Mode (commit) and times changed: the kernel would keep the old ones.
        self._invalidate(self.ns.node_inode(info))
        if source.kind is Kind.ACTIVE:  # unmounted: mounted read-only on next use
            await self.links.drop(info.identity)
        self.inodes.known_as(self.ns.node_inode(info), parent_inode_new, name_new)

    # ------------------------------------------------------------------ rmdir
    @failsafe
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self.ns.path(parent_inode, name)
        self._check_admin(ctx, "rmdir", path)
        node = self._existing_node(parent_inode, name, "rmdir", path, "removed")
        try:
            await self.engine.remove(node.key)
        except SnapshotError as error:
            self._engine_refusal(error, "rmdir", path)
        log.info("removed snapshot %r", node.key)
        # Device ids are reused: a kernel still holding the old link (an O_PATH
        # descriptor, a walk under way) must not follow it into a new snapshot.
        await self.links.drop(node.identity)
        self.inodes.snapshot_gone(node.identity)

    # ------------------------------------------------------------------ refused
    async def _refuse_change(self, operation: str, parent_inode: int, name: bytes,
                             ctx: pyfuse3.RequestContext) -> NoReturn:
        path = self.ns.path(parent_inode, name)
        self._check_admin(ctx, operation, path)
        what = "the fs entry belongs to its node" if name == FS else (
            "the tree holds only snapshot nodes; files go under a node's fs")
        self._refuse(errno.EPERM, operation, path, what)

    @failsafe
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.ns.child_inode(parent_inode, name) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._refuse_change("unlink", parent_inode, name, ctx)

    @failsafe
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._refuse_change("symlink", parent_inode, name, ctx)

    @failsafe
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._refuse_change("mknod", parent_inode, name, ctx)

    @failsafe
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                          pyfuse3.EntryAttributes]:
        await self._refuse_change("create", parent_inode, name, ctx)

    @failsafe
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._refuse_change("link", new_parent_inode, new_name, ctx)

    # ------------------------------------------------------------------ .dmfs files
    async def _control_content(self, inode: int) -> bytes:
        if inode == inodes.POOL_FILE:
            content = await control.pool_file(self.engine) + (
                f"fs_links: {self.links.state.describe()}\n"
                f"fuse_requests: {requests.summary(self.requests)}\n").encode()
        else:
            content = await control.snapshots_file(self.engine)
        self._control_sizes[inode] = len(content)
        return content

    @failsafe
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode not in (inodes.POOL_FILE, inodes.SNAPSHOTS_FILE):
            raise pyfuse3.FUSEError(errno.EISDIR if self.ns.node(inode) else errno.EINVAL)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._refuse(errno.EACCES, "open for writing", self.ns.path(inode),
                         ".dmfs is read-only")
        fh = self._next_fh
        self._next_fh += 1
        self._open_files[fh] = await self._control_content(inode)
        # The content changes behind the kernel's back: never cache it.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @failsafe
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._open_files.get(fh, b"")[off:off + size]

    @failsafe
    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)

    # ------------------------------------------------------------------ xattrs
    @failsafe
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # The tree has only user.* attributes.  ENOTSUP rather than ENODATA
            # for the others: ls -l asks every entry for security.selinux and
            # both POSIX ACL names (3 round trips an entry), and stops asking on
            # a device that answered ENOTSUP once.  In the guest, ls -l of a
            # node with 1,000 children: 3,004 GETXATTRs, 1.6 s; then 2, 0.35 s
            # (an ext4 directory with 1,000 subdirectories: 0.32 s).
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self.ns.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await xattrs.value_of(self.engine, node, name)

    @failsafe
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.ns.node(inode)
        return xattrs.names_of(node) if node is not None else []

    @failsafe
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._update_label(inode, name, value, ctx, "setxattr")

    @failsafe
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._update_label(inode, name, None, ctx, "removexattr")

    async def _update_label(self, inode: int, name: bytes, value: bytes | None,
                            ctx: pyfuse3.RequestContext, operation: str) -> None:
        path = f"{self.ns.path(inode)} [{display(name)}]"
        self._check_admin(ctx, operation, path)
        node = self.ns.node(inode)
        if node is None:
            self._refuse(errno.ENOTSUP, operation, path, "only snapshot nodes have labels")
        try:
            label, text = xattrs.label_change(node, name, value)
        except xattrs.Refused as refusal:
            if refusal.code == errno.ENODATA:  # nothing to remove: an answer, not a refusal
                raise pyfuse3.FUSEError(errno.ENODATA) from None
            self._refuse(refusal.code, operation, path, str(refusal))
        try:
            await self.engine.update(node.key, {label: text})
        except SnapshotError as error:
            self._engine_refusal(error, operation, path)
        self._invalidate(self.ns.node_inode(node))

    # ------------------------------------------------------------------ misc
    @failsafe
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if not mode & os.W_OK:
            return True
        if self.ns.is_control_dir(inode) or inode in (inodes.POOL_FILE,
                                                      inodes.SNAPSHOTS_FILE):
            return False
        return is_admin(ctx, self.admin_gid)

    @failsafe
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = await self.engine.pool_info()
        result = pyfuse3.StatvfsData()
        result.f_bsize = result.f_frsize = info["block_size"]
        result.f_blocks = info["data_total_blocks"]
        result.f_bfree = result.f_bavail = info["data_total_blocks"] - info["data_used_blocks"]
        result.f_files = 2**24 - 1
        result.f_ffree = result.f_favail = max(0, result.f_files - info["devices"])
        result.f_namemax = 255
        return result
