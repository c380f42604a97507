"""The snapshot engine: containerd's snapshotter semantics on a dm-thin pool.

prepare / view / commit / remove / stat / walk / usage / update (+ rename of
committed snapshots, and :meth:`Snapshotter.mountpoint` for the file data).
Changes to the snapshot tree are serialised by one lock; a device's changes by
its lock (:mod:`dmfs.pool.devices`); reads wait for neither.  Every change is
journaled before the device-mapper operation it announces, so start-up
reconciliation (:mod:`dmfs.pool.reconcile`) can finish or roll back whatever
a crash interrupted.

Each operation's kernel work runs as one sequence in a worker thread
(:mod:`dmfs.pool.steps`, handed off by :meth:`dmfs.pool.store.Store.run`),
which touches only the kernel and the journal; the in-memory state changes on
the trio thread when the sequence is over.

Every public method raises only the engine's typed errors
(:mod:`dmfs.pool.errors`): a failed dm operation, mount or journal write
becomes InUse, NoSpace or PoolError, naming the operation and the snapshot.

About 500 lines, and one piece on purpose: this is containerd's Snapshotter
interface and nothing else (the kernel sequences are in steps, the tables in
devices and mounts, the reads in reader), and each method's order of locks
(engine lock, then device lock, then the store) is what makes concurrent
requests safe; split by method, that order would be spread over files.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import trio

from dmfs.config import Config
from dmfs.filesystems import mount_options
from dmfs.pool.devices import DeviceTable
from dmfs.pool.dm import DeviceMapper
from dmfs.pool.drivers import open_driver
from dmfs.pool.errors import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    InvalidArgument,
    NoSpace,
    PoolError,
    SnapshotError,
    as_snapshot_error,
    translated,
)
from dmfs.pool.housekeeping import check_removal, ensure_base
from dmfs.pool.info import BlockDevice, Info
from dmfs.pool.journal import Journal
from dmfs.pool.limits import check_key, check_labels
from dmfs.pool.metadata import (
    Device,
    DeviceState,
    Kind,
    Snapshot,
    now,
    read_metadata,
)
from dmfs.pool.mounts import MountTable, expire_idle_mounts
from dmfs.pool.pending import Pending
from dmfs.pool.poolwatch import PoolWatch, watch_pool
from dmfs.pool.reader import SnapshotReader
from dmfs.pool.reconcile import reconcile
from dmfs.pool.steps import Steps
from dmfs.pool.store import Store
from dmfs.pool.thinpool import ThinPool
from dmfs.pool.udev import DmEvent, DmWatcher

log = logging.getLogger(__name__)

async def _nothing_handed_out(device_id: int) -> None:
    """The default :attr:`Snapshotter.before_unmount`: no front end to tell."""


class Snapshotter(SnapshotReader):
    """One thin pool's snapshots.  Use :meth:`open`; all methods are async."""

    def __init__(self, config: Config, dm: DeviceMapper) -> None:
        self.config = config
        self.dm = dm
        self.store = Store(Journal(config.state_dir))
        self.watcher = DmWatcher(config.device_prefix, self._removed)
        self.pool = ThinPool(dm, config.pool_name)
        self.pool_watch = PoolWatch(self.pool)
        self.devices = DeviceTable(self.store, self.pool, discard_blocks=config.discard_blocks)
        self.mounts = MountTable(config.mount_dir, config.fs_type, dm.device_path)
        self.steps = Steps(self.devices, self.mounts, self.pool, config)
        self._lock = trio.Lock()
        self._services: trio.Nursery | None = None  # watchers, reaper: cancelled at stop
        self._removals: trio.Nursery | None = None  # async removals: drained before stop
        self._background_removals = Pending()
        #: awaited with the device id before a snapshot's files leave the path
        #: mount_path() gives (before an idle expiry, a commit or a remove
        #: unmounts them, whichever front end asked): a front end drops what it
        #: handed out (the FUSE view: the kernel's cached fs link).  It runs
        #: before the device's lock is taken: dropping a cached link can wait
        #: for a path walk that is asking mountpoint() for that very device.
        self.before_unmount: Callable[[int], Awaitable[None]] = _nothing_handed_out

    # ================================================================ lifecycle
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: Config, dm: DeviceMapper | None = None
                   ) -> AsyncIterator[Snapshotter]:
        """Start the engine (replay, reconcile, base device), stop it on exit:
        background removals finish first, then every snapshot is unmounted and
        its device deactivated, then the journal is closed."""
        own_driver = dm is None
        if dm is None:
            dm = open_driver(config.driver, udev_timeout=config.activation_timeout)
        engine = cls(config, dm)
        try:
            async with trio.open_nursery() as services:
                engine._services = services
                try:
                    await services.start(engine.watcher.run)
                    await engine._start()
                    await services.start(watch_pool, engine.pool_watch, dm)
                    services.start_soon(expire_idle_mounts, engine.mounts, config.idle_timeout,
                                        engine._expire_idle)
                    async with trio.open_nursery() as removals:
                        engine._removals = removals
                        yield engine
                finally:
                    engine._removals = None
                    with trio.CancelScope(shield=True):
                        await engine._stop()
                    services.cancel_scope.cancel()
        finally:
            if own_driver:  # only once no task can use it any more
                dm.close()

    async def _start(self) -> None:
        journal = self.store.journal
        self.store.meta = await trio.to_thread.run_sync(lambda: read_metadata(journal.open()))
        if self.meta.pool_name is None:
            await self.store.write({"type": "header", "format": self.meta.FORMAT,
                                    "pool": self.config.pool_name})
        elif self.meta.pool_name != self.config.pool_name:
            raise PoolError(f"{journal.directory} belongs to pool {self.meta.pool_name!r}, "
                            f"not {self.config.pool_name!r}")
        try:
            await trio.to_thread.run_sync(self.pool.attach)
            self.mount_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            async with self._lock:
                await reconcile(self.store, self.devices, self.mounts, self.pool, self.config)
                await ensure_base(self.store, self.devices, self.steps, self.config)
                await self.store.compact(force=journal.records_since_checkpoint > 0)
        except OSError as error:
            raise as_snapshot_error(error, f"starting on thin pool {self.pool.name}") from error

    async def _stop(self) -> None:
        """Unmount every snapshot, deactivate its device (unless a client holds
        it), close the journal."""
        try:
            if self.store.journal.is_open and self.meta.pool_name is not None:
                async with self._lock:
                    # Mounted ones, and those made live for a client (block_device).
                    live = {d.id for d in list(self.meta.devices.values()) if d.is_live}
                    for device_id in sorted(set(self.mounts.ids()) | live):
                        async with self.devices.lock(device_id):
                            await self.store.run(self.steps.shut_down, device_id,
                                                 self.devices.get(device_id),
                                                 self.mounts.get(device_id))
                    await self.store.compact(force=True)
        except SnapshotError as error:
            log.error("stopping the engine: %s", error)
        finally:
            self.store.journal.close()

    # ================================================================ prepare / view
    async def prepare(self, key: str, parent: str | None = None,
                      labels: Mapping[str, str] | None = None, *,
                      made_by: str | None = None) -> Info:
        """containerd Prepare: a writable snapshot of ``parent`` (empty without one),
        activated and mounted read-write before this returns.  ``made_by`` names
        the front end whose snapshot it is (:attr:`Snapshot.made_by`)."""
        return await self._create(key, parent, labels or {}, Kind.ACTIVE, made_by=made_by)

    async def view(self, key: str, parent: str | None = None,
                   labels: Mapping[str, str] | None = None, *, live: bool = False,
                   made_by: str | None = None) -> Info:
        """containerd View: a read-only snapshot of ``parent``, mounted on first use;
        with ``live``, its device is activated (read-only) before this returns,
        for a client that mounts it itself (:meth:`block_device`)."""
        return await self._create(key, parent, labels or {}, Kind.VIEW, live, made_by)

    @translated("prepare")
    async def _create(self, key: str, parent: str | None, labels: Mapping[str, str],
                      kind: Kind, live: bool = False, made_by: str | None = None) -> Info:
        check_key(key)
        check_labels(labels)
        async with self._lock:
            if key in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {key!r} already exists "
                                    f"({self.meta.snapshots[key].kind})")
            if parent is not None:
                parent_snapshot = self._get(parent)
                if parent_snapshot.kind is not Kind.COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is {parent_snapshot.kind}, "
                                          "not committed")
                origin_id = parent_snapshot.device_id
            else:
                origin_id = self._base().id
            candidates = self.devices.candidate_ids()
            if not candidates:
                raise NoSpace("no free thin device id in the pool (2^24 - 1 in use)")
            stamp = now()
            template = Snapshot(key=key, kind=kind, parent=parent, device_id=0,
                                labels=dict(labels), created=stamp, updated=stamp,
                                made_by=made_by)
            async with self.devices.lock(origin_id):
                origin = self.devices.get(origin_id)
                if origin is None or origin.state is DeviceState.FAULTY:
                    why = origin.error if origin else "its device is missing"
                    raise FailedPrecondition(f"parent {parent!r} is faulty: {why}")
                await self.store.run(self.steps.prepare, origin, candidates, template, live)
            await self.store.compact()
            return self._info(self._get(key))

    def _base(self) -> Device:
        base = self.devices.get(self.meta.base_id) if self.meta.base_id is not None else None
        if base is None:
            raise PoolError("the base device is missing (restart dmfs to recreate it)")
        return base

    # ================================================================ file access
    @translated("mount")
    async def mountpoint(self, key: str) -> Path:
        """Where the snapshot's files are: mounts it first if needed (committed
        snapshots and views read-only, active ones read-write)."""
        device_id = self._get(key).device_id
        mount = self.mounts.get(device_id)
        # A mount on its way out (an idle expiry, a commit, a remove): wait for
        # the change rather than answer a path that is about to be unmounted.
        if mount is not None and not mount.unmounting:
            mount.touch()
            return mount.path
        async with self.devices.lock(device_id):
            mount = self.mounts.get(device_id)
            if mount is not None:
                mount.touch()
                return mount.path
            snapshot, device = self._usable(key)  # it may have changed while we waited
            read_only = snapshot.kind is not Kind.ACTIVE
            mount = await self.store.run(self.steps.make_available, device, read_only)
            return mount.path

    def _usable(self, key: str) -> tuple[Snapshot, Device]:
        """The snapshot and its device, when its files can be made available
        (under the device's lock); FailedPrecondition when faulty or mid-commit."""
        snapshot = self._get(key)
        device = self.devices.get(snapshot.device_id)
        if device is None or device.state is DeviceState.FAULTY:
            why = device.error if device else "its device is missing"
            raise FailedPrecondition(f"snapshot {key!r} is faulty: {why}")
        if snapshot.pending is not None:
            raise FailedPrecondition(f"snapshot {key!r} has a {snapshot.pending} in progress")
        return snapshot, device

    @translated("mounts")
    async def block_device(self, key: str) -> BlockDevice:
        """containerd Mounts: the snapshot's block device, made live (read-write
        for an active snapshot, read-only otherwise) for a client that mounts it
        itself.  An active snapshot is also mounted for dmfs's own use, as always;
        the kernel shares one superblock between the two mounts, read-only or
        read-write alike, as the kinds make them.

        While the client holds the device (mounted, or open), dmfs does not
        deactivate it: Commit and Remove refuse (InUse) and change nothing, idle
        expiry unmounts dmfs's own mount only, and a stop leaves it live."""
        snapshot = self._get(key)
        device = self.devices.get(snapshot.device_id)
        lock = self.devices.lock(snapshot.device_id)
        if lock.locked() or not self._ready_for_client(snapshot, device):
            async with lock:
                snapshot, device = self._usable(key)  # it may have changed while we waited
                if snapshot.kind is Kind.ACTIVE and device.id not in self.mounts:
                    await self.store.run(self.steps.make_available, device, False)
                elif not device.is_live:
                    await self.store.run(self.steps.activate, device, True)
                device = self.devices.get(snapshot.device_id)
                assert device is not None
        return BlockDevice(path=self.dm.device_path(device.name), fs_type=self.config.fs_type,
                           read_only=snapshot.kind is not Kind.ACTIVE,
                           options=tuple(o for o in mount_options(self.config.fs_type).split(",")
                                         if o))

    def _ready_for_client(self, snapshot: Snapshot, device: Device | None) -> bool:
        """The device is live as a client needs it, with nothing to wait for."""
        if device is None or not device.is_live or snapshot.pending is not None:
            return False
        return snapshot.kind is not Kind.ACTIVE or device.id in self.mounts

    async def _expire_idle(self, device_id: int) -> bool:
        return await self._expire(device_id, idle=self.config.idle_timeout)

    async def _expire(self, device_id: int, *, idle: float = 0.0) -> bool:
        """Unmount a read-only snapshot unused for ``idle`` seconds and deactivate
        its device, unless its files are in use; True when it did."""
        mount = self.mounts.get(device_id)
        if mount is None or not mount.read_only or mount.idle_for() < idle:
            return False
        used = mount.last_used
        await self.before_unmount(device_id)
        async with self.devices.lock(device_id):
            if self.mounts.get(device_id) is not mount or mount.last_used != used:
                return False  # used (or changed) meanwhile
            try:
                with self.mounts.taking_down(device_id):
                    return await self.store.run(self.steps.expire,
                                                self.devices.get(device_id), device_id, mount)
            except SnapshotError as error:
                log.warning("cannot unmount idle snapshot device %d: %s", device_id, error)
                return False

    async def expire_idle(self) -> int:
        """Unmount every read-only snapshot not in use now; returns how many."""
        count = 0
        for device_id in self.mounts.ids():
            count += await self._expire(device_id)
        return count

    # ================================================================ commit / rename
    @translated("commit")
    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> Info:
        """containerd Commit: the active snapshot ``key`` becomes the committed,
        read-only ``name``.  Refused (InUse) while its files are in use, with
        everything left as it was; any other failure puts it back as it was."""
        check_key(name, "snapshot name")
        if labels is not None:
            check_labels(labels)
        async with self._lock:
            snapshot = self._get(key)
            if snapshot.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is {snapshot.kind}, not active")
            if name in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            await self.before_unmount(snapshot.device_id)
            async with self.devices.lock(snapshot.device_id):
                device = self.devices.get(snapshot.device_id)
                if device is None or device.state is DeviceState.FAULTY:
                    why = device.error if device else "its device is missing"
                    raise FailedPrecondition(f"snapshot {key!r} is faulty: {why}")
                try:
                    with self.mounts.taking_down(device.id):
                        await self.store.run(self.steps.commit, snapshot, device,
                                             self.mounts.get(device.id), name, labels)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        current = self.meta.snapshots.get(key)
                        if current is not None and current.pending:
                            await self._undo_commit(current)
                    raise
            await self.store.compact()
            return self._info(self._get(name))

    async def _undo_commit(self, snapshot: Snapshot) -> None:
        """Put an interrupted commit back: live, mounted read-write, not pending."""
        device = self.devices.get(snapshot.device_id)
        if device is None:
            return
        try:
            await self.store.run(self.steps.undo_commit, snapshot, device,
                                 self.mounts.get(device.id))
        except (SnapshotError, OSError) as error:
            log.error("putting snapshot %r back after a failed commit failed (the next "
                      "start will): %s", snapshot.key, error)

    @translated("rename")
    async def rename(self, key: str, new_key: str) -> Info:
        """Rename a committed snapshot (metadata only; children follow)."""
        check_key(new_key, "snapshot name")
        async with self._lock:
            snapshot = self._get(key)
            if snapshot.kind is not Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is {snapshot.kind}; only committed "
                                         "snapshots can be renamed")
            if new_key in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {new_key!r} already exists")
            await self.store.write({"type": "rename", "key": key, "name": new_key,
                                    "updated": now()})
            await self.store.compact()
            return self._info(self._get(new_key))

    # ================================================================ update
    @translated("update")
    async def update(self, key: str, labels: Mapping[str, str | None], *,
                     replace_all: bool = False) -> Info:
        """containerd Update of labels: set the given ones, delete those set to
        None; with ``replace_all`` the labels become exactly the given ones (those
        set to None left out)."""
        check_labels(labels)
        async with self._lock:
            snapshot = self._get(key)
            merged = {} if replace_all else dict(snapshot.labels)
            for name, value in labels.items():
                if value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = value
            changed = replace(snapshot, labels=merged, updated=now())
            await self.store.write({"type": "snapshot", "snapshot": changed.to_json()})
            await self.store.compact()
            return self._info(self._get(key))

    # ================================================================ remove
    @translated("remove")
    async def remove(self, key: str, *, background: bool | None = None) -> None:
        """containerd Remove.  HasChildren with child snapshots; InUse (nothing
        removed) while its files are in use.  With ``background`` (unset: the
        config's ``async_remove``) the thin device is deleted after this returns,
        once the removal is journaled (a crash before the deletion finishes
        leaves it to the next start); :meth:`cleanup` waits for it."""
        async with self._lock:
            snapshot = self._get(key)
            children = self.meta.children(key)
            if children:
                names = ", ".join(repr(c.key) for c in children[:3])
                raise HasChildren(f"snapshot {key!r} has {len(children)} child snapshot(s): "
                                  f"{names}")
            device_id = snapshot.device_id
            await self.before_unmount(device_id)
            async with self.devices.lock(device_id):
                device = self.devices.get(device_id)
                # Whether it may be live, known before the record makes it Removing.
                live = device is not None and device.may_be_live
                with self.mounts.taking_down(device_id):
                    await self.store.run(self.steps.remove, snapshot, device,
                                         self.mounts.get(device_id))
        if device is None:
            return
        self._background_removals.start()
        if background is None:
            background = self.config.async_remove
        if background and self._removals is not None:
            self._removals.start_soon(self._finish_removal, device_id, live)
        else:
            await self._finish_removal(device_id, live)

    async def _finish_removal(self, device_id: int, live: bool) -> None:
        """Deactivate and delete a Removing device (outside the engine lock, so a
        big delete does not hold up other operations)."""
        try:
            async with self.devices.lock(device_id):
                device = self.devices.get(device_id)
                if device is not None:
                    await self.store.run(self.steps.destroy, device, live)
        except SnapshotError as error:
            log.error("removing thin device %d failed, will retry at next start: %s",
                      device_id, error)
        finally:
            self._background_removals.done()
            with contextlib.suppress(SnapshotError):
                await self.store.compact()

    async def wait_removals(self) -> None:
        """Wait until every background (async_remove) deletion has finished."""
        await self._background_removals.drained()

    @translated("cleanup")
    async def cleanup(self) -> int:
        """containerd Cleanup: reclaim what removals left.  Waits for the
        background (async_remove) deletions, then deletes again the thin devices
        whose deletion failed after their snapshot was removed (they wait for
        the next start otherwise); returns how many it deleted, and raises the
        first failure once it has tried them all."""
        await self.wait_removals()
        left = [d.id for d in list(self.meta.devices.values())
                if d.state is DeviceState.REMOVING and self.meta.snapshot_of_device(d.id) is None]
        deleted, failure = 0, None
        for device_id in left:
            async with self.devices.lock(device_id):
                device = self.devices.get(device_id)
                if device is None or device.state is not DeviceState.REMOVING:
                    continue  # deleted meanwhile
                try:
                    await self.store.run(self.steps.destroy, device, True)
                    deleted += 1
                except SnapshotError as error:
                    log.error("cleanup: deleting thin device %d failed again: %s", device_id,
                              error)
                    failure = failure or error
        await self.store.compact()
        if failure is not None:
            raise failure
        return deleted

    # ================================================================ udev
    def _removed(self, event: DmEvent) -> None:
        """A dm device of ours was removed: look (later) whether dmfs did it."""
        if self._services is not None and event.name is not None:
            self._services.start_soon(check_removal, self.store, self.devices, self.steps,
                                      event.name)
