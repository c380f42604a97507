"""The kernel work of each engine operation: one worker-thread sequence each.

The snapshotter (:mod:`dmfs.pool.snapshotter`) decides: it checks the request
against the metadata, takes the locks, and hands one of these sequences to
:meth:`dmfs.pool.store.Store.run`.  A sequence only does: dm operations through
the device table's transitions, mounts through the mount table, journal
records through its :class:`~dmfs.pool.store.Effects`.  It reads nothing of
the in-memory state (what it needs comes in as arguments) and changes nothing
there; and it undoes its own partial work when a step fails, so the effects
the trio thread applies afterwards are those of a whole operation or of none,
and what a crash cuts short is journaled for the next start.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace

from dmfs.config import Config
from dmfs.pool.devices import DeviceTable
from dmfs.pool.errors import InUse, NoSpace, PoolError, SnapshotError
from dmfs.pool.failpoints import failpoint
from dmfs.pool.metadata import Device, DeviceRole, DeviceState, Kind, Snapshot, now
from dmfs.pool.mounts import Mount, MountTable
from dmfs.pool.store import Effects
from dmfs.pool.thinpool import ThinPool

log = logging.getLogger(__name__)


class Steps:
    """The sequences, over one pool's device table and mount table."""

    def __init__(self, devices: DeviceTable, mounts: MountTable, pool: ThinPool,
                 config: Config) -> None:
        self.devices = devices
        self.mounts = mounts
        self.pool = pool
        self.config = config

    def check_space(self) -> None:
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

    def device_name(self, device_id: int) -> str:
        return f"{self.config.device_prefix}{device_id}"

    def prepare(self, effects: Effects, origin: Device, candidates: list[int],
                template: Snapshot, live: bool = False) -> None:
        """Check space, snapshot ``origin`` and, for an active snapshot, activate
        and mount it (a view: activate it read-only if ``live``), then journal the
        snapshot; on any failure undo it all."""
        self.check_space()
        active_origin = origin.name if origin.is_live else None
        device = self.devices.create(
            effects, candidates,
            make=lambda device_id: Device(
                id=device_id, name=self.device_name(device_id), size=origin.size,
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
            elif live:  # a crash after it leaves a device no snapshot has: deleted at start
                device = self.devices.activate(effects, device, read_only=True)
            # Durable here, not at the end of the sequence: if it cannot be, the
            # device goes again (below) and the prepare leaves nothing behind.
            effects.record({"type": "snapshot",
                            "snapshot": replace(template, device_id=device.id).to_json()},
                           durable=True)
        except BaseException:
            self.discard(effects, device, mount)
            raise
        failpoint("prepare:after-record")

    def discard(self, effects: Effects, device: Device, mount: Mount | None) -> None:
        """Undo a device made by a failed operation (worker thread); what cannot
        be undone now is left, journaled, for the next start."""
        try:
            self.mounts.unmount(effects, device.id, mount)
            self.devices.destroy(effects, device, live=device.may_be_live)
        except (SnapshotError, OSError) as error:
            log.error("cleaning up thin device %d failed (left for the next start): %s",
                      device.id, error)

    def make_available(self, effects: Effects, device: Device, read_only: bool) -> Mount:
        """Activate (if needed) and mount a snapshot's device for dmfs's own use."""
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

    def activate(self, effects: Effects, device: Device, read_only: bool) -> Device:
        """Make a snapshot's device live without mounting it (for a client that
        mounts it itself)."""
        return self.devices.activate(effects, device, read_only=read_only)

    def release(self, effects: Effects, device: Device | None, device_id: int,
                mount: Mount | None) -> None:
        """Unmount dmfs's own mount of a snapshot and make sure nothing else holds
        its device (before a commit or a remove records anything): InUse while a
        client has it mounted or open, with dmfs's mount put back, so that a
        refusal changes nothing."""
        live = device is not None and device.is_live
        if device is not None and live:
            self.devices.refuse_foreign_mounts(device, mount.path if mount else None)
        self.mounts.unmount(effects, device_id, mount)  # InUse: files in it are in use
        if device is None or not live:
            return
        try:
            self.devices.wait_closed(device)
        except InUse:
            if mount is not None:
                try:
                    self.mounts.mount(effects, device, read_only=mount.read_only)
                except SnapshotError as error:
                    log.error("remounting %s after a refusal failed (it is mounted again "
                              "on first use): %s", mount.path, error)
            raise

    def expire(self, effects: Effects, device: Device | None, device_id: int,
               mount: Mount) -> bool:
        """Unmount an idle read-only snapshot and deactivate its device, unless a
        client holds the device (then it stays live: the client mounted it)."""
        try:
            self.mounts.unmount(effects, device_id, mount)
        except InUse:
            return False
        if device is not None and device.is_live:
            try:
                self.devices.wait_closed(device)
            except InUse as error:
                log.info("unmounted idle snapshot device %d, left live: %s", device_id, error)
                return True
            with contextlib.suppress(InUse):
                self.devices.deactivate(effects, device)
        log.debug("unmounted idle snapshot device %d", device_id)
        return True

    def commit(self, effects: Effects, snapshot: Snapshot, device: Device,
                         mount: Mount | None, name: str,
                         labels: Mapping[str, str] | None) -> None:
        """Unmount (InUse, nothing changed, while its files or its device are in
        use), journal the intent, then flush, freeze and deactivate the device,
        and journal the commit."""
        self.release(effects, device, device.id, mount)
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

    def undo_commit(self, effects: Effects, snapshot: Snapshot, device: Device,
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

    def remove(self, effects: Effects, snapshot: Snapshot, device: Device | None,
               mount: Mount | None) -> None:
        """Unmount and journal the removal; InUse, nothing removed, while its files
        or its device are in use.  The device goes afterwards (:meth:`destroy`)."""
        self.release(effects, device, snapshot.device_id, mount)
        failpoint("remove:after-unmount")
        effects.record({"type": "remove", "key": snapshot.key}, durable=True)
        failpoint("remove:after-record")

    def destroy(self, effects: Effects, device: Device, live: bool) -> None:
        self.devices.destroy(effects, device, live=live)

    def create_base(self, effects: Effects, candidates: list[int], size: int
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
            self.discard(effects, device, None)
            raise

    def finish_base(self, effects: Effects, device: Device) -> None:
        device, _ = self.devices.freeze(effects, device)
        effects.record({"type": "base", "id": device.id}, durable=True)

    def shut_down(self, effects: Effects, device_id: int, device: Device | None,
                  mount: Mount | None) -> None:
        """Unmount and deactivate a snapshot's device at stop, unless in use (then
        it is left as it is: a client's mount of it goes on working)."""
        try:
            self.mounts.unmount(effects, device_id, mount)
        except SnapshotError as error:
            log.warning("leaving %s mounted at shutdown: %s", self.mounts.path_of(device_id),
                        error)
            return
        if device is not None and device.is_live:
            try:
                self.devices.wait_closed(device)
            except InUse as error:
                log.info("leaving device %s live at shutdown: %s", device.name, error)
                return
            try:
                self.devices.deactivate(effects, device)
            except SnapshotError as error:
                log.warning("leaving device %s live at shutdown: %s", device.name, error)

    def mark_faulty(self, effects: Effects, device: Device, mount: Mount | None
                              ) -> None:
        self.devices.put(effects, replace(device, state=DeviceState.FAULTY,
                                          error="its device-mapper device was removed "
                                                "outside dmfs"), durable=True)
        if mount is not None:
            self.mounts.detach(effects, device.id, mount)
