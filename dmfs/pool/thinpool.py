"""The thin pool: messages, thin device activation, status (containerd's pool_device).

Every method blocks: callers in the trio loop run it, or a whole sequence of
them, in one worker thread (``trio.to_thread.run_sync``), so that a slow step
(a delete of a big device, a suspend that flushes) never blocks the loop and a
sequence costs one thread hand-off, not one per step (≈1 ms each in the test
guest).  The drivers wait for udev themselves, so a device is ready when
:meth:`ThinPool.activate` returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dmfs.pool.blockdev import device_node
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

log = logging.getLogger(__name__)

#: EBUSY on remove is retried this many times, within this many seconds
REMOVE_ATTEMPTS = 10
REMOVE_DEADLINE = 5.0
#: lock files of the pools' metadata snapshots (one per pool and machine)
METADATA_SNAPSHOT_LOCKS = Path("/run/lock/dmfs")
#: how long to wait for another dmfs process's metadata snapshot (a thin_ls
#: of a big pool takes about a second)
METADATA_SNAPSHOT_WAIT = 30.0


@dataclass(frozen=True)
class PoolTable:
    """The parameters of a ``thin-pool`` table line."""

    metadata_device: str  # major:minor
    data_device: str
    block_sectors: int
    low_water_blocks: int
    features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, params: str) -> PoolTable:
        """Parse ``<meta dev> <data dev> <block sectors> <low water> [<n> <feature>...]``."""
        fields = params.split()
        try:
            feature_count = int(fields[4]) if len(fields) > 4 else 0
            table = cls(fields[0], fields[1], int(fields[2]), int(fields[3]),
                        tuple(fields[5:5 + feature_count]))
        except (IndexError, ValueError):
            raise ValueError(f"not a thin-pool table: {params!r}") from None
        return table

    def params(self) -> str:
        """The table parameters, as the kernel takes them."""
        features = f" {len(self.features)} {' '.join(self.features)}" if self.features else ""
        return (f"{self.metadata_device} {self.data_device} {self.block_sectors} "
                f"{self.low_water_blocks}{features}")


@dataclass(frozen=True)
class ThinUsage:
    """What thin_ls reports for one thin device, in bytes."""

    mapped: int
    exclusive: int


@contextlib.contextmanager
def _metadata_snapshot_lock(pool_name: str) -> Iterator[None]:
    """Hold the machine-wide lock of a pool's metadata snapshot."""
    METADATA_SNAPSHOT_LOCKS.mkdir(parents=True, exist_ok=True)
    path = METADATA_SNAPSHOT_LOCKS / f"{pool_name}.metadata-snap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + METADATA_SNAPSHOT_WAIT
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PoolError(f"thin pool {pool_name}: another dmfs process has held "
                                    f"its metadata snapshot for {METADATA_SNAPSHOT_WAIT:g} s "
                                    f"(lock {path})") from None
                time.sleep(delay)  # a lock, not a device: nothing to wait on but time
                delay = min(delay * 2, 0.2)
        yield
    finally:
        os.close(fd)


def _lvm_pool_hint(dm: DeviceMapper, name: str) -> str:
    """A hint when ``name`` is an LVM thin pool's public face rather than its pool device."""
    candidate = f"{name}-tpool"
    try:
        table = dm.table(candidate)
    except DmError:
        return ""
    if len(table) == 1 and table[0].target_type == "thin-pool":
        return f"; LVM calls the thin-pool device of this pool {candidate!r}: use that name"
    return ""


def find_thin_pool(dm: DeviceMapper, name: str) -> Target:
    """The live table line of thin pool ``name``; PoolError, with a hint, if it is not one."""
    try:
        table = dm.table(name)
    except NoSuchDevice:
        import difflib

        devices = list(dm.list_devices())
        close = difflib.get_close_matches(name, devices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PoolError(
            f"thin pool {name!r} not found (no device-mapper device of that name): create "
            f"it with `dmfs pool create` or as contrib/PRODUCTION-POOL.md shows, and check "
            f"the name with `dmsetup ls`{hint}") from None
    if len(table) == 1 and table[0].target_type == "thin-pool":
        return table[0]
    kinds = ", ".join(sorted({target.target_type for target in table})) or "no table"
    raise PoolError(
        f"device {name!r} is not a thin-pool (its table has: {kinds})"
        f"{_lvm_pool_hint(dm, name)}")


class ThinPool:
    """An existing thin pool, attached by its dm name.  All methods block."""

    def __init__(self, dm: DeviceMapper, name: str) -> None:
        self.dm = dm
        self.name = name
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
        self.table = PoolTable.parse(targets[0].params)
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

    @contextlib.contextmanager
    def metadata_snapshot(self) -> Iterator[str]:
        """Reserve the pool's metadata snapshot for a reader (thin_ls,
        thin_delta) and yield the metadata device node to pass it.

        A pool holds one metadata snapshot at a time, and a process killed while
        it holds one leaves it held: every later reserve would fail with EBUSY.
        So dmfs processes take a lock file (flock, released by the kernel when
        its holder dies) around the reservation: a snapshot held while nobody
        holds the lock was left by a dead process and is released first."""
        assert self.table is not None
        metadata_node = device_node(self.table.metadata_device)
        with _metadata_snapshot_lock(self.name):
            if self.status(flush=False).held_metadata_root is not None:
                log.warning("thin pool %s: releasing a metadata snapshot a process that "
                            "died left reserved", self.name)
                self.message("release_metadata_snap")
            self.message("reserve_metadata_snap")
            try:
                failpoint("thin_ls:reserved")
                yield metadata_node
            finally:
                self.message("release_metadata_snap")

    def thin_usage(self) -> dict[int, ThinUsage]:
        """Every thin id in the pool with its mapped and exclusive bytes.

        Reads a metadata snapshot with thin_ls, the only way to list the ids of
        a live pool (a process: use it at start and on request, not per call).
        Counting exclusive bytes walks every mapping of every device.
        """
        return {int(fields[0]): ThinUsage(int(fields[1]), int(fields[2]))
                for fields in self._thin_ls("DEV,MAPPED_BYTES,EXCLUSIVE_BYTES")
                if len(fields) == 3}

    def thin_ids(self) -> set[int]:
        """Every thin id in the pool: thin_ls of the device tree alone."""
        return {int(fields[0]) for fields in self._thin_ls("DEV") if len(fields) == 1}

    def _thin_ls(self, columns: str) -> list[list[str]]:
        if shutil.which("thin_ls") is None:
            raise PoolError("thin_ls not found: install thin-provisioning-tools")
        with self.metadata_snapshot() as metadata_node:
            result = subprocess.run(
                ["thin_ls", "--metadata-snap", "--no-headers", "-o", columns, metadata_node],
                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PoolError(f"thin_ls failed: {result.stderr.strip()}")
        return [line.split() for line in result.stdout.splitlines()]

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
