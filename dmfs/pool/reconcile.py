"""Start-up reconciliation: make the journal and the pool agree again.

After a crash the journal says what dmfs meant to do; the pool (thin ids from
thin_ls on a metadata snapshot), the live dm devices and the mounts under the
runtime directory say what happened.  The rules:

- a device no snapshot refers to (a prepare that never finished), or one
  marked Removing (a remove that never finished), is deleted: prepares roll
  back, removes roll forward;
- a commit that never finished rolls back: the snapshot stays active;
- a snapshot whose thin id is missing from the pool is marked Faulty, never
  reused; a Faulty snapshot whose thin id is back is recovered;
- active snapshots end live and mounted read-write (existing mounts are
  adopted), others end inactive unless already mounted (then adopted, and the
  idle timer unmounts them later); nothing is left suspended;
- live dm devices named like dmfs's that the journal does not know are
  deactivated; thin ids in the pool that the journal does not know belong to
  someone else: reported, skipped by id allocation, never touched.

Only real differences are written, so a second start changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from dmfs.pool import fs
from dmfs.pool.dm import DmError
from dmfs.pool.errors import InUse, SnapshotError
from dmfs.pool.metadata import LIVE_STATES, Device, DeviceState, Kind, Snapshot

run = trio.to_thread.run_sync

if TYPE_CHECKING:
    from dmfs.pool.snapshotter import Snapshotter

log = logging.getLogger(__name__)


class _World:
    """What the kernel says, read once at the start of reconciliation."""

    def __init__(self, pool_ids: set[int], live: dict[str, tuple[int, int]],
                 mounts: dict[int, fs.MountEntry], stray_mounts: list[fs.MountEntry]) -> None:
        self.pool_ids = pool_ids
        self.live = live
        self.mounts = mounts
        self.stray_mounts = stray_mounts


async def _observe(engine: Snapshotter) -> _World:
    pool_ids = set(await run(engine.pool.thin_usage))
    live = await run(engine.pool.live_devices)
    mounts: dict[int, fs.MountEntry] = {}
    stray: list[fs.MountEntry] = []
    for path, entry in fs.mounts_under(engine.mount_dir).items():
        if path.name.isdigit():
            mounts[int(path.name)] = entry
        else:
            stray.append(entry)
    return _World(pool_ids, live, mounts, stray)


async def reconcile(engine: Snapshotter) -> None:
    """Bring journal, pool, dm devices and mounts into agreement (see module doc)."""
    world = await _observe(engine)
    meta = engine.meta
    for device in sorted(meta.devices.values(), key=lambda d: d.id):
        snapshot = meta.snapshot_of_device(device.id)
        referenced = snapshot is not None or device.id == meta.base_id
        try:
            if not referenced or device.state is DeviceState.REMOVING:
                await _delete(engine, device, world)
            elif device.id not in world.pool_ids:
                await _mark_missing(engine, device, snapshot, world)
            elif device.id == meta.base_id:
                await _settle_base(engine, device, world)
            elif snapshot is not None:
                await _settle(engine, device, snapshot, world)
        except (SnapshotError, DmError, OSError) as error:
            log.error("reconciling thin device %d failed (left for the next start): %s",
                      device.id, error)
    await _clean_strays(engine, world)
    engine.foreign_ids = world.pool_ids - set(meta.devices)
    if engine.foreign_ids:
        shown = ", ".join(str(i) for i in sorted(engine.foreign_ids)[:10])
        log.warning("thin pool %s holds %d device(s) dmfs does not manage (ids %s%s); "
                    "they are left alone", engine.pool.name, len(engine.foreign_ids), shown,
                    ", ..." if len(engine.foreign_ids) > 10 else "")


async def _unmount_entry(entry: fs.MountEntry) -> None:
    await run(fs.umount, entry.mountpoint)
    with contextlib.suppress(OSError):
        entry.mountpoint.rmdir()


async def _delete(engine: Snapshotter, device: Device, world: _World) -> None:
    """Roll back an unfinished prepare, or finish an unfinished remove."""
    what = "an unfinished remove" if device.state is DeviceState.REMOVING else (
        "an unfinished prepare" if device.role.value == "snapshot" else "an unfinished base")
    log.info("thin device %d: finishing %s", device.id, what)
    if device.state is not DeviceState.REMOVING:
        device = engine._set_state(device, DeviceState.REMOVING, durable=True)
    entry = world.mounts.pop(device.id, None)
    if entry is not None:
        try:
            await _unmount_entry(entry)
        except OSError as error:
            raise InUse(f"{entry.mountpoint} is in use: {error}") from None
    if device.name in world.live:
        await run(engine.pool.deactivate, device.name)
        del world.live[device.name]
    if device.id in world.pool_ids:
        await run(engine.pool.delete, device.id)
        world.pool_ids.discard(device.id)
    engine._record({"type": "device-deleted", "id": device.id})


async def _mark_missing(engine: Snapshotter, device: Device, snapshot: Snapshot | None,
                        world: _World) -> None:
    """The journal knows this device; the pool has lost it."""
    entry = world.mounts.pop(device.id, None)
    if entry is not None:
        with contextlib.suppress(OSError):
            await run(lambda: fs.umount(entry.mountpoint, lazy=True))
    if device.name in world.live:
        with contextlib.suppress(DmError):
            await run(engine.pool.deactivate, device.name)
        del world.live[device.name]
    if device.state is DeviceState.FAULTY:
        return
    owner = f"snapshot {snapshot.key!r}" if snapshot else "the base device"
    log.error("thin device %d of %s is missing from pool %s: marked Faulty", device.id,
              owner, engine.pool.name)
    engine._set_state(device, DeviceState.FAULTY, durable=True,
                      error="its thin device is missing from the pool")


async def _settle_base(engine: Snapshotter, device: Device, world: _World) -> None:
    """The base device is never live between operations."""
    if device.name in world.live:
        await run(engine.pool.deactivate, device.name)
        del world.live[device.name]
    if device.state is not DeviceState.DEACTIVATED:
        engine._set_state(device, DeviceState.DEACTIVATED)


async def _settle(engine: Snapshotter, device: Device, snapshot: Snapshot,
                  world: _World) -> None:
    """Bring one snapshot's device and mount to the state its kind wants."""
    if device.state is DeviceState.FAULTY:
        log.warning("thin device %d of snapshot %r is in the pool again: recovering it",
                    device.id, snapshot.key)
        device = engine._set_state(device, DeviceState.DEACTIVATED, durable=True, error=None)
    if snapshot.pending is not None:
        log.info("snapshot %r: rolling back an unfinished %s", snapshot.key, snapshot.pending)
        snapshot = engine._put_snapshot(replace(snapshot, pending=None))
    live_devnum = world.live.get(device.name)
    info = await run(engine.pool.info, device.name) if live_devnum else None
    if info is not None and info.suspended:
        log.warning("device %s was left suspended: resuming it", device.name)
        await run(engine.pool.resume, device.name)
    entry = world.mounts.pop(device.id, None)
    if entry is not None and entry.devnum != live_devnum:
        log.warning("stale mount %s (device gone): unmounting it lazily", entry.mountpoint)
        await run(lambda: fs.umount(entry.mountpoint, lazy=True))
        entry = None
    want_read_write = snapshot.kind is Kind.ACTIVE
    if info is not None and want_read_write and info.read_only and entry is None:
        await run(engine.pool.deactivate, device.name)  # live read-only: make it writable
        info = None
    if want_read_write:
        if info is None:
            device = await engine._activate(device, read_only=False)
        elif device.state is not DeviceState.ACTIVATED or device.read_only:
            device = engine._set_state(device, DeviceState.ACTIVATED, read_only=False)
        if entry is not None:
            _adopt(engine, device, entry)
        else:
            await engine._mount(device, read_only=False)
        return
    if entry is not None and info is not None:
        if device.state is not DeviceState.ACTIVATED or not device.read_only:
            device = engine._set_state(device, DeviceState.ACTIVATED, read_only=True)
        _adopt(engine, device, entry)
    elif info is not None:
        await engine._deactivate(device)
    elif device.state in LIVE_STATES or device.state is DeviceState.ACTIVATING:
        engine._set_state(device, DeviceState.DEACTIVATED)


