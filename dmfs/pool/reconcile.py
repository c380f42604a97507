"""Start-up reconciliation: observe the pool, make the plan, carry it out.

:func:`dmfs.pool.plan.observe` reads what the kernel says (thin ids through a
metadata snapshot, live dm devices, mounts under the runtime directory); the
rules of what to do live in :mod:`dmfs.pool.plan`, which ``dmfs check`` prints
too.
:func:`reconcile` runs the plan one device at a time, each device's actions in
one worker-thread sequence under its lock; a device whose actions fail is
logged and left for the next start, the others go on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import replace
from pathlib import Path

import trio

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.devices import DeviceTable
from dmfs.pool.dm import DmError
from dmfs.pool.errors import InUse, SnapshotError, as_snapshot_error
from dmfs.pool.failpoints import failpoint
from dmfs.pool.metadata import Device, DeviceState, Snapshot
from dmfs.pool.mounts import MountTable
from dmfs.pool.plan import Action, Plan, Step, observe, plan
from dmfs.pool.store import Effects, Store
from dmfs.pool.thinpool import ThinPool

log = logging.getLogger(__name__)

async def reconcile(store: Store, devices: DeviceTable, mounts: MountTable, pool: ThinPool,
                    config: Config) -> Plan:
    """Bring journal, pool, dm devices and mounts into agreement (see dmfs.pool.plan)."""
    world = await trio.to_thread.run_sync(observe, pool, config)
    failpoint("reconcile:after-observe")
    the_plan = plan(store.meta, world)
    executor = _Executor(devices, mounts, pool)
    for device_id, actions in the_plan.by_device().items():
        for action in actions:
            log.log(logging.WARNING if action.problem else logging.DEBUG, "%s", action.why)
        try:
            if device_id is None:
                await store.run(executor.strays, actions)
                continue
            async with devices.lock(device_id):
                device = devices.get(device_id)
                if device is None:
                    continue
                snapshot = store.meta.snapshot_of_device(device_id)
                await store.run(executor.device, device, snapshot, actions)
        except (SnapshotError, OSError) as error:
            what = f"thin device {device_id}" if device_id is not None else "strays"
            log.error("reconciling %s failed (left for the next start): %s", what, error)
    devices.foreign_ids = set(the_plan.foreign_ids)
    if devices.foreign_ids:
        shown = ", ".join(str(i) for i in sorted(devices.foreign_ids)[:10])
        log.warning("thin pool %s holds %d device(s) dmfs does not manage (ids %s%s); "
                    "they are left alone", pool.name, len(devices.foreign_ids), shown,
                    ", ..." if len(devices.foreign_ids) > 10 else "")
    return the_plan


class _Executor:
    """Carries out plan actions in a worker thread (inside Store.run)."""

    def __init__(self, devices: DeviceTable, mounts: MountTable, pool: ThinPool) -> None:
        self.devices = devices
        self.mounts = mounts
        self.pool = pool

    def device(self, effects: Effects, device: Device, snapshot: Snapshot | None,
               actions: list[Action]) -> None:
        for action in actions:
            device = self._step(effects, device, snapshot, action)

    def _step(self, effects: Effects, device: Device, snapshot: Snapshot | None,
              action: Action) -> Device:
        devices, step = self.devices, action.step
        if step is Step.DELETE:
            if action.path is not None:
                _unmount(action.path)
            devices.destroy(effects, device, live=action.live)
            failpoint("reconcile:after-delete")
        elif step is Step.MARK_FAULTY:
            if action.path is not None:
                _unmount(action.path, lazy=True)
            if action.live:
                with contextlib.suppress(DmError):
                    self.pool.deactivate(device.name)
            if device.state is not DeviceState.FAULTY:
                log.error("thin device %d is missing from pool %s: marked Faulty", device.id,
                          self.pool.name)
                device = devices.put(effects, replace(
                    device, state=DeviceState.FAULTY,
                    error="its thin device is missing from the pool"), durable=True)
            failpoint("reconcile:after-mark-faulty")
        elif step is Step.RECOVER:
            device = devices.put(effects, replace(device, state=DeviceState.DEACTIVATED,
                                                  error=None), durable=True)
        elif step is Step.ROLL_BACK:
            assert snapshot is not None
            effects.record({"type": "snapshot",
                            "snapshot": replace(snapshot, pending=None).to_json()})
            failpoint("reconcile:after-roll-back")
        elif step is Step.RESUME:
            device = self._resume(effects, device)
            failpoint("reconcile:after-resume")
        elif step is Step.UNMOUNT_STALE:
            assert action.path is not None
            _unmount(action.path, lazy=True)
        elif step is Step.DEACTIVATE:
            device = devices.deactivate(effects, device)
        elif step is Step.ACTIVATE:
            device = devices.activate(effects, device, read_only=action.read_only)
            failpoint("reconcile:after-activate")
        elif step is Step.MOUNT:
            self.mounts.mount(effects, device, read_only=action.read_only)
            failpoint("reconcile:after-mount")
        elif step is Step.ADOPT:
            assert action.path is not None
            path, read_only = action.path, action.read_only
            effects.later(lambda: self.mounts.adopt(device.id, path, read_only))
        elif step is Step.SET_STATE:
            assert action.state is not None
            device = devices.transition(effects, device, action.state,
                                        read_only=action.read_only)
        return device

    def _resume(self, effects: Effects, device: Device) -> Device:
        try:
            return self.devices.transition(effects, device, DeviceState.RESUMED,
                                           lambda: self.pool.resume(device.name),
                                           trying=DeviceState.RESUMING,
                                           on_error=DeviceState.SUSPENDED)
        except DmError as error:
            raise as_snapshot_error(error, f"resuming {device.name}") from error

    def strays(self, effects: Effects, actions: list[Action]) -> None:
        for action in actions:
            if action.step is Step.UNMOUNT_STRAY and action.path is not None:
                _unmount(action.path, lazy=True)
            elif action.step is Step.DEACTIVATE_STRAY and action.name is not None:
                try:
                    self.pool.deactivate(action.name)
                except DmError as error:
                    log.error("cannot deactivate %s: %s", action.name, error)


def _unmount(path: Path, *, lazy: bool = False) -> None:
    """Unmount a mount the table does not hold (found at start), and remove its
    directory; InUse when a non-lazy unmount finds files in use."""
    try:
        fs.umount(path, lazy=lazy)
    except OSError as error:
        if fs.is_busy(error) and not lazy:
            raise InUse(f"{path} is in use: {error}") from None
        if not lazy and error.errno != errno.EINVAL:  # EINVAL: not mounted any more
            raise as_snapshot_error(error, f"unmounting {path}") from error
    with contextlib.suppress(OSError):
        path.rmdir()
