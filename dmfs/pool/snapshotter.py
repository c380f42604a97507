"""The snapshot engine: containerd's snapshotter semantics on a dm-thin pool.

prepare / view / commit / remove / stat / walk / usage / update (+ rename of
committed snapshots, and :meth:`Snapshotter.mountpoint` for the file data).
Changes to the snapshot tree are serialised by one lock; a device's changes by
its lock (:mod:`dmfs.pool.devices`); reads wait for neither.  Every change is
journaled before the device-mapper operation it announces, so start-up
reconciliation (:mod:`dmfs.pool.reconcile`) can finish or roll back whatever
a crash interrupted.

Each operation's kernel work runs as one sequence in a worker thread
(:meth:`dmfs.pool.store.Store.run`), which touches only the kernel and the
journal; the in-memory state changes on the trio thread when the sequence is
over.  The ``_..._sequence`` methods are those sequences.

Every public method raises only the engine's typed errors
(:mod:`dmfs.pool.errors`): a failed dm operation, mount or journal write
becomes InUse, NoSpace or PoolError, naming the operation and the snapshot.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.devices import DeviceTable
from dmfs.pool.dm import DeviceMapper, DmError
from dmfs.pool.drivers import open_driver
from dmfs.pool.errors import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    InUse,
    InvalidArgument,
    LabelTooLarge,
    NoSpace,
    NotFound,
    PoolError,
    SnapshotError,
    as_snapshot_error,
)
from dmfs.pool.failpoints import failpoint
from dmfs.pool.filters import compile_filters
from dmfs.pool.journal import Journal
from dmfs.pool.metadata import (
    Device,
    DeviceRole,
    DeviceState,
    Kind,
    Metadata,
    Snapshot,
    now,
    read_metadata,
)
from dmfs.pool.mounts import Mount, MountTable, expire_idle_mounts
from dmfs.pool.poolwatch import PoolWatch, watch_pool
from dmfs.pool.reconcile import reconcile
from dmfs.pool.status import PoolStatus
from dmfs.pool.store import Effects, Store
from dmfs.pool.summary import PoolSummary
from dmfs.pool.thinpool import ThinPool
from dmfs.pool.udev import DmEvent, DmWatcher

log = logging.getLogger(__name__)

MAX_LABEL_SIZE = 4096  # containerd: key + value
MAX_KEY_SIZE = 4096

P = ParamSpec("P")
T = TypeVar("T")


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


def _translated(operation: str) -> Callable[[Callable[P, Awaitable[T]]],
                                            Callable[P, Awaitable[T]]]:
    """Let a public method raise only typed errors: a failed kernel or disk call
    that no step translated becomes InUse / NoSpace / PoolError naming the
    operation and its first argument (the snapshot)."""
    def decorate(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(method)
        async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await method(*args, **kwargs)
            except OSError as error:  # DmError is one
                doing = f"{operation} {args[1]!r}" if len(args) > 1 else operation
                raise as_snapshot_error(error, doing) from error
        return translated
    return decorate


class Snapshotter:
    """One thin pool's snapshots.  Use :meth:`open`; all methods are async."""

    def __init__(self, config: Config, dm: DeviceMapper) -> None:
        self.config = config
        self.dm = dm
        self.store = Store(Journal(config.state_dir))
        self.watcher = DmWatcher(config.device_prefix, self._device_vanished)
        self.pool = ThinPool(dm, config.pool_name)
        self.pool_watch = PoolWatch(self.pool)
        self.devices = DeviceTable(self.store, self.pool, discard_blocks=config.discard_blocks)
        self.mounts = MountTable(config.mount_dir, config.fs_type, dm.device_path)
        self._lock = trio.Lock()
        self._services: trio.Nursery | None = None  # watchers, reaper: cancelled at stop
        self._removals: trio.Nursery | None = None  # async removals: drained before stop
        self._background_removals = 0
        self._removals_idle = trio.Event()
        self._removals_idle.set()

    @property
    def meta(self) -> Metadata:
        """The snapshots and devices (the store owns them)."""
        return self.store.meta

    @property
    def mount_dir(self) -> Path:
        return self.mounts.directory

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
                await self._ensure_base()
                await self.store.compact(force=journal.records_since_checkpoint > 0)
        except OSError as error:
            raise as_snapshot_error(error, f"starting on thin pool {self.pool.name}") from error

    async def _stop(self) -> None:
        """Unmount every snapshot, deactivate its device, close the journal."""
        try:
            if self.store.journal.is_open and self.meta.pool_name is not None:
                async with self._lock:
                    for device_id in self.mounts.ids():
                        async with self.devices.lock(device_id):
                            await self.store.run(self._shut_down_sequence, device_id,
                                                 self.devices.get(device_id),
                                                 self.mounts.get(device_id))
                    await self.store.compact(force=True)
        except SnapshotError as error:
            log.error("stopping the engine: %s", error)
        finally:
            self.store.journal.close()

    def _shut_down_sequence(self, effects: Effects, device_id: int, device: Device | None,
                            mount: Mount | None) -> None:
        try:
            self.mounts.unmount(effects, device_id, mount)
        except SnapshotError as error:
            log.warning("leaving %s mounted at shutdown: %s", self.mount_path(device_id), error)
            return
        if device is not None and device.is_live:
            try:
                self.devices.deactivate(effects, device)
            except SnapshotError as error:
                log.warning("leaving device %s live at shutdown: %s", device.name, error)

    # ================================================================ queries
    def _get(self, key: str) -> Snapshot:
        try:
            return self.meta.snapshots[key]
        except KeyError:
            raise NotFound(f"snapshot {key!r} does not exist") from None

    def _info(self, snapshot: Snapshot) -> Info:
        device = self.devices.get(snapshot.device_id)
        mount = self.mounts.get(snapshot.device_id)
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
        return self.mounts.path_of(device_id)

    def keys(self) -> Sequence[str]:
        return sorted(self.meta.snapshots)

    def faulty(self) -> list[Device]:
        return self.devices.faulty()

    @_translated("pool status")
    async def pool_status(self) -> PoolStatus:
        return await trio.to_thread.run_sync(self.pool.status)

    @_translated("pool status")
    async def summary(self) -> PoolSummary:
        """The pool's state now (.dmfs/pool, statfs)."""
        status = await trio.to_thread.run_sync(self.pool.status)
        self.pool_watch.note(status)
        table = self.pool.table
        return PoolSummary.of(self.pool.name, status, self.pool.block_size,
                              table.low_water_blocks if table else 0, self.meta,
                              self.pool_watch.event_counts())

    async def pool_info(self) -> dict[str, Any]:
        """Pool status for people and scripts, one level of keys (.dmfs/pool)."""
        return (await self.summary()).flat()

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
        return Usage((await self.usages([self._info(snapshot)]))[snapshot.key])

    async def usages(self, infos: Sequence[Info]) -> dict[str, int]:
        """:meth:`usage` of many snapshots at once (one look at the kernel): what
        they were when ``infos`` was taken; a device that changed since (a
        commit deactivated it, a remove deleted it) counts what the journal says."""
        sizes = {info.key: info.usage or 0 for info in infos}
        live = {}
        for info in infos:
            device = self.devices.get(info.device_id)
            if info.kind is Kind.ACTIVE and device is not None and device.is_live:
                live[info.key] = device
        if live:
            mapped = await trio.to_thread.run_sync(self._mapped_bytes, list(live.values()))
            for key, device in live.items():
                if device.id in mapped:
                    sizes[key] = device.growth(mapped[device.id])
        return sizes

    def _mapped_bytes(self, devices: list[Device]) -> dict[int, int]:
        found = {}
        for device in devices:
            with contextlib.suppress(DmError):  # gone since: the caller falls back
                found[device.id] = self.pool.mapped_bytes(device.name)
        return found

    # ================================================================ validation
    @staticmethod
    def _check_text(text: object, what: str, limit: int) -> str:
        """``text`` as a non-empty, valid Unicode string without NUL, of at most
        ``limit`` bytes in UTF-8; InvalidArgument otherwise."""
        if not isinstance(text, str) or not text:
            raise InvalidArgument(f"{what} must be a non-empty string")
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise InvalidArgument(f"{what} {text!r} is not valid UTF-8 text") from None
        if "\0" in text:
            raise InvalidArgument(f"{what} {text[:40]!r} contains a NUL character")
        if size > limit:
            raise InvalidArgument(f"{what} {text[:40]!r}... is {size} bytes, more than {limit}")
        return text

    def _check_key(self, key: object, what: str = "snapshot key") -> str:
        return self._check_text(key, what, MAX_KEY_SIZE)

    def _check_labels(self, labels: Mapping[str, str | None]) -> None:
        for name, value in labels.items():
            self._check_text(name, "label name", MAX_LABEL_SIZE)
            if value is not None and value != "":
                self._check_text(value, f"the value of label {name!r}", MAX_LABEL_SIZE)
            size = len(name.encode()) + len((value or "").encode())
            if size > MAX_LABEL_SIZE:
                raise LabelTooLarge(f"label {name!r} is {size} bytes with its value, more "
                                    f"than {MAX_LABEL_SIZE}")

    def _check_space(self) -> None:
        """Refuse to create when the pool cannot hold it (worker thread)."""
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

    def _device_name(self, device_id: int) -> str:
        return f"{self.config.device_prefix}{device_id}"

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

    @_translated("prepare")
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
                origin_id = parent_snapshot.device_id
            else:
                origin_id = self._base().id
            candidates = self.devices.candidate_ids()
            if not candidates:
                raise NoSpace("no free thin device id in the pool (2^24 - 1 in use)")
            stamp = now()
            template = Snapshot(key=key, kind=kind, parent=parent, device_id=0,
                                labels=dict(labels), created=stamp, updated=stamp)
            async with self.devices.lock(origin_id):
                origin = self.devices.get(origin_id)
                if origin is None or origin.state is DeviceState.FAULTY:
                    why = origin.error if origin else "its device is missing"
                    raise FailedPrecondition(f"parent {parent!r} is faulty: {why}")
                await self.store.run(self._prepare_sequence, origin, candidates, template)
            await self.store.compact()
            return self._info(self._get(key))

    def _base(self) -> Device:
        base = self.devices.get(self.meta.base_id) if self.meta.base_id is not None else None
        if base is None:
            raise PoolError("the base device is missing (restart dmfs to recreate it)")
        return base

    def _prepare_sequence(self, effects: Effects, origin: Device, candidates: list[int],
                          template: Snapshot) -> None:
        """Check space, snapshot ``origin`` and, for an active snapshot, activate
        and mount it, then journal the snapshot; on any failure undo it all."""
        self._check_space()
        active_origin = origin.name if origin.is_live else None
        device = self.devices.create(
            effects, candidates,
            make=lambda device_id: Device(
                id=device_id, name=self._device_name(device_id), size=origin.size,
                state=DeviceState.CREATING, origin=origin.id,
                baseline_sectors=origin.frozen_sectors),  # it starts with the origin's blocks
            create=lambda device_id: self.pool.create_snap(device_id, origin.id, active_origin),
            failpoints=("prepare:after-intent", "prepare:after-create-snap"))
        mount = None
        try:
            if template.kind is Kind.ACTIVE:
                device = self.devices.activate(effects, device, read_only=False)
                failpoint("prepare:after-activate")
                mount = self.mounts.mount(effects, device, read_only=False)
                failpoint("prepare:after-mount")
            effects.record({"type": "snapshot",
                            "snapshot": replace(template, device_id=device.id).to_json()})
        except BaseException:
            self._discard(effects, device, mount)
            raise
        failpoint("prepare:after-record")

    def _discard(self, effects: Effects, device: Device, mount: Mount | None) -> None:
        """Undo a device made by a failed operation (worker thread); what cannot
        be undone now is left, journaled, for the next start."""
        try:
            self.mounts.unmount(effects, device.id, mount)
            self.devices.destroy(effects, device, live=device.may_be_live)
        except (SnapshotError, OSError) as error:
            log.error("cleaning up thin device %d failed (left for the next start): %s",
                      device.id, error)

    # ================================================================ file access
    @_translated("mount")
    async def mountpoint(self, key: str) -> Path:
        """Where the snapshot's files are: mounts it first if needed (committed
        snapshots and views read-only, active ones read-write)."""
        device_id = self._get(key).device_id
        mount = self.mounts.get(device_id)
        if mount is not None:
            mount.touch()
            return mount.path
        async with self.devices.lock(device_id):
            mount = self.mounts.get(device_id)
            if mount is not None:
                mount.touch()
                return mount.path
            snapshot = self._get(key)  # it may have changed while we waited
            device = self.devices.get(snapshot.device_id)
            if device is None or device.state is DeviceState.FAULTY:
                why = device.error if device else "its device is missing"
                raise FailedPrecondition(f"snapshot {key!r} is faulty: {why}")
            if snapshot.pending is not None:
                raise FailedPrecondition(f"snapshot {key!r} has a {snapshot.pending} in progress")
            read_only = snapshot.kind is not Kind.ACTIVE
            mount = await self.store.run(self._make_available_sequence, device, read_only)
            return mount.path

    def _make_available_sequence(self, effects: Effects, device: Device, read_only: bool
                                 ) -> Mount:
        activated = not device.is_live
        if activated:
            device = self.devices.activate(effects, device, read_only=read_only)
        try:
            return self.mounts.mount(effects, device, read_only=read_only)
        except SnapshotError:
            if activated:  # not left live without its mount
                with contextlib.suppress(SnapshotError):
                    self.devices.deactivate(effects, device)
            raise

    async def _expire_idle(self, device_id: int) -> bool:
        return await self._expire(device_id, idle=self.config.idle_timeout)

    async def _expire(self, device_id: int, *, idle: float = 0.0) -> bool:
        """Unmount a read-only snapshot unused for ``idle`` seconds and deactivate
        its device, unless its files are in use; True when it did."""
        async with self.devices.lock(device_id):
            mount = self.mounts.get(device_id)
            if mount is None or not mount.read_only or mount.idle_for() < idle:
                return False
            try:
                return await self.store.run(self._expire_sequence, self.devices.get(device_id),
                                            device_id, mount)
            except SnapshotError as error:
                log.warning("cannot unmount idle snapshot device %d: %s", device_id, error)
                return False

    def _expire_sequence(self, effects: Effects, device: Device | None, device_id: int,
                         mount: Mount) -> bool:
        try:
            self.mounts.unmount(effects, device_id, mount)
        except InUse:
            return False
        if device is not None and device.is_live:
            with contextlib.suppress(InUse):
                self.devices.deactivate(effects, device)
        log.debug("unmounted idle snapshot device %d", device_id)
        return True

    async def expire_idle(self) -> int:
        """Unmount every read-only snapshot not in use now; returns how many."""
        count = 0
        for device_id in self.mounts.ids():
            count += await self._expire(device_id)
        return count

    # ================================================================ commit / rename
    @_translated("commit")
    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> Info:
        """containerd Commit: the active snapshot ``key`` becomes the committed,
        read-only ``name``.  Refused (InUse) while its files are in use, with
        everything left as it was; any other failure puts it back as it was."""
        self._check_key(name, "snapshot name")
        if labels is not None:
            self._check_labels(labels)
        async with self._lock:
            snapshot = self._get(key)
            if snapshot.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is {snapshot.kind}, not active")
            if name in self.meta.snapshots:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            async with self.devices.lock(snapshot.device_id):
                device = self.devices.get(snapshot.device_id)
                if device is None or device.state is DeviceState.FAULTY:
                    why = device.error if device else "its device is missing"
                    raise FailedPrecondition(f"snapshot {key!r} is faulty: {why}")
                try:
                    await self.store.run(self._commit_sequence, snapshot, device,
                                         self.mounts.get(device.id), name, labels)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        current = self.meta.snapshots.get(key)
                        if current is not None and current.pending:
                            await self._undo_commit(current)
                    raise
            await self.store.compact()
            return self._info(self._get(name))

    def _commit_sequence(self, effects: Effects, snapshot: Snapshot, device: Device,
                         mount: Mount | None, name: str,
                         labels: Mapping[str, str] | None) -> None:
        """Unmount (InUse: nothing changed), journal the intent, then flush, freeze
        and deactivate the device, and journal the commit."""
        self.mounts.unmount(effects, device.id, mount)
        failpoint("commit:after-unmount")
        live = device.is_live
        # On a live device the next record (Suspending) is durable and no dm
        # operation comes between: the intent is on disk with it.
        effects.record({"type": "snapshot",
                        "snapshot": replace(snapshot, pending="commit").to_json()},
                       durable=not live)
        failpoint("commit:after-intent")
        usage = 0
        if live:
            device = self.devices.flush(effects, device)
            failpoint("commit:after-suspend-resume")
            device, usage = self.devices.freeze(effects, device)
        failpoint("commit:after-deactivate")
        effects.record({"type": "commit", "key": snapshot.key, "name": name, "usage": usage,
                        "updated": now(),
                        **({"labels": dict(labels)} if labels is not None else {})})
        failpoint("commit:after-record")

    async def _undo_commit(self, snapshot: Snapshot) -> None:
        """Put an interrupted commit back: live, mounted read-write, not pending."""
        device = self.devices.get(snapshot.device_id)
        if device is None:
            return
        try:
            await self.store.run(self._undo_commit_sequence, snapshot, device,
                                 self.mounts.get(device.id))
        except (SnapshotError, OSError) as error:
            log.error("putting snapshot %r back after a failed commit failed (the next "
                      "start will): %s", snapshot.key, error)

    def _undo_commit_sequence(self, effects: Effects, snapshot: Snapshot, device: Device,
                              mount: Mount | None) -> None:
        info = self.pool.info(device.name)
        if info is not None and info.suspended:
            device = self.devices.transition(effects, device, DeviceState.RESUMED,
                                             lambda: self.pool.resume(device.name),
                                             trying=DeviceState.RESUMING,
                                             on_error=DeviceState.SUSPENDED)
        if info is None:
            device = self.devices.activate(effects, device, read_only=False)
        elif device.state is not DeviceState.ACTIVATED:
            device = self.devices.transition(effects, device, DeviceState.ACTIVATED)
        if mount is None:
            self.mounts.mount(effects, device, read_only=False)
        effects.record({"type": "snapshot",
                        "snapshot": replace(snapshot, pending=None).to_json()})

    @_translated("rename")
    async def rename(self, key: str, new_key: str) -> Info:
        """Rename a committed snapshot (metadata only; children follow)."""
        self._check_key(new_key, "snapshot name")
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
    @_translated("update")
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
            changed = replace(snapshot, labels=merged, updated=now())
            await self.store.write({"type": "snapshot", "snapshot": changed.to_json()})
            await self.store.compact()
            return self._info(self._get(key))

    # ================================================================ remove
    @_translated("remove")
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
            device_id = snapshot.device_id
            async with self.devices.lock(device_id):
                device = self.devices.get(device_id)
                # Whether it may be live, known before the record makes it Removing.
                live = device is not None and device.may_be_live
                await self.store.run(self._remove_sequence, snapshot, self.mounts.get(device_id))
        if device is None:
            return
        self._background_removals += 1
        self._removals_idle = trio.Event()
        if self.config.async_remove and self._removals is not None:
            self._removals.start_soon(self._finish_removal, device_id, live)
        else:
            await self._finish_removal(device_id, live)

    def _remove_sequence(self, effects: Effects, snapshot: Snapshot, mount: Mount | None
                         ) -> None:
        self.mounts.unmount(effects, snapshot.device_id, mount)  # InUse: nothing removed
        failpoint("remove:after-unmount")
        effects.record({"type": "remove", "key": snapshot.key}, durable=True)
        failpoint("remove:after-record")

    async def _finish_removal(self, device_id: int, live: bool) -> None:
        """Deactivate and delete a Removing device (outside the engine lock, so a
        big delete does not hold up other operations)."""
        try:
            async with self.devices.lock(device_id):
                device = self.devices.get(device_id)
                if device is not None:
                    await self.store.run(self._destroy_sequence, device, live)
        except SnapshotError as error:
            log.error("removing thin device %d failed, will retry at next start: %s",
                      device_id, error)
        finally:
            self._background_removals -= 1
            if self._background_removals == 0:
                self._removals_idle.set()
            with contextlib.suppress(SnapshotError):
                await self.store.compact()

    def _destroy_sequence(self, effects: Effects, device: Device, live: bool) -> None:
        self.devices.destroy(effects, device, live=live)

    async def wait_removals(self) -> None:
        """Wait until every background (async_remove) deletion has finished."""
        await self._removals_idle.wait()

    # ================================================================ base device
    async def _ensure_base(self) -> None:
        """Create the hidden pre-formatted base device once (and again if the
        configured size changed)."""
        base_size = self.config.base_image_size
        if self.meta.base_id is not None:
            base = self.devices.get(self.meta.base_id)
            if base is not None and base.size == base_size and (
                    base.state is not DeviceState.FAULTY):
                return
            if base is not None:
                log.info("base device %d is %d bytes, config says %d: making a new one",
                         base.id, base.size, base_size)
            await self.store.write({"type": "base", "id": None})
            if base is not None:
                async with self.devices.lock(base.id):
                    await self.store.run(self._discard, base, None)
        candidates = self.devices.candidate_ids()
        if not candidates:
            raise NoSpace("no free thin device id for the base device")
        device = await self.store.run(self._create_base_sequence, candidates, base_size)
        async with self.devices.lock(device.id):
            try:
                await fs.mkfs(self.dm.device_path(device.name), self.config.fs_type,
                              self.config.fs_options, lazy_init=self.config.mkfs_lazy_init)
                failpoint("base:after-mkfs")
                await self.store.run(self._finish_base_sequence, device)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.store.run(self._discard, self.devices.get(device.id) or device,
                                         None)
                raise
        log.info("made base device %d (%d bytes, %s)", device.id, base_size,
                 self.config.fs_type)

    def _create_base_sequence(self, effects: Effects, candidates: list[int], size: int
                              ) -> Device:
        device = self.devices.create(
            effects, candidates,
            make=lambda device_id: Device(id=device_id, name=self.config.base_device_name,
                                          size=size, state=DeviceState.CREATING,
                                          role=DeviceRole.BASE),
            create=self.pool.create_thin, failpoints=("base:after-intent", "base:after-create"))
        try:
            return self.devices.activate(effects, device, read_only=False)
        except BaseException:
            self._discard(effects, device, None)
            raise

    def _finish_base_sequence(self, effects: Effects, device: Device) -> None:
        device, _ = self.devices.freeze(effects, device)
        effects.record({"type": "base", "id": device.id}, durable=True)

    # ================================================================ udev
    def _device_vanished(self, event: DmEvent) -> None:
        """A dm device of ours was removed: look (later) whether dmfs did it."""
        if self._services is not None:
            self._services.start_soon(self._check_vanished, event)

    async def _check_vanished(self, event: DmEvent) -> None:
        """Mark a snapshot Faulty whose live device was removed behind dmfs's back.

        Under the device's lock, every change dmfs made is in the table: if
        the table still says live and the kernel has no such device, someone
        else removed it.  A late event of an earlier incarnation (the device
        is live again) or of dmfs's own removal (the table says so) is not."""
        assert event.name is not None
        try:
            device_id = int(event.name.removeprefix(self.config.device_prefix))
        except ValueError:
            return
        async with self.devices.lock(device_id):
            device = self.devices.get(device_id)
            if device is None or not device.is_live or device.name != event.name:
                return
            try:
                if await trio.to_thread.run_sync(self.pool.info, device.name) is not None:
                    return
            except DmError as error:
                log.warning("cannot look at device %s after its removal: %s", event.name, error)
                return
            snapshot = self.meta.snapshot_of_device(device_id)
            log.error("device %s (snapshot %r) was removed behind dmfs's back; marking it "
                      "Faulty", event.name, snapshot.key if snapshot else None)
            try:
                await self.store.run(self._mark_faulty_sequence, device,
                                     self.mounts.get(device_id))
            except SnapshotError as error:
                log.error("cannot mark device %s Faulty: %s", event.name, error)

    def _mark_faulty_sequence(self, effects: Effects, device: Device, mount: Mount | None
                              ) -> None:
        self.devices.put(effects, replace(device, state=DeviceState.FAULTY,
                                          error="its device-mapper device was removed "
                                                "outside dmfs"), durable=True)
        if mount is not None:
            self.mounts.detach(effects, device.id, mount)
