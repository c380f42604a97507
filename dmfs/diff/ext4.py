"""Read an ext4 filesystem's inode tables straight from its block device.

``dmfs diff`` compares two snapshots whose ext4 started as a block copy of a
common ancestor, so an inode that nothing changed is byte for byte the same
record in both inode tables.  Reading the tables (a few large reads: 256
bytes per inode in use) and comparing records costs far less than an
``lstat`` of every file, and the record also gives what ``lstat`` cannot: the
generation number (which tells a renamed inode from a reused inode number)
and the block map (which, with the pool's thin delta, proves file data equal
without reading it).

Measured in the test guest on two snapshots of a 10,000-file tree: both inode
tables read and compared in ~40 ms, against 650-1100 ms for an ``lstat`` of
every entry (UML makes every system call expensive; on real hardware the
difference is smaller but the reads are sequential instead of one per file).

Only what the comparison needs is parsed: the superblock, the group
descriptors, inode records, and extent trees.  Filesystems this reader does
not understand (not ext4, ``meta_bg``) raise :class:`Unsupported`, and the
caller compares through the mounted filesystem instead.  Reads are buffered
on purpose: they go through the block device's page cache, which holds
ext4's metadata buffers, so a mounted read-write filesystem is seen as its
last ``syncfs`` left it even before the journal is checkpointed.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
ROOT_INO = 2

INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
BG_INODE_UNINIT = 0x1

EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
EXT_INIT_MAX_LEN = 32768
MAX_EXTENT_DEPTH = 5

# Byte ranges of an inode record that change without a change worth
# reporting: the access time and the checksums that cover it.
_ATIME = (0x08, 0x0C)
_CHECKSUM_LO = (0x7C, 0x7E)
_CHECKSUM_HI = (0x82, 0x84)
_ATIME_EXTRA = (0x8C, 0x90)


class Unsupported(Exception):
    """Not an ext4 filesystem this reader can compare (the message says why)."""


@dataclass(frozen=True)
class Extent:
    """``length`` blocks of a file from ``logical`` on, at ``physical`` on the device."""

    logical: int
    length: int
    physical: int
    unwritten: bool


@dataclass(frozen=True)
class Geometry:
    """The superblock facts the reader needs."""

    block_size: int
    inode_size: int
    inodes_per_group: int
    groups: int
    first_data_block: int
    desc_size: int
    uuid: bytes
    unused_counts_valid: bool


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_EXTENT_HEADER = struct.Struct("<HHHH")  # magic, entries, max, depth
_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_INDEX = struct.Struct("<IIH")  # ei_block, ei_leaf_lo, ei_leaf_hi


def _u16(data: bytes, offset: int) -> int:
    return _U16.unpack_from(data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return _U32.unpack_from(data, offset)[0]


def parse_superblock(data: bytes) -> Geometry:
    """The geometry in a 1024-byte superblock; Unsupported when it is not one
    this reader handles."""
    if len(data) < SUPERBLOCK_SIZE or _u16(data, 0x38) != EXT4_MAGIC:
        raise Unsupported("no ext2/3/4 superblock")
    incompat, ro_compat = _u32(data, 0x60), _u32(data, 0x64)
    if incompat & INCOMPAT_META_BG:
        raise Unsupported("meta_bg group descriptors are not supported")
    block_size = 1024 << _u32(data, 0x18)
    inodes_per_group = _u32(data, 0x28)
    inode_size = _u16(data, 0x58) if _u32(data, 0x4C) >= 1 else 128
    if not inodes_per_group or inode_size < 128 or block_size > 65536:
        raise Unsupported("implausible superblock")
    return Geometry(
        block_size=block_size, inode_size=inode_size, inodes_per_group=inodes_per_group,
        groups=_u32(data, 0x00) // inodes_per_group, first_data_block=_u32(data, 0x14),
        desc_size=_u16(data, 0xFE) if incompat & INCOMPAT_64BIT else 32,
        uuid=bytes(data[0x68:0x78]),
        unused_counts_valid=bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)))


@dataclass(frozen=True)
class Group:
    """Where one block group's inode table is and how much of it is in use."""

    table_block: int
    used: int  # inodes from the start of the table that may be in use


