"""The snapshot engine: containerd's snapshotter semantics on a dm-thin pool.

prepare / view / commit / remove / stat / walk / usage / update (+ rename of
committed snapshots, and :meth:`Snapshotter.mountpoint` for the file data).
Every change is journaled before the device-mapper operation it announces, so
:mod:`dmfs.pool.reconcile` can finish or roll back whatever a crash
interrupted.  Mutations are serialised by one lock; reads never wait for it.

The ``*_blocking`` methods are sequences of device-mapper calls, mounts and
journal records that run together in one worker thread: a thread hand-off
costs about 1 ms in the test guest, more than most dm ioctls, and a sequence
is then as fast as the calls it makes.  They run while their caller in the
trio loop holds the engine's or the device's lock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.dm import DeviceExists, DeviceMapper, DmError
from dmfs.pool.drivers import open_driver
from dmfs.pool.errors import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    InUse,
    InvalidArgument,
    NoSpace,
    NotFound,
    PoolError,
    SnapshotError,
)
from dmfs.pool.failpoints import failpoint
from dmfs.pool.filters import compile_filters
from dmfs.pool.journal import Journal
from dmfs.pool.metadata import (
    LIVE_STATES,
    Device,
    DeviceState,
    Kind,
    Metadata,
    Role,
    Snapshot,
    now,
    read_metadata,
)
from dmfs.pool.poolwatch import PoolWatch, watch_pool
from dmfs.pool.status import PoolStatus
from dmfs.pool.thinpool import ThinPool
from dmfs.pool.udev import DmEvent, DmWatcher

log = logging.getLogger(__name__)

MAX_LABEL_SIZE = 4096  # containerd: key + value
MAX_KEY_SIZE = 4096
CREATE_RETRIES = 16  # ids found taken by devices dmfs does not know


@dataclass(frozen=True)
class Info:
    """A snapshot as the API reports it (containerd's snapshots.Info plus device)."""

    key: str
    kind: Kind
    parent: str | None
    labels: Mapping[str, str]
    created: str
    updated: str
    device_id: int
    state: DeviceState
    mountpoint: Path | None  # where its filesystem is mounted now, if it is
    usage: int | None = None  # bytes, for committed snapshots (fixed at commit)

    @property
    def identity(self) -> tuple[int, str]:
        """What stays the same through commit and rename: (device id, created)."""
        return (self.device_id, self.created)


@dataclass(frozen=True)
class Usage:
    """Bytes this snapshot provisioned beyond its parent (containerd's Usage.Size)."""

    size: int


@dataclass
class _Mount:
    """A mounted snapshot filesystem and when it was last used (monotonic clock)."""

    path: Path
    read_only: bool
    last_used: float = field(default_factory=time.monotonic)
    unmounting: bool = False  # idle expiry is unmounting it: mountpoint() waits

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used


#: run a blocking call in a worker thread (the trio loop stays free)
run = trio.to_thread.run_sync


async def _nothing_to_drop(device_id: int) -> None:
    pass


def _maybe_live(device: Device) -> bool:
    """Whether a device may have a live dm device (not known to be inactive)."""
    return device.state not in (DeviceState.CREATING, DeviceState.CREATED,
                                DeviceState.DEACTIVATED)




class Snapshotter:
    """One thin pool's snapshots.  Use :meth:`open`; all methods are async."""

    def __init__(self, config: Config, dm: DeviceMapper) -> None:
        self.config = config
        self.dm = dm
        self.meta = Metadata()
        self.journal = Journal(config.state_dir)
        self.device_prefix = config.device_prefix
        self.watcher = DmWatcher(self.device_prefix, self._device_vanished)
        self.pool = ThinPool(dm, config.pool_name, self.watcher)
        self.pool_watch = PoolWatch(self.pool)
        self.mount_dir = config.mount_dir
        self.foreign_ids: set[int] = set()
        self._lock = trio.Lock()
        self._device_locks: defaultdict[int, trio.Lock] = defaultdict(trio.Lock)
        self._mounts: dict[int, _Mount] = {}
        self._nursery: trio.Nursery | None = None
        self._background_removals = 0
        self._removals_idle = trio.Event()
        self._removals_idle.set()
        #: awaited with the device id before an idle snapshot is unmounted: a front
        #: end drops what it handed out (the FUSE view: the kernel's cached fs link)
        self.before_idle_unmount: Callable[[int], Awaitable[None]] = _nothing_to_drop

    # ================================================================ lifecycle
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: Config, dm: DeviceMapper | None = None
                   ) -> AsyncIterator[Snapshotter]:
        """Start the engine (replay, reconcile, base device), stop it on exit."""
        own_driver = dm is None
        if dm is None:
            dm = open_driver(config.driver, udev_timeout=config.activation_timeout)
        engine = cls(config, dm)
        try:
            async with trio.open_nursery() as nursery:
                engine._nursery = nursery
                try:
                    await nursery.start(engine.watcher.run)
                    await engine._start()
                    await nursery.start(watch_pool, engine.pool_watch, dm)
                    nursery.start_soon(engine._idle_reaper)
                    yield engine
                finally:
                    with trio.CancelScope(shield=True):
                        await engine._stop()
                    nursery.cancel_scope.cancel()
        finally:
            if own_driver:  # only once no task can use it any more
                dm.close()

    async def _start(self) -> None:
        from dmfs.pool.reconcile import reconcile

        self.meta = read_metadata(self.journal.open())
        if self.meta.pool_name is None:
            self._record({"type": "header", "format": Metadata.FORMAT,
                          "pool": self.config.pool_name}, durable=True)
        elif self.meta.pool_name != self.config.pool_name:
            raise PoolError(f"{self.journal.directory} belongs to pool "
                            f"{self.meta.pool_name!r}, not {self.config.pool_name!r}")
        await run(self.pool.attach)
        self.mount_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        async with self._lock:
            await reconcile(self)
            await self._ensure_base()
            self.journal.compact(self.meta.dump)

    async def _stop(self) -> None:
        """Unmount every snapshot, deactivate its device, close the journal."""
        try:
            async with self._lock:
                await run(self._stop_blocking)
                if self.meta.pool_name is not None and self.journal.is_open:
                    self.journal.compact(self.meta.dump)
        finally:
            self.journal.close()

    def _stop_blocking(self) -> None:
        for device_id in sorted(self._mounts):
            try:
                self._unmount_blocking(device_id)
            except InUse:
                log.warning("leaving %s mounted at shutdown: files in it are in use",
                            self.mount_path(device_id))
                continue
            device = self.meta.devices.get(device_id)
            if device is not None and device.state in LIVE_STATES:
                with contextlib.suppress(SnapshotError):
                    self._deactivate_blocking(device)

    # ================================================================ journal
    def _record(self, record: dict[str, Any], *, durable: bool = False) -> None:
        self.journal.append(record, durable=durable, then=self.meta.apply)

    def _put_device(self, device: Device, *, durable: bool = False) -> Device:
        self._record({"type": "device", "device": device.to_json()}, durable=durable)
        return self.meta.devices[device.id]

    def _set_state(self, device: Device, state: DeviceState, *, durable: bool = False,
                   **changes: Any) -> Device:
        return self._put_device(replace(device, state=state, **changes), durable=durable)

    def _put_snapshot(self, snapshot: Snapshot, *, durable: bool = True) -> Snapshot:
        self._record({"type": "snapshot", "snapshot": snapshot.to_json()}, durable=durable)
        return self.meta.snapshots[snapshot.key]

    def _maybe_compact(self) -> None:
        if self.journal.wants_compaction:
            self.journal.compact(self.meta.dump)

    # ================================================================ queries
    def _get(self, key: str) -> Snapshot:
        try:
            return self.meta.snapshots[key]
        except KeyError:
            raise NotFound(f"snapshot {key!r} does not exist") from None

    def _info(self, snapshot: Snapshot) -> Info:
        device = self.meta.devices.get(snapshot.device_id)
        mount = self._mounts.get(snapshot.device_id)
        return Info(key=snapshot.key, kind=snapshot.kind, parent=snapshot.parent,
                    labels=dict(snapshot.labels), created=snapshot.created,
                    updated=snapshot.updated, device_id=snapshot.device_id,
                    state=device.state if device else DeviceState.UNKNOWN,
                    mountpoint=mount.path if mount else None, usage=snapshot.usage)

    async def stat(self, key: str) -> Info:
        """containerd Stat: the snapshot's info; NotFound when it does not exist."""
        return self._info(self._get(key))

    def get(self, key: str) -> Info | None:
        """Like :meth:`stat`, synchronously, None when missing (for the FUSE view)."""
        snapshot = self.meta.snapshots.get(key)
        return self._info(snapshot) if snapshot else None

    def children(self, key: str | None) -> list[Info]:
        """The snapshots whose parent is ``key`` (None: the parentless ones), by key."""
        return [self._info(s) for s in sorted(self.meta.children(key), key=lambda s: s.key)]

    def child_count(self, key: str | None) -> int:
        return self.meta.child_count(key)

    def by_device(self, device_id: int) -> Info | None:
        """The snapshot on a thin device, if any (for the FUSE view's inodes)."""
        snapshot = self.meta.snapshot_of_device(device_id)
        return self._info(snapshot) if snapshot else None

    def mount_path(self, device_id: int) -> Path:
        """Where a snapshot's filesystem is (or will be) mounted."""
        return self.mount_dir / str(device_id)

    async def pool_info(self) -> dict[str, Any]:
        """Pool status for people and scripts (.dmfs/pool, dmfs status)."""
        status = await run(self.pool.status)
        self.pool_watch.note(status)
        table = self.pool.table
        block = self.pool.block_size
        kinds = {kind.value: 0 for kind in Kind}
        for snapshot in self.meta.snapshots.values():
            kinds[snapshot.kind.value] += 1
        return {
            "name": self.pool.name, "mode": status.mode,
            "transaction_id": status.transaction_id, "block_size": block,
            "data_used_blocks": status.used_data_blocks,
            "data_total_blocks": status.total_data_blocks,
            "data_used_bytes": status.used_data_blocks * block,
            "data_total_bytes": status.total_data_blocks * block,
            "metadata_used_blocks": status.used_metadata_blocks,
            "metadata_total_blocks": status.total_metadata_blocks,
            "low_water_blocks": table.low_water_blocks if table else 0,
            **self.pool_watch.summary(),
            "needs_check": status.needs_check,
            "snapshots": kinds,
            "devices": len(self.meta.devices),
            "faulty_devices": [d.id for d in self.faulty()],
        }

    async def walk(self, *filters: str) -> list[Info]:
        """containerd Walk: every snapshot matching any filter (all without one)."""
        matches = compile_filters(filters)
        found = []
        for snapshot in sorted(self.meta.snapshots.values(), key=lambda s: s.key):
            fields: dict[str, str | None] = {"name": snapshot.key, "kind": snapshot.kind.value,
                                             "parent": snapshot.parent}
            fields.update({f"labels.{k}": v for k, v in snapshot.labels.items()})
            if matches(fields):
                found.append(self._info(snapshot))
        return found

    async def usage(self, key: str) -> Usage:
        """Bytes the snapshot provisioned beyond its parent: mapped now minus
        mapped when it was taken (fixed at commit; always 0 for a view)."""
        snapshot = self._get(key)
        if snapshot.kind is Kind.COMMITTED:
            return Usage(snapshot.usage or 0)
        device = self.meta.devices.get(snapshot.device_id)
        if snapshot.kind is Kind.VIEW or device is None or device.state not in LIVE_STATES:
            return Usage(snapshot.usage or 0)
        return Usage(device.growth(await run(self.pool.mapped_bytes, device.name)))

    def _freeze_and_deactivate_blocking(self, device: Device) -> tuple[Device, int]:
        """Deactivate a device that will not change any more, its mapped size
        (where its snapshots start from) in the same journal record; returns
        the device and its growth in bytes."""
        mapped = self.pool.mapped_bytes(device.name)
        device = self._deactivate_blocking(device, frozen_sectors=mapped // 512)
        return device, device.growth(mapped)

    async def pool_status(self) -> PoolStatus:
        return await run(self.pool.status)

    def faulty(self) -> list[Device]:
        return [d for d in self.meta.devices.values() if d.state is DeviceState.FAULTY]

    # ================================================================ validation
    @staticmethod
    def _check_key(key: str, what: str = "key") -> None:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"snapshot {what} must be a non-empty string")
        if "\0" in key or len(key.encode()) > MAX_KEY_SIZE:
            raise InvalidArgument(f"snapshot {what} {key[:40]!r}... is too long or has a NUL")

    @staticmethod
    def _check_labels(labels: Mapping[str, str | None]) -> None:
        for name, value in labels.items():
            if not name:
                raise InvalidArgument("label names must not be empty")
            size = len(name.encode()) + len((value or "").encode())
            if size > MAX_LABEL_SIZE:
                raise InvalidArgument(f"label {name!r} is {size} bytes, more than "
                                      f"{MAX_LABEL_SIZE}")

    def _check_space_blocking(self) -> None:
        # No metadata commit just to look: create_snap commits right after.
        status = self.pool.status(flush=False)
        if status.failed or status.needs_check:
            raise PoolError(f"thin pool {self.pool.name} has failed or needs a check")
        if status.mode == "out_of_data_space" or status.free_data_blocks <= 0:
            raise NoSpace(f"thin pool {self.pool.name} has no free data space "
                          f"({status.used_data_blocks}/{status.total_data_blocks} blocks used)")
        if status.used_metadata_blocks >= status.total_metadata_blocks:
            raise NoSpace(f"thin pool {self.pool.name} has no free metadata space")
        if status.mode == "ro":
            raise PoolError(f"thin pool {self.pool.name} is read-only (metadata trouble)")

    # ================================================================ prepare / view
    async def prepare(self, key: str, parent: str | None = None,
                      labels: Mapping[str, str] | None = None) -> Info:
        """containerd Prepare: a writable snapshot of ``parent`` (empty without one),
        activated and mounted read-write before this returns."""
        return await self._create(key, parent, labels or {}, Kind.ACTIVE)

    async def view(self, key: str, parent: str | None = None,
                   labels: Mapping[str, str] | None = None) -> Info:
        """containerd View: a read-only snapshot of ``parent``, mounted on first use."""
        return await self._create(key, parent, labels or {}, Kind.VIEW)

    async def _create(self, key: str, parent: str | None, labels: Mapping[str, str],
                      kind: Kind) -> Info:
        self._check_key(key)
        self._check_labels(labels)
        async with self._lock:
            if key in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {key!r} already exists "
                                    f"({self.meta.snapshots[key].kind})")
            if parent is not None:
                parent_snapshot = self._get(parent)
                if parent_snapshot.kind is not Kind.COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is {parent_snapshot.kind}, "
                                          "not committed")
                origin = self.meta.devices[parent_snapshot.device_id]
                if origin.state is DeviceState.FAULTY:
                    raise FailedPrecondition(f"parent {parent!r} is faulty: {origin.error}")
            else:
                origin = self._base()
            created: list[Device] = []  # what to roll back if this fails
            try:
                async with self._device_locks[origin.id]:
                    device = await run(self._prepare_blocking, origin, kind is Kind.ACTIVE,
                                       created)
                stamp = now()
                snapshot = self._put_snapshot(Snapshot(
                    key=key, kind=kind, parent=parent, device_id=device.id,
                    labels=dict(labels), created=stamp, updated=stamp))
                failpoint("prepare:after-record")
            except BaseException:
                with trio.CancelScope(shield=True):
                    for device in created:
                        if device.id in self.meta.devices:
                            await self._destroy_device(self.meta.devices[device.id], quiet=True)
                raise
            self._maybe_compact()
            return self._info(snapshot)

    def _base(self) -> Device:
        if self.meta.base_id is None:
            raise PoolError("the base device is missing (restart dmfs to recreate it)")
        return self.meta.devices[self.meta.base_id]

    def _device_name(self, device_id: int) -> str:
        return f"{self.device_prefix}{device_id}"

    def _prepare_blocking(self, origin: Device, activate: bool,
                          created: list[Device]) -> Device:
        """Check space, snapshot ``origin`` and, for an active snapshot, activate
        and mount it.  The device joins ``created`` as soon as it exists."""
        self._check_space_blocking()
        device = self._create_snapshot_device_blocking(origin)
        created.append(device)
        if activate:
            device = self._activate_blocking(device, read_only=False)
            failpoint("prepare:after-activate")
            self._mount_blocking(device, read_only=False)
            failpoint("prepare:after-mount")
        return device

    def _create_snapshot_device_blocking(self, origin: Device) -> Device:
        """Journal the intent, then create_snap; ids taken by devices dmfs does
        not know are skipped (and remembered) rather than reused."""
        for _ in range(CREATE_RETRIES):
            device_id = self.meta.allocate_id(self.foreign_ids)
            if device_id is None:
                raise NoSpace("no free thin device id in the pool (2^24 - 1 in use)")
            # A snapshot starts with exactly its origin's mappings.
            device = self._put_device(Device(
                id=device_id, name=self._device_name(device_id), size=origin.size,
                state=DeviceState.CREATING, origin=origin.id,
                baseline_sectors=origin.frozen_sectors), durable=True)
            failpoint("prepare:after-intent")
            active_origin = origin.name if origin.state in LIVE_STATES else None
            try:
                self.pool.create_snap(device_id, origin.id, active_origin)
            except DeviceExists:
                log.warning("thin id %d is taken by a device dmfs does not know; skipping it",
                            device_id)
                self.foreign_ids.add(device_id)
                self._record({"type": "device-deleted", "id": device_id}, durable=True)
                continue
            except DmError as error:
                self._record({"type": "device-deleted", "id": device_id}, durable=True)
                raise self._pool_error(error, "create_snap") from error
            failpoint("prepare:after-create-snap")
            return self._set_state(device, DeviceState.CREATED)
        raise PoolError(f"{CREATE_RETRIES} thin ids in a row were taken by unknown devices")

    def _pool_error(self, error: DmError, what: str) -> SnapshotError:
        if error.errno == 28:  # ENOSPC
            return NoSpace(f"{what}: thin pool {self.pool.name} is out of space")
        return PoolError(f"{what}: {error}")

    # ================================================================ activation & mounts
    def _activate_blocking(self, device: Device, *, read_only: bool) -> Device:
        device = self._set_state(device, DeviceState.ACTIVATING, durable=True,
                                 read_only=read_only)
        try:
            self.pool.activate(device.name, device.id, device.size, read_only=read_only)
        except DmError as error:
            self._set_state(device, DeviceState.DEACTIVATED, durable=True)
            raise self._pool_error(error, f"activate {device.name}") from error
        baseline = device.baseline_sectors
        if baseline is None and not read_only:
            baseline = self.pool.mapped_bytes(device.name) // 512
        return self._set_state(device, DeviceState.ACTIVATED, baseline_sectors=baseline)

    async def _activate(self, device: Device, *, read_only: bool) -> Device:
        return await run(lambda: self._activate_blocking(device, read_only=read_only))

    async def _deactivate(self, device: Device) -> Device:
        return await run(self._deactivate_blocking, device)

    def _deactivate_blocking(self, device: Device, **changes: Any) -> Device:
        device = self._set_state(device, DeviceState.DEACTIVATING, durable=True, **changes)
        try:
            self.pool.deactivate(device.name)
        except DmError as error:
            self._set_state(device, DeviceState.ACTIVATED, durable=True)
            if error.errno == 16:  # EBUSY after bounded retries
                raise InUse(f"device {device.name} stays busy: {error}") from error
            raise PoolError(str(error)) from error
        return self._set_state(device, DeviceState.DEACTIVATED)

    def _mount_blocking(self, device: Device, *, read_only: bool) -> Path:
        path = self.mount_path(device.id)
        path.mkdir(exist_ok=True)
        fs.mount(self.dm.device_path(device.name), path, self.config.fs_type,
                 read_only=read_only)
        self._mounts[device.id] = _Mount(path, read_only)
        return path

    async def _mount(self, device: Device, *, read_only: bool) -> Path:
        return await run(lambda: self._mount_blocking(device, read_only=read_only))

    def _unmount_blocking(self, device_id: int) -> None:
        """Unmount a snapshot's filesystem; InUse when files in it are in use."""
        mount = self._mounts.get(device_id)
        if mount is None:
            return
        if not mount.read_only:
            with contextlib.suppress(OSError):
                fs.syncfs(mount.path)
        try:
            fs.umount(mount.path)
        except OSError as error:
            if fs.is_busy(error):
                mount.touch()
                raise InUse(f"files under {mount.path} are in use") from None
            if error.errno != 22:  # EINVAL: not mounted any more
                raise
        del self._mounts[device_id]
        with contextlib.suppress(OSError):
            mount.path.rmdir()

    async def _unmount(self, device_id: int) -> None:
        if device_id in self._mounts:  # no thread hand-off for nothing
            await run(self._unmount_blocking, device_id)

    async def mountpoint(self, key: str) -> Path:
        """Where the snapshot's files are: mounts it first if needed (committed
        snapshots and views read-only, active ones read-write)."""
        snapshot = self._get(key)
        device_id = snapshot.device_id
        mount = self._mounts.get(device_id)
        if mount is not None and not mount.unmounting:
            mount.touch()
            return mount.path
        async with self._device_locks[device_id]:
            mount = self._mounts.get(device_id)
            if mount is not None:
                return mount.path
            snapshot = self._get(key)  # it may have changed while we waited
            device = self.meta.devices[device_id]
            if device.state is DeviceState.FAULTY:
                raise FailedPrecondition(f"snapshot {key!r} is faulty: {device.error}")
            if snapshot.pending is not None:
                raise FailedPrecondition(f"snapshot {key!r} has a {snapshot.pending} in progress")
            read_only = snapshot.kind is not Kind.ACTIVE
            try:
                return await run(self._make_available_blocking, device, read_only)
            except OSError as error:
                raise PoolError(f"cannot mount snapshot {key!r}: {error}") from error

    def _make_available_blocking(self, device: Device, read_only: bool) -> Path:
        if device.state not in LIVE_STATES:
            device = self._activate_blocking(device, read_only=read_only)
        return self._mount_blocking(device, read_only=read_only)

    async def _idle_reaper(self) -> None:
        """Unmount and deactivate read-only snapshots unused for idle_timeout."""
        timeout = self.config.idle_timeout
        while True:
            await trio.sleep(max(0.5, timeout / 4))
            idle = [device_id for device_id, mount in self._mounts.items()
                    if mount.read_only and mount.idle_for() >= timeout]
            for device_id in idle:
                await self._expire(device_id)

    async def _expire(self, device_id: int) -> bool:
        """Unmount one idle read-only snapshot unless it is in use."""
        async with self._lock, self._device_locks[device_id]:
            mount = self._mounts.get(device_id)
            if mount is None or not mount.read_only:
                return False
            # The hook runs before `unmounting` is set: it may wait for a path walk whose
            # mountpoint() call must be answered (and then counts as a use).
            used = mount.last_used
            await self.before_idle_unmount(device_id)
            if mount.last_used != used:
                return False  # used again meanwhile
            mount.unmounting = True
            try:
                return await run(self._expire_blocking, device_id)
            finally:
                mount.unmounting = False

    def _expire_blocking(self, device_id: int) -> bool:
        try:
            self._unmount_blocking(device_id)
        except InUse:
            return False
        device = self.meta.devices.get(device_id)
        if device is not None and device.state in LIVE_STATES:
            with contextlib.suppress(InUse):
                self._deactivate_blocking(device)
        log.debug("unmounted idle snapshot device %d", device_id)
        return True

    async def expire_idle(self) -> int:
        """Unmount every idle read-only snapshot now; returns how many."""
        count = 0
        for device_id in [d for d, m in self._mounts.items() if m.read_only]:
            count += await self._expire(device_id)
        return count

    # ================================================================ commit / rename
    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> Info:
        """containerd Commit: the active snapshot ``key`` becomes the committed,
        read-only ``name``.  Refused (InUse) while its files are in use, with
        everything left as it was."""
        self._check_key(name, "name")
        if labels is not None:
            self._check_labels(labels)
        async with self._lock:
            snapshot = self._get(key)
            if snapshot.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is {snapshot.kind}, not active")
            if name in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            device = self.meta.devices[snapshot.device_id]
            if device.state is DeviceState.FAULTY:
                raise FailedPrecondition(f"snapshot {key!r} is faulty: {device.error}")
            async with self._device_locks[device.id]:
                intent = replace(snapshot, pending="commit")
                try:
                    usage = await run(self._commit_blocking, device, intent)
                except BaseException:
                    # Files in use at unmount: nothing changed.  Later: put it back.
                    with trio.CancelScope(shield=True):
                        if self.meta.snapshots[key].pending:
                            await self._undo_commit(intent)
                    raise
                self._record({"type": "commit", "key": key, "name": name, "usage": usage,
                              "updated": now(),
                              **({"labels": dict(labels)} if labels is not None else {})},
                             durable=True)
                failpoint("commit:after-record")
            self._maybe_compact()
            return self._info(self.meta.snapshots[name])

    def _commit_blocking(self, device: Device, intent: Snapshot) -> int:
        """Unmount (InUse: nothing changed), journal the intent, then flush, freeze
        and deactivate the device; its usage in bytes."""
        self._unmount_blocking(device.id)
        failpoint("commit:after-unmount")
        live = device.state in LIVE_STATES
        # On a live device the next record (Suspending) is durable and no dm
        # operation comes between: the intent is on disk with it.
        self._put_snapshot(intent, durable=not live)
        failpoint("commit:after-intent")
        usage = 0
        if live:
            device = self._flush_blocking(device)
            failpoint("commit:after-suspend-resume")
            device, usage = self._freeze_and_deactivate_blocking(device)
        failpoint("commit:after-deactivate")
        return usage

    def _flush_blocking(self, device: Device) -> Device:
        """Suspend (flushing all I/O to the pool) and resume; never left suspended."""
        device = self._set_state(device, DeviceState.SUSPENDING, durable=True)
        self.pool.suspend(device.name)
        device = self._set_state(device, DeviceState.SUSPENDED)
        device = self._set_state(device, DeviceState.RESUMING, durable=True)
        self.pool.resume(device.name)
        return self._set_state(device, DeviceState.RESUMED)

    async def _undo_commit(self, snapshot: Snapshot) -> None:
        """Put an interrupted commit back: live, mounted read-write, not pending."""
        await run(self._undo_commit_blocking, self.meta.devices[snapshot.device_id])
        self._put_snapshot(replace(self.meta.snapshots[snapshot.key], pending=None))

    def _undo_commit_blocking(self, device: Device) -> None:
        info = self.pool.info(device.name)
        if info is not None and info.suspended:
            self.pool.resume(device.name)
        if info is None:
            device = self._activate_blocking(device, read_only=False)
        else:
            device = self._set_state(device, DeviceState.ACTIVATED)
        if device.id not in self._mounts:
            self._mount_blocking(device, read_only=False)

    async def rename(self, key: str, new_key: str) -> Info:
        """Rename a committed snapshot (metadata only; children follow)."""
        self._check_key(new_key, "name")
        async with self._lock:
            snapshot = self._get(key)
            if snapshot.kind is not Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is {snapshot.kind}; only committed "
                                         "snapshots can be renamed")
            if new_key in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {new_key!r} already exists")
            self._record({"type": "rename", "key": key, "name": new_key, "updated": now()},
                         durable=True)
            self._maybe_compact()
            return self._info(self.meta.snapshots[new_key])

    # ================================================================ update
    async def update(self, key: str, labels: Mapping[str, str | None]) -> Info:
        """containerd Update of labels: set the given ones, delete those set to None."""
        self._check_labels(labels)
        async with self._lock:
            snapshot = self._get(key)
            merged = dict(snapshot.labels)
            for name, value in labels.items():
                if value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = value
            snapshot = self._put_snapshot(replace(snapshot, labels=merged, updated=now()))
            self._maybe_compact()
            return self._info(snapshot)

    # ================================================================ remove
    async def remove(self, key: str) -> None:
        """containerd Remove.  HasChildren with child snapshots; InUse (nothing
        removed) while its files are in use.  With ``async_remove`` the thin
        device is deleted after this returns."""
        async with self._lock:
            snapshot = self._get(key)
            children = self.meta.children(key)
            if children:
                names = ", ".join(repr(c.key) for c in children[:3])
                raise HasChildren(f"snapshot {key!r} has {len(children)} child snapshot(s): "
                                  f"{names}")
            async with self._device_locks[snapshot.device_id]:
                await self._unmount(snapshot.device_id)  # InUse: nothing removed
                failpoint("remove:after-unmount")
                live = _maybe_live(self.meta.devices[snapshot.device_id])
                self._record({"type": "remove", "key": key}, durable=True)
                failpoint("remove:after-record")
            device = self.meta.devices.get(snapshot.device_id)
        if device is None:
            return
        self._background_removals += 1
        self._removals_idle = trio.Event()
        if self.config.async_remove and self._nursery is not None:
            self._nursery.start_soon(self._finish_removal, device, live)
        else:
            await self._finish_removal(device, live)

    async def _finish_removal(self, device: Device, live: bool) -> None:
        """Deactivate and delete a Removing device (outside the engine lock, so a
        big delete does not hold up other operations)."""
        try:
            async with self._device_locks[device.id]:
                device = self.meta.devices.get(device.id, device)
                await self._destroy_device(device, live=live)
        except SnapshotError as error:
            log.error("removing thin device %d failed, will retry at next start: %s",
                      device.id, error)
        finally:
            self._maybe_compact()
            self._background_removals -= 1
            if self._background_removals == 0:
                self._removals_idle.set()

    async def wait_removals(self) -> None:
        """Wait until every background (async_remove) deletion has finished."""
        await self._removals_idle.wait()

    async def _destroy_device(self, device: Device, *, quiet: bool = False,
                              live: bool | None = None) -> None:
        """Unmount, deactivate and delete a thin device, then forget it.

        ``live`` says whether the device may be live; by default its state
        tells (the journal is trusted: reconcile made it true at start)."""
        if live is None:
            live = _maybe_live(device)
        try:
            await run(self._destroy_blocking, device, live)
        except (DmError, SnapshotError) as error:
            if quiet:
                log.error("cleaning up thin device %d failed: %s", device.id, error)
                return
            if isinstance(error, DmError):
                raise PoolError(f"removing thin device {device.id}: {error}") from error
            raise

    def _destroy_blocking(self, device: Device, live: bool) -> None:
        with contextlib.suppress(InUse):
            self._unmount_blocking(device.id)
        if device.id in self._mounts:
            raise InUse(f"{self.mount_path(device.id)} is still in use")
        if live:
            if self.config.discard_blocks and not device.read_only:
                with contextlib.suppress(OSError):
                    fs.discard(self.dm.device_path(device.name))
            self.pool.deactivate(device.name)
        failpoint("remove:after-deactivate")
        if device.state is not DeviceState.REMOVING:
            device = self._set_state(device, DeviceState.REMOVING, durable=True)
        self.pool.delete(device.id)
        failpoint("remove:after-delete")
        self._record({"type": "device-deleted", "id": device.id})

    # ================================================================ base device
    async def _ensure_base(self) -> None:
        """Create the hidden pre-formatted base device once (and again if the
        configured size changed)."""
        base_size = self.config.base_image_size
        if self.meta.base_id is not None:
            base = self.meta.devices[self.meta.base_id]
            if base.size == base_size and base.state is not DeviceState.FAULTY:
                return
            log.info("base device %d is %d bytes, config says %d: making a new one",
                     base.id, base.size, base_size)
            self._record({"type": "base", "id": None}, durable=True)
            await self._destroy_device(base, quiet=True)
        for _ in range(CREATE_RETRIES):
            device_id = self.meta.allocate_id(self.foreign_ids)
            if device_id is None:
                raise NoSpace("no free thin device id for the base device")
            device = self._put_device(Device(
                id=device_id, name=self.config.base_device_name, size=base_size,
                state=DeviceState.CREATING, role=Role.BASE), durable=True)
            failpoint("base:after-intent")
            try:
                await run(self.pool.create_thin, device_id)
            except DeviceExists:
                self.foreign_ids.add(device_id)
                self._record({"type": "device-deleted", "id": device_id}, durable=True)
                continue
            break
        else:
            raise PoolError(f"{CREATE_RETRIES} thin ids in a row were taken by unknown devices")
        device = self._set_state(device, DeviceState.CREATED)
        failpoint("base:after-create")
        try:
            device = await self._activate(device, read_only=False)
            await fs.mkfs(self.dm.device_path(device.name), self.config.fs_type,
                          self.config.fs_options, lazy_init=self.config.mkfs_lazy_init)
            failpoint("base:after-mkfs")
            device, _ = await run(self._freeze_and_deactivate_blocking, device)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._destroy_device(device, quiet=True)
            raise
        self._record({"type": "base", "id": device.id}, durable=True)
        log.info("made base device %d (%d bytes, %s)", device.id, base_size,
                 self.config.fs_type)

    # ================================================================ udev
    def _device_vanished(self, event: DmEvent) -> None:
        """A dm device of ours disappeared without dmfs removing it."""
        assert event.name is not None
        try:
            device_id = int(event.name.removeprefix(self.device_prefix))
        except ValueError:
            return
        device = self.meta.devices.get(device_id)
        if device is None or device.state not in LIVE_STATES:
            return
        snapshot = self.meta.snapshot_of_device(device_id)
        log.error("device %s (snapshot %r) was removed behind dmfs's back; marking it Faulty",
                  event.name, snapshot.key if snapshot else None)
        self._set_state(device, DeviceState.FAULTY, durable=True,
                        error="its device-mapper device was removed outside dmfs")
        mount = self._mounts.pop(device_id, None)
        if mount is not None:
            with contextlib.suppress(OSError):
                fs.umount(mount.path, lazy=True)

    def keys(self) -> Sequence[str]:
        return sorted(self.meta.snapshots)
