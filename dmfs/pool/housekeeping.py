"""What the engine does on its own: keep the base device, and notice devices
removed behind its back.
"""

from __future__ import annotations

import errno
import logging

import trio

from dmfs.config import Config
from dmfs.filesystems import FILESYSTEMS, mkfs_argv
from dmfs.pool.devices import DeviceTable
from dmfs.pool.dm import DmError
from dmfs.pool.errors import NoSpace, SnapshotError
from dmfs.pool.failpoints import failpoint
from dmfs.pool.metadata import DeviceState
from dmfs.pool.steps import Steps
from dmfs.pool.store import Store

log = logging.getLogger(__name__)


async def ensure_base(store: Store, devices: DeviceTable, steps: Steps, config: Config) -> None:
    """Create the hidden pre-formatted base device once (and again if the
    configured size changed); parentless snapshots are snapshots of it."""
    meta, base_size = store.meta, config.base_image_size
    if meta.base_id is not None:
        base = devices.get(meta.base_id)
        if base is not None and base.size == base_size and (
                base.state is not DeviceState.FAULTY):
            return
        if base is not None:
            log.info("base device %d is %d bytes, config says %d: making a new one",
                     base.id, base.size, base_size)
        await store.write({"type": "base", "id": None})
        if base is not None:
            async with devices.lock(base.id):
                await store.run(steps.discard, base, None)
    candidates = devices.candidate_ids()
    if not candidates:
        raise NoSpace("no free thin device id for the base device")
    device = await store.run(steps.create_base, candidates, base_size)
    async with devices.lock(device.id):
        try:
            await mkfs(devices.pool.dm.device_path(device.name), config.fs_type,
                          config.fs_options, lazy_init=config.mkfs_lazy_init)
            failpoint("base:after-mkfs")
            await store.run(steps.finish_base, device)
        except BaseException:
            with trio.CancelScope(shield=True):
                await store.run(steps.discard, devices.get(device.id) or device, None)
            raise
    log.info("made base device %d (%d bytes, %s)", device.id, base_size, config.fs_type)


async def mkfs(device: str, fs_type: str, extra_options: str = "", *,
               lazy_init: bool = False) -> None:
    """Make a filesystem on ``device``; OSError says why mkfs failed."""
    argv = mkfs_argv(fs_type, device, extra_options, lazy_init=lazy_init)
    try:
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{argv[0]} not found on PATH: install the "
                      f"{FILESYSTEMS[fs_type].package} package") from None
    if result.returncode != 0:
        raise OSError(errno.EIO, f"{' '.join(argv)} failed: "
                      f"{result.stderr.decode(errors='replace').strip()}")


async def check_removal(store: Store, devices: DeviceTable, steps: Steps, name: str) -> None:
    """Mark a snapshot Faulty whose live device ``name`` was removed behind
    dmfs's back (a udev remove event came for it).

    Under the device's lock, every change dmfs made is in the table: if the
    table still says live and the kernel has no such device, someone else
    removed it.  A late event of an earlier incarnation (the device is live
    again) or of dmfs's own removal (the table says so) is not."""
    try:
        device_id = int(name.removeprefix(steps.config.device_prefix))
    except ValueError:
        return
    async with devices.lock(device_id):
        device = devices.get(device_id)
        if device is None or not device.is_live or device.name != name:
            return
        try:
            if await trio.to_thread.run_sync(devices.pool.info, name) is not None:
                return
        except DmError as error:
            log.warning("cannot look at device %s after its removal: %s", name, error)
            return
        snapshot = store.meta.snapshot_of_device(device_id)
        log.error("device %s (snapshot %r) was removed behind dmfs's back; marking it Faulty",
                  name, snapshot.key if snapshot else None)
        try:
            await store.run(steps.mark_faulty, device, steps.mounts.get(device_id))
        except SnapshotError as error:
            log.error("cannot mark device %s Faulty: %s", name, error)