def _adopt(engine: Snapshotter, device: Device, entry: fs.MountEntry) -> None:
    from dmfs.pool.snapshotter import _Mount

    log.info("adopting existing mount %s of device %s", entry.mountpoint, device.name)
    engine._mounts[device.id] = _Mount(entry.mountpoint, entry.read_only)


async def _clean_strays(engine: Snapshotter, world: _World) -> None:
    """Mounts and live devices that look like dmfs's but belong to nothing."""
    known = {d.name for d in engine.meta.devices.values()}
    for device_id, entry in world.mounts.items():
        log.warning("unmounting %s: no snapshot uses device %d", entry.mountpoint, device_id)
        with contextlib.suppress(OSError):
            await run(lambda e=entry: fs.umount(e.mountpoint, lazy=True))
    for entry in world.stray_mounts:
        log.warning("unmounting stray mount %s", entry.mountpoint)
        with contextlib.suppress(OSError):
            await run(lambda e=entry: fs.umount(e.mountpoint, lazy=True))
    for name in list(world.live):
        if engine.config.names_a_dmfs_device(name) and name not in known:
            log.warning("deactivating device %s: the journal does not know it", name)
            try:
                await run(engine.pool.deactivate, name)
            except DmError as error:
                log.error("cannot deactivate %s: %s", name, error)
