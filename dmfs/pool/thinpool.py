"""The thin pool: messages, thin device activation, status (containerd's pool_device).

Every method blocks: callers in the trio loop run it, or a whole sequence of
them, in one worker thread (``trio.to_thread.run_sync``), so that a slow step
(a delete of a big device, a suspend that flushes) never blocks the loop and a
sequence costs one thread hand-off, not one per step (≈1 ms each in the test
guest).  The drivers wait for udev themselves, so a device is ready when
:meth:`ThinPool.activate` returns.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dmfs.pool.dm import (
    SECTOR_SIZE,
    DeviceBusy,
    DeviceInfo,
    DeviceMapper,
    DmError,
    NoSuchDevice,
    Target,
    dm_error,
)
from dmfs.pool.errors import PoolError
from dmfs.pool.failpoints import failpoint
from dmfs.pool.status import PoolStatus, parse_pool_status, parse_thin_status
from dmfs.pool.udev import DmWatcher

log = logging.getLogger(__name__)

#: EBUSY on remove is retried this many times, within this many seconds
REMOVE_ATTEMPTS = 10
REMOVE_DEADLINE = 5.0


@dataclass(frozen=True)
class PoolTable:
    """The parts of a thin-pool table dmfs needs."""

    metadata_dev: str  # major:minor
    data_dev: str
    block_sectors: int
    low_water_blocks: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class ThinUsage:
    """What thin_ls reports for one thin device, in bytes."""

    mapped: int
    exclusive: int


def _device_node(devnum: str) -> str:
    """/dev/<name> for a major:minor, from sysfs."""
    uevent = Path(f"/sys/dev/block/{devnum}/uevent")
    for line in uevent.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            return f"/dev/{value}"
    raise PoolError(f"no device node for block device {devnum}")


class ThinPool:
    """An existing thin pool, attached by its dm name.  All methods block."""

    def __init__(self, dm: DeviceMapper, name: str, watcher: DmWatcher | None = None) -> None:
        self.dm = dm
        self.name = name
        self.watcher = watcher
        self.table: PoolTable | None = None

    # -- the pool itself -----------------------------------------------------------
    def attach(self) -> PoolStatus:
        """Check that the pool exists and is a thin-pool; return its status."""
        try:
            targets = self.dm.table(self.name)
        except NoSuchDevice:
            raise PoolError(
                f"thin pool {self.name!r} not found (no device-mapper device of that name); "
                f"create it (dmfs pool create) or fix pool_name") from None
        if len(targets) != 1 or targets[0].target_type != "thin-pool":
            kinds = ",".join(t.target_type for t in targets) or "empty"
            raise PoolError(f"device-mapper device {self.name!r} is not a thin-pool "
                            f"(its table is {kinds})")
        fields = targets[0].params.split()
        self.table = PoolTable(metadata_dev=fields[0], data_dev=fields[1],
                               block_sectors=int(fields[2]), low_water_blocks=int(fields[3]),
                               features=tuple(fields[5:5 + int(fields[4])]))
        status = self.status()
        if status.failed or status.needs_check:
            raise PoolError(f"thin pool {self.name!r} has failed or needs a check "
                            "(thin_check / thin_repair, offline)")
        return status

    @property
    def block_size(self) -> int:
        assert self.table is not None
        return self.table.block_sectors * SECTOR_SIZE

    @property
    def device(self) -> str:
        return self.dm.device_path(self.name)

    def status(self, *, flush: bool = True) -> PoolStatus:
        """The pool's status; without ``flush`` the kernel answers from memory
        instead of committing the pool's metadata first (the counts include
        the open transaction either way)."""
        return parse_pool_status(self.dm.status(self.name, flush=flush)[0].params)

    def message(self, text: str) -> str:
        return self.dm.message(self.name, text)

    # -- thin ids --------------------------------------------------------------------
    def create_thin(self, device_id: int) -> None:
        self.message(f"create_thin {device_id}")

    def create_snap(self, device_id: int, origin_id: int,
                    active_origin: str | None = None) -> None:
        """Snapshot ``origin_id``; an active origin is suspended around it, as the
        kernel requires, and always resumed."""
        if active_origin is None:
            self.message(f"create_snap {device_id} {origin_id}")
            return
        self.suspend(active_origin)
        try:
            self.message(f"create_snap {device_id} {origin_id}")
        finally:
            self.dm.resume(active_origin)

    def delete(self, device_id: int) -> bool:
        """Delete a thin id; False when the pool did not have it (ENODATA)."""
        try:
            self.message(f"delete {device_id}")
        except DmError as error:
            if error.errno == errno.ENODATA:
                return False
            raise
        return True

    def thin_usage(self) -> dict[int, ThinUsage]:
        """Every thin id in the pool with its mapped and exclusive bytes.

        Reads a metadata snapshot with thin_ls, the only way to list the ids of
        a live pool (a process: use it at start and on request, not per call).
        """
        assert self.table is not None
        if shutil.which("thin_ls") is None:
            raise PoolError("thin_ls not found: install thin-provisioning-tools")
        metadata_node = _device_node(self.table.metadata_dev)
        self.message("reserve_metadata_snap")
        try:
            result = subprocess.run(
                ["thin_ls", "--metadata-snap", "--no-headers", "-o",
                 "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES", metadata_node],
                capture_output=True, text=True, check=False)
        finally:
            self.message("release_metadata_snap")
        if result.returncode != 0:
            raise PoolError(f"thin_ls failed: {result.stderr.strip()}")
        usage = {}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) == 3:
                usage[int(fields[0])] = ThinUsage(int(fields[1]), int(fields[2]))
        return usage

    # -- thin devices -------------------------------------------------------------------
    def thin_table(self, device_id: int, size: int) -> list[Target]:
        return [Target(0, size // SECTOR_SIZE, "thin", f"{self.device} {device_id}")]

    def activate(self, name: str, device_id: int, size: int, *,
                 read_only: bool = False) -> DeviceInfo:
        """Make thin ``device_id`` live as ``name``, its node ready."""
        return self.dm.create(name, self.thin_table(device_id, size), read_only=read_only)

    def deactivate(self, name: str) -> bool:
        """Remove the live device ``name``; False when it was not live.

        EBUSY (something holds it open, often a short-lived udev probe) is
        retried REMOVE_ATTEMPTS times within REMOVE_DEADLINE seconds, then raised.
        """
        if self.watcher is not None:
            self.watcher.expect_removal(name)
        deadline = time.monotonic() + REMOVE_DEADLINE
        for attempt in range(1, REMOVE_ATTEMPTS + 1):
            try:
                self.dm.remove(name)
                return True
            except NoSuchDevice:
                return False
            except DeviceBusy:
                left = deadline - time.monotonic()
                if attempt == REMOVE_ATTEMPTS or left <= 0:
                    raise
                # Back off, doubling: a holder such as blkid lets go within ms.
                time.sleep(min(left, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    def info(self, name: str) -> DeviceInfo | None:
        try:
            return self.dm.info(name)
        except NoSuchDevice:
            return None

    def suspend(self, name: str) -> None:
        # An injected fault is what the driver would raise: a DmError.
        failpoint("dm:suspend", lambda code, text: dm_error(code, "suspend", name, text))
        self.dm.suspend(name)

    def resume(self, name: str) -> None:
        self.dm.resume(name)

    def mapped_bytes(self, name: str) -> int:
        """Bytes the live thin device ``name`` has mapped (its status line)."""
        return parse_thin_status(self.dm.status(name)[0].params).mapped_sectors * SECTOR_SIZE

    def live_devices(self) -> dict[str, tuple[int, int]]:
        return self.dm.list_devices()
