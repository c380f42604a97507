"""Which blocks of two thin devices differ, from the pool's own mappings.

Two thin devices of one pool that map a virtual block to the same data block
hold the same bytes there: that is how snapshots share.  ``thin_delta``
(thin-provisioning-tools) lists the virtual block ranges where two devices'
mappings differ, reading a reserved snapshot of the pool's metadata, so the
answer is exact for everything written before the reservation and costs no
data reads at all.  ``dmfs diff`` uses it to prove file contents equal
without reading them.  Measured in the test guest: reserve + thin_delta +
release on two snapshots of a 10,000-file tree (400 MB) takes ~100 ms, the
time to read ~6 MB of files cold.
"""

from __future__ import annotations

import bisect
import os
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from dmfs.pool.dm import SECTOR_SIZE, DeviceMapper
from dmfs.pool.errors import PoolError
from dmfs.pool.thinpool import ThinPool

#: thin_delta's names for ranges whose mappings are not shared
DIFFERING = ("different", "left_only", "right_only")


@dataclass(frozen=True)
class BlockDelta:
    """The byte ranges ``[start, end)`` where two thin devices may differ, sorted
    and merged; everything outside them is shared and therefore equal."""

    ranges: tuple[tuple[int, int], ...]

    def clear(self, start: int, length: int) -> bool:
        """True when no byte of ``[start, start + length)`` lies in a differing range."""
        if length <= 0:
            return True
        index = bisect.bisect_right(self.ranges, (start, float("inf"))) - 1
        if index >= 0 and self.ranges[index][1] > start:
            return False
        following = index + 1
        return following >= len(self.ranges) or self.ranges[following][0] >= start + length

    @property
    def size(self) -> int:
        return sum(end - start for start, end in self.ranges)


def parse_thin_delta(xml_text: str) -> BlockDelta:
    """The differing ranges in thin_delta's XML output, in bytes."""
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError as error:
        raise PoolError(f"thin_delta printed something that is not its XML: {error}") from None
    block_bytes = int(root.get("data_block_size", "0")) * SECTOR_SIZE
    if block_bytes <= 0:
        raise PoolError("thin_delta's output has no data_block_size")
    spans = sorted((int(e.get("begin", "0")) * block_bytes,
                    (int(e.get("begin", "0")) + int(e.get("length", "0"))) * block_bytes)
                   for e in root.iter() if e.tag in DIFFERING)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return BlockDelta(tuple(merged))


def read_delta(pool: ThinPool, old_id: int, new_id: int) -> BlockDelta:
    """The blocks where thin devices ``old_id`` and ``new_id`` differ (blocking;
    the pool must be attached).  Data still in a filesystem's page cache is not
    in the pool yet: sync a mounted read-write filesystem first."""
    if shutil.which("thin_delta") is None:
        raise PoolError("thin_delta not found: install thin-provisioning-tools")
    with pool.metadata_snapshot() as metadata_node:
        result = subprocess.run(
            ["thin_delta", "--metadata-snap", "--snap1", str(old_id), "--snap2", str(new_id),
             metadata_node], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PoolError(f"thin_delta failed: {result.stderr.strip()}")
    return parse_thin_delta(result.stdout)


@dataclass(frozen=True)
class ThinDevice:
    """A live thin device: its pool and its thin id."""

    pool_name: str
    pool_devnum: str  # major:minor
    thin_id: int


def _dm_name(devnum: str) -> str | None:
    try:
        return Path(f"/sys/dev/block/{devnum}/dm/name").read_text().strip()
    except OSError:
        return None


def thin_device_of(dm: DeviceMapper, devnum: tuple[int, int]) -> ThinDevice | None:
    """The thin device behind a block device number (a mounted snapshot's
    ``st_dev``), or None when it is not a device-mapper thin device."""
    name = _dm_name(f"{devnum[0]}:{devnum[1]}")
    if name is None:
        return None
    targets = dm.table(name)
    if len(targets) != 1 or targets[0].target_type != "thin":
        return None
    pool, thin_id, *_ = targets[0].params.split()
    if ":" not in pool:  # a device path instead of major:minor
        st = os.stat(pool)
        pool = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    pool_name = _dm_name(pool)
    if pool_name is None:
        return None
    return ThinDevice(pool_name, pool, int(thin_id))
