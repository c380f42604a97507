"""The geometry of a loop-backed thin pool to create, checked before anything is touched.

Sizes, the data block size, the metadata size and the low-water mark, within
the kernel's limits (thin-provisioning.rst); :func:`plan_loop_pool` turns what
was asked for into a :class:`LoopPoolSpec` or says, with PoolSpecError, what
is impossible about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmfs.pool.dm import SECTOR_SIZE
from dmfs.pool.errors import PoolSpecError
from dmfs.units import format_size, parse_size

if TYPE_CHECKING:
    from fractions import Fraction

    from dmfs.pool.thinpool import PoolTable

#: The kernel's limits on the data block size (thin-provisioning.rst).
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 1024**3
DEFAULT_BLOCK_SIZE = 64 * 1024
#: The kernel uses at most 255 * (2^14 - 64) metadata blocks of 4 KiB (dm-space-map-
#: metadata.h; older kernels 255 * 2^14) and ignores the rest; rounded down to MiB.
MAX_METADATA_SIZE = 255 * (2**14 - 64) * 4096 // 1024**2 * 1024**2
MIN_METADATA_SIZE = 2 * 1024**2
DEFAULT_MIN_METADATA_SIZE = 16 * 1024**2
#: The kernel's guide is 48 bytes of metadata per data block; twice that leaves
#: room for snapshots whose mappings have diverged.  The file is sparse, so the
#: headroom costs nothing until it is used.
METADATA_BYTES_PER_BLOCK = 96
DEFAULT_LOW_WATER = "10%"
#: Block zeroing stays on (no skip_block_zeroing): without it, a block freed by one
#: snapshot and allocated to another still shows the first one's data.
POOL_FEATURES = ("error_if_no_space",)


@dataclass(frozen=True)
class LowWater:
    """A low-water mark as given: a percentage of the data blocks, or a size."""

    percent: Fraction | None = None
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> LowWater:
        """``10%``, ``2.5%``, or a size such as ``512MiB``; ValueError otherwise."""
        from fractions import Fraction  # (with decimal: not for every dmfs command's start)

        text = text.strip()
        if text.endswith("%"):
            try:
                percent = Fraction(text[:-1])
            except ValueError:
                raise ValueError(f"{text!r} is not a percentage") from None
            if not 0 <= percent < 100:
                raise ValueError(f"{text!r} must be at least 0% and less than 100%")
            return cls(percent=percent)
        return cls(size=parse_size(text))

    def blocks(self, total_blocks: int, block_size: int) -> int:
        """The mark in data blocks, rounded down."""
        if self.percent is not None:
            return int(total_blocks * self.percent / 100)
        assert self.size is not None
        return self.size // block_size

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{float(self.percent):g}%"
        return format_size(self.size or 0)


@dataclass(frozen=True)
class LoopPoolSpec:
    """A loop-backed thin pool to create: its name, files and geometry."""

    name: str
    directory: Path
    size: int
    metadata_size: int
    block_size: int
    low_water: LowWater

    @property
    def data_file(self) -> Path:
        return self.directory / f"{self.name}.data"

    @property
    def metadata_file(self) -> Path:
        return self.directory / f"{self.name}.metadata"

    @property
    def total_blocks(self) -> int:
        return self.size // self.block_size

    @property
    def low_water_blocks(self) -> int:
        return self.low_water.blocks(self.total_blocks, self.block_size)

    def table(self, metadata_device: str, data_device: str) -> PoolTable:
        # (thinpool is imported here: the pool create parser's defaults come from
        # this module, and every dmfs command builds that parser)
        from dmfs.pool.thinpool import PoolTable

        return PoolTable(metadata_device, data_device, self.block_size // SECTOR_SIZE,
                         self.low_water_blocks, POOL_FEATURES)


def default_metadata_size(size: int, block_size: int) -> int:
    """Metadata for a pool of ``size`` bytes in ``block_size`` blocks, rounded up to MiB."""
    wanted = max(size // block_size * METADATA_BYTES_PER_BLOCK, DEFAULT_MIN_METADATA_SIZE)
    wanted = -(-wanted // 1024**2) * 1024**2
    return min(wanted, MAX_METADATA_SIZE)


def plan_loop_pool(name: str, directory: Path, size: int, *, metadata_size: int | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE,
                   low_water: LowWater | None = None) -> LoopPoolSpec:
    """Check a requested geometry; PoolSpecError says what is impossible about it."""
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % MIN_BLOCK_SIZE:
        raise PoolSpecError(
            f"block size {format_size(block_size)} must be a multiple of 64KiB between "
            f"64KiB and 1GiB")
    if size < 16 * block_size:
        raise PoolSpecError(f"size {format_size(size)} is too small: a pool needs at least 16 "
                            f"blocks of {format_size(block_size)}")
    if size % block_size:
        raise PoolSpecError(f"size {format_size(size)} is not a whole number of "
                            f"{format_size(block_size)} blocks")
    if metadata_size is None:
        metadata_size = default_metadata_size(size, block_size)
    if not MIN_METADATA_SIZE <= metadata_size <= MAX_METADATA_SIZE or metadata_size % 4096:
        raise PoolSpecError(
            f"metadata size {format_size(metadata_size)} must be a multiple of 4KiB between "
            f"{format_size(MIN_METADATA_SIZE)} and {format_size(MAX_METADATA_SIZE)}")
    spec = LoopPoolSpec(name, directory, size, metadata_size, block_size,
                        low_water or LowWater.parse(DEFAULT_LOW_WATER))
    if spec.low_water_blocks >= spec.total_blocks:
        raise PoolSpecError(f"low-water mark {spec.low_water} is not below the pool's size "
                            f"{format_size(size)}")
    return spec