def parse_groups(geometry: Geometry, data: bytes) -> list[Group]:
    """The group descriptors in ``data`` (the descriptor table)."""
    groups = []
    wide = geometry.desc_size >= 64
    for index in range(geometry.groups):
        desc = data[index * geometry.desc_size:(index + 1) * geometry.desc_size]
        table = _u32(desc, 0x08) | ((_u32(desc, 0x28) << 32) if wide else 0)
        used = geometry.inodes_per_group
        if geometry.unused_counts_valid:
            if _u16(desc, 0x12) & BG_INODE_UNINIT:
                used = 0
            else:
                unused = _u16(desc, 0x1C) | ((_u16(desc, 0x32) << 16) if wide else 0)
                used = max(0, geometry.inodes_per_group - unused)
        groups.append(Group(table, used))
    return groups


class Image:
    """An ext4 filesystem on a device (or image file), read-only.  Close it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.geometry = parse_superblock(self.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
            g = self.geometry
            self.groups = parse_groups(g, self.read(
                (g.first_data_block + 1) * g.block_size, g.groups * g.desc_size))
        except BaseException:
            os.close(self._fd)
            raise
        self._tables: dict[int, bytes] = {}

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise Unsupported(f"{self.path}: short read at byte {offset}")
        return data

    def load_tables(self, used: list[int]) -> None:
        """Read the first ``used[g]`` inode records of every group ``g``."""
        size = self.geometry.inode_size
        for index, (group, count) in enumerate(zip(self.groups, used, strict=True)):
            if count:
                self._tables[index] = self.read(group.table_block * self.geometry.block_size,
                                                count * size)

    def table(self, group: int) -> bytes:
        return self._tables.get(group, b"")

    def inode(self, ino: int) -> bytes | None:
        """The raw record of inode ``ino`` (None when its part of the table was
        not loaded: such inodes are not in use)."""
        group, index = divmod(ino - 1, self.geometry.inodes_per_group)
        size = self.geometry.inode_size
        record = self._tables.get(group, b"")[index * size:(index + 1) * size]
        return record if len(record) == size else None

    def extents(self, record: bytes) -> list[Extent] | None:
        """The block map of an inode, None when it is not an extent tree this
        reader follows (inline data, an old block map, a damaged tree)."""
        flags = _u32(record, 0x20)
        if flags & INLINE_DATA_FL or not flags & EXTENTS_FL:
            return None
        found: list[Extent] = []
        if not self._walk_extents(record[0x28:0x28 + 60], MAX_EXTENT_DEPTH, found):
            return None
        return found

    def _walk_extents(self, node: bytes, depth_left: int, found: list[Extent]) -> bool:
        if len(node) < 12:
            return False
        magic, entries, _, depth = _EXTENT_HEADER.unpack_from(node, 0)
        if magic != EXTENT_MAGIC or 12 + 12 * entries > len(node) or depth > depth_left:
            return False
        for offset in range(12, 12 + 12 * entries, 12):
            if depth == 0:
                logical, length, start_hi, start_lo = _EXTENT.unpack_from(node, offset)
                unwritten = length > EXT_INIT_MAX_LEN
                found.append(Extent(logical, length - EXT_INIT_MAX_LEN if unwritten else length,
                                    start_lo | (start_hi << 32), unwritten))
            else:
                _, leaf_lo, leaf_hi = _INDEX.unpack_from(node, offset)
                block = self.read((leaf_lo | (leaf_hi << 32)) * self.geometry.block_size,
                                  self.geometry.block_size)
                if not self._walk_extents(block, depth - 1, found):
                    return False
        return True


def load_pair(old: Image, new: Image) -> None:
    """Load the same inode table ranges of both images: for each group, as far
    as either side has inodes in use."""
    if (old.geometry.groups, old.geometry.inodes_per_group, old.geometry.inode_size) != (
            new.geometry.groups, new.geometry.inodes_per_group, new.geometry.inode_size):
        raise Unsupported("the two filesystems have different inode tables")
    used = [max(a.used, b.used) for a, b in zip(old.groups, new.groups, strict=True)]
    old.load_tables(used)
    new.load_tables(used)


def masked(record: bytes) -> bytes:
    """An inode record without the fields that change when a file is only read."""
    data = bytearray(record)
    spans = [_ATIME, _CHECKSUM_LO]
    if len(record) > 128:
        extra = _u16(record, 0x80)
        spans.append(_CHECKSUM_HI)
        if 0x80 + extra >= _ATIME_EXTRA[1]:
            spans.append(_ATIME_EXTRA)
    for start, end in spans:
        data[start:end] = bytes(end - start)
    return bytes(data)


def changed_inodes(old: Image, new: Image) -> set[int]:
    """Inode numbers whose records differ (outside access times) between the
    loaded tables of two images: identical stretches are skipped whole."""
    geometry = old.geometry
    size, per_group = geometry.inode_size, geometry.inodes_per_group
    chunk = max(size, geometry.block_size)
    changed: set[int] = set()
    for group in range(geometry.groups):
        a, b = old.table(group), new.table(group)
        if a == b:
            continue
        for start in range(0, max(len(a), len(b)), chunk):
            if a[start:start + chunk] == b[start:start + chunk]:
                continue
            for offset in range(start, min(start + chunk, max(len(a), len(b))), size):
                ra, rb = a[offset:offset + size], b[offset:offset + size]
                if ra == rb:
                    continue
                if len(ra) == len(rb) == size and masked(ra) == masked(rb):
                    continue
                changed.add(group * per_group + offset // size + 1)
    return changed


_S32 = struct.Struct("<i")


def _time_ns(record: bytes, seconds_at: int, extra_at: int) -> int:
    seconds = _S32.unpack_from(record, seconds_at)[0]
    nanoseconds = 0
    if len(record) > 128 and 0x80 + _u16(record, 0x80) >= extra_at + 4:
        extra = _u32(record, extra_at)
        seconds += (extra & 3) << 32
        nanoseconds = extra >> 2
    return seconds * 1_000_000_000 + nanoseconds


def ctime_ns(record: bytes) -> int:
    """The inode change time in nanoseconds since the epoch, as stat reports it."""
    return _time_ns(record, 0x0C, 0x84)


class RecordStat(NamedTuple):
    """The fields of ``os.stat_result`` that an inode record holds."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime_ns: int
    st_nlink: int
    st_rdev: int


