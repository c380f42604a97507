"""The thin devices of one pool: their table, their locks, their transitions.

As in containerd's ``pool_device.go``, every device-mapper operation on a
device is one :meth:`DeviceTable.transition`: the device is journaled in the
*trying* state, fsync'd, so the intent is on disk before the kernel acts; the
operation runs; the device is journaled in the *done* state, or in the
*on_error* state when the operation failed.  Start-up reconciliation reads
those states to finish or roll back what a crash interrupted.  Transitions run
in worker threads inside a :meth:`dmfs.pool.store.Store.run` sequence; their
records reach the in-memory table when the sequence is over.

Each device has a lock.  Whoever changes a device, or its mount, holds it: so
a sequence never races another on the same device, and the udev watcher can
tell dmfs's own removals from removals behind its back (it takes the lock,
then looks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from dmfs.pool import fs
from dmfs.pool.dm import SECTOR_SIZE, DeviceBusy, DeviceExists, DmError
from dmfs.pool.errors import InUse, PoolError, as_snapshot_error
from dmfs.pool.failpoints import failpoint
from dmfs.pool.metadata import Device, DeviceState, Metadata
from dmfs.pool.store import Effects, Store
from dmfs.pool.thinpool import REMOVE_DEADLINE, ThinPool

log = logging.getLogger(__name__)

#: candidate ids handed to a create sequence: ids found taken by devices dmfs
#: does not know are skipped (and remembered) rather than reused
CREATE_CANDIDATES = 16


class DeviceTable:
    """Devices by id (in the store's metadata), with a lock each."""

    def __init__(self, store: Store, pool: ThinPool, *, discard_blocks: bool = False) -> None:
        self.store = store
        self.pool = pool
        self.discard_blocks = discard_blocks
        #: thin ids in the pool that dmfs did not make: never allocated
        self.foreign_ids: set[int] = set()
        self._locks: defaultdict[int, trio.Lock] = defaultdict(trio.Lock)

    @property
    def meta(self) -> Metadata:
        return self.store.meta

    def get(self, device_id: int) -> Device | None:
        return self.meta.devices.get(device_id)

    def lock(self, device_id: int) -> trio.Lock:
        """The lock held by whoever changes this device or its mount."""
        return self._locks[device_id]

    def faulty(self) -> list[Device]:
        return [d for d in list(self.meta.devices.values()) if d.state is DeviceState.FAULTY]

    def candidate_ids(self) -> list[int]:
        """Free ids for a new device, lowest first (trio thread)."""
        return self.meta.free_ids(CREATE_CANDIDATES, self.foreign_ids)

    def mark_foreign(self, effects: Effects, device_id: int) -> None:
        """A thin id found taken by a device dmfs does not know (worker thread)."""
        log.warning("thin id %d is taken by a device dmfs does not know; skipping it",
                    device_id)
        effects.later(lambda: self.foreign_ids.add(device_id))

    # -- changes (worker thread, inside a Store.run sequence) -----------------------
    @staticmethod
    def put(effects: Effects, device: Device, *, durable: bool = False) -> Device:
        """Journal a device as it is now; returns it."""
        effects.record({"type": "device", "device": device.to_json()}, durable=durable)
        return device

    @staticmethod
    def forget(effects: Effects, device_id: int, *, durable: bool = False) -> None:
        """Journal that a device no longer exists in the pool."""
        effects.record({"type": "device-deleted", "id": device_id}, durable=durable)

    def transition(self, effects: Effects, device: Device, done: DeviceState,
                   action: Callable[[], Any] | None = None, *,
                   trying: DeviceState | None = None,
                   on_error: DeviceState | None = None, **changes: Any) -> Device:
        """Change a device's state, around ``action`` (a dm operation) if given.

        ``trying`` is journaled durably before the action, ``done`` after it
        (not durably: the next durable record carries it).  When the action
        raises, the device is journaled durably in ``on_error`` (default: the
        state it had) and the error goes on.  ``changes`` (other fields of the
        device) are part of the trying record, or of the done one without
        ``trying``; the action may return more fields for the done record."""
        if action is None:
            return self.put(effects, replace(device, state=done, **changes))
        before = device
        if trying is not None:
            device = self.put(effects, replace(device, state=trying, **changes), durable=True)
            changes = {}
        try:
            found = action()
        except BaseException:
            self.put(effects, replace(before, state=on_error or before.state), durable=True)
            raise
        more = found if isinstance(found, dict) else {}  # other results are not fields
        return self.put(effects, replace(device, state=done, **changes, **more))

    # -- the dm operations (worker thread) ----------------------------------------------
    def create(self, effects: Effects, candidates: list[int], make: Callable[[int], Device],
               create: Callable[[int], None], failpoints: tuple[str, str]) -> Device:
        """Journal a Creating device under the first candidate id, then make it in
        the pool with ``create(id)``; ids taken by devices dmfs does not know are
        skipped.  ``failpoints`` are the crash points after the intent and after
        the creation."""
        after_intent, after_create = failpoints
        for device_id in candidates:
            device = self.put(effects, make(device_id), durable=True)
            failpoint(after_intent)
            try:
                create(device_id)
            except DeviceExists:
                self.mark_foreign(effects, device_id)
                self.forget(effects, device_id, durable=True)
                continue
            except OSError as error:  # a DmError, or a fault injected in a test
                self.forget(effects, device_id, durable=True)
                raise as_snapshot_error(error, f"creating thin device {device_id}") from error
            failpoint(after_create)
            return self.transition(effects, device, DeviceState.CREATED)
        raise PoolError(f"{len(candidates)} thin ids in a row were taken by devices dmfs "
                        "does not know")

    def activate(self, effects: Effects, device: Device, *, read_only: bool) -> Device:
        """Make the device live (its node ready); a writable one without a
        usage baseline gets one (what it maps now)."""
        def action() -> dict[str, Any] | None:
            self.pool.activate(device.name, device.id, device.size, read_only=read_only)
            if device.baseline_sectors is None and not read_only:
                return {"baseline_sectors": self.pool.mapped_bytes(device.name) // SECTOR_SIZE}
            return None

        try:
            return self.transition(effects, device, DeviceState.ACTIVATED, action,
                                   trying=DeviceState.ACTIVATING,
                                   on_error=DeviceState.DEACTIVATED, read_only=read_only)
        except DmError as error:
            raise as_snapshot_error(error, f"activating {device.name}") from error

    def deactivate(self, effects: Effects, device: Device, **changes: Any) -> Device:
        """Remove the live dm device; InUse when it stays busy."""
        try:
            return self.transition(effects, device, DeviceState.DEACTIVATED,
                                   lambda: self.pool.deactivate(device.name),
                                   trying=DeviceState.DEACTIVATING,
                                   on_error=DeviceState.ACTIVATED, **changes)
        except DeviceBusy as error:
            raise InUse(f"device {device.name} stays busy: {error}") from error
        except DmError as error:
            raise as_snapshot_error(error, f"deactivating {device.name}") from error

    # -- who else holds a device (worker thread) --------------------------------------
    def refuse_foreign_mounts(self, device: Device, own: Path | None = None) -> None:
        """InUse when the live device is mounted anywhere but at ``own`` (dmfs's
        own mount of it) in dmfs's mount namespace: a client mounted what
        :meth:`dmfs.pool.snapshotter.Snapshotter.block_device` gave it.

        The kernel shares one superblock between all mounts of a block device
        and opens the device once for it, so the open count cannot tell a
        client's mount beside dmfs's own: the mount table can."""
        info = self.pool.info(device.name)
        if info is None or info.open_count == 0:
            return
        elsewhere = [entry.mountpoint for entry in fs.mountinfo()
                     if entry.devnum == info.devnum and entry.mountpoint != own]
        if elsewhere:
            more = f" (and {len(elsewhere) - 1} more)" if len(elsewhere) > 1 else ""
            raise InUse(f"device {device.name} is mounted at {elsewhere[0]}{more} outside "
                        "dmfs")

    def wait_closed(self, device: Device) -> None:
        """Return once nothing holds the live device open (dmfs's own mount of it
        already gone); InUse, at once, while it is mounted, or when another holder
        (a process, a mount in another mount namespace) keeps it open for
        REMOVE_DEADLINE seconds.  A udev probe after an activation lets go in
        milliseconds; that is what the wait is for."""
        self.refuse_foreign_mounts(device)
        deadline = time.monotonic() + REMOVE_DEADLINE
        delay = 0.005
        while True:
            info = self.pool.info(device.name)
            if info is None or info.open_count == 0:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise InUse(f"device {device.name} is held open {info.open_count} time(s) "
                            "outside dmfs (a process, or a mount in another mount namespace)")
            time.sleep(min(left, delay))  # no event says when a holder lets go
            delay = min(delay * 2, 0.5)

    def freeze(self, effects: Effects, device: Device) -> tuple[Device, int]:
        """Deactivate a device that will not change any more, with its mapped
        size (where its snapshots start from) in the same record; returns the
        device and its growth in bytes (containerd's usage)."""
        mapped = self.pool.mapped_bytes(device.name)
        device = self.deactivate(effects, device, frozen_sectors=mapped // SECTOR_SIZE)
        return device, device.growth(mapped)

    def flush(self, effects: Effects, device: Device) -> Device:
        """Suspend (flushing all I/O to the pool) and resume; a failed resume is
        journaled as Suspended, so whoever comes next resumes it."""
        try:
            device = self.transition(effects, device, DeviceState.SUSPENDED,
                                     lambda: self.pool.suspend(device.name),
                                     trying=DeviceState.SUSPENDING,
                                     on_error=DeviceState.ACTIVATED)
            return self.transition(effects, device, DeviceState.RESUMED,
                                   lambda: self.pool.resume(device.name),
                                   trying=DeviceState.RESUMING,
                                   on_error=DeviceState.SUSPENDED)
        except (DmError, OSError) as error:
            raise as_snapshot_error(error, f"flushing {device.name}") from error

    def destroy(self, effects: Effects, device: Device, *, live: bool) -> None:
        """Deactivate (if ``live``: it may be) and delete a thin device, then
        forget it; journaled Removing first, so a crash finishes the job."""
        if device.state is not DeviceState.REMOVING:
            device = self.put(effects, replace(device, state=DeviceState.REMOVING), durable=True)
        try:
            if live:
                if self.discard_blocks and not device.read_only:
                    with contextlib.suppress(OSError):
                        fs.discard(self.pool.dm.device_path(device.name))
                self.pool.deactivate(device.name)
            failpoint("remove:after-deactivate")
            self.pool.delete(device.id)
        except DeviceBusy as error:
            raise InUse(f"device {device.name} stays busy: {error}") from error
        except DmError as error:
            raise as_snapshot_error(error, f"removing thin device {device.id}") from error
        failpoint("remove:after-delete")
        self.forget(effects, device.id)