def stat_of(record: bytes) -> RecordStat:
    """What lstat would report for this inode (the fields dmfs diff compares)."""
    file_mode = _u16(record, 0x00)
    rdev = 0
    if stat.S_ISCHR(file_mode) or stat.S_ISBLK(file_mode):
        old, new = _u32(record, 0x28), _u32(record, 0x2C)
        if old:  # the old 8:8 encoding
            rdev = os.makedev((old >> 8) & 0xFF, old & 0xFF)
        else:
            rdev = os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
    return RecordStat(
        st_mode=file_mode, st_uid=_u16(record, 0x02) | (_u16(record, 0x78) << 16),
        st_gid=_u16(record, 0x18) | (_u16(record, 0x7A) << 16),
        st_size=_u32(record, 0x04) | (_u32(record, 0x6C) << 32),
        st_mtime_ns=_time_ns(record, 0x10, 0x88), st_nlink=_u16(record, 0x1A), st_rdev=rdev)


def generation(record: bytes) -> int:
    """The number ext4 draws anew each time it allocates an inode."""
    return _u32(record, 0x64)


def mode(record: bytes) -> int:
    return _u16(record, 0x00)


def xattr_block(record: bytes) -> int:
    """The block holding the inode's extended attributes that did not fit in it (0: none)."""
    return _u32(record, 0x68) | (_u16(record, 0x76) << 32)


def in_inode_xattrs(record: bytes) -> bytes:
    """The part of a large inode that holds extended attributes."""
    if len(record) <= 128:
        return b""
    return record[0x80 + _u16(record, 0x80):]
