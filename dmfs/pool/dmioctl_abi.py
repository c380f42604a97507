"""The device-mapper ioctl ABI: ``struct dm_ioctl`` and what travels after it.

Layouts, ioctl numbers and flags follow ``linux/dm-ioctl.h`` (interface
version 4); the udev cookie flags follow libdevmapper's conventions, which the
udev rules in ``55-dm.rules`` / ``95-dm-notify.rules`` decode.  This module only
encodes and decodes bytes; :mod:`dmfs.pool.dmioctl` does the ioctls.

Every request is one buffer: a ``struct dm_ioctl`` header, then (from
``data_start``) the command's payload, and room for the kernel's reply, which it
writes from ``data_start`` again.  All fields are in the machine's byte order.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dmfs.pool.dm import Target

DM_IOCTL = 0xFD
DM_NAME_LEN = 128  # including the terminating NUL
DM_UUID_LEN = 129  # including the terminating NUL
DM_MAX_TYPE_NAME = 16  # including the terminating NUL
# The kernel accepts any 4.x request whose minor is not newer than its own,
# so asking for 4.0.0 works on every kernel with this interface.
INTERFACE_VERSION = (4, 0, 0)
ALIGNMENT = 8

# Command numbers (the enum in dm-ioctl.h).
DM_VERSION_CMD = 0
DM_REMOVE_ALL_CMD = 1
DM_LIST_DEVICES_CMD = 2
DM_DEV_CREATE_CMD = 3
DM_DEV_REMOVE_CMD = 4
DM_DEV_RENAME_CMD = 5
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_DEV_WAIT_CMD = 8
DM_TABLE_LOAD_CMD = 9
DM_TABLE_CLEAR_CMD = 10
DM_TABLE_DEPS_CMD = 11
DM_TABLE_STATUS_CMD = 12
DM_LIST_VERSIONS_CMD = 13
DM_TARGET_MSG_CMD = 14
DM_DEV_SET_GEOMETRY_CMD = 15
DM_DEV_ARM_POLL_CMD = 16
DM_GET_TARGET_VERSION_CMD = 17

# Flags of struct dm_ioctl.
DM_READONLY_FLAG = 1 << 0  # in: load a read-only table; out: device is read-only
DM_SUSPEND_FLAG = 1 << 1  # in: suspend (not resume); out: device is suspended
# Bit 2 is libdevmapper's own "device exists" marker: the kernel neither reads
# nor sets it, libdm keeps it in its copy of the reply.
DM_EXISTS_FLAG = 1 << 2
DM_PERSISTENT_DEV_FLAG = 1 << 3  # in: create with the minor number given in dev
DM_STATUS_TABLE_FLAG = 1 << 4  # in: DM_TABLE_STATUS returns the table, not the status
DM_ACTIVE_PRESENT_FLAG = 1 << 5  # out: a live table is loaded
DM_INACTIVE_PRESENT_FLAG = 1 << 6  # out: an inactive table is loaded
DM_BUFFER_FULL_FLAG = 1 << 8  # out: the reply did not fit; retry with a bigger buffer
DM_SKIP_BDGET_FLAG = 1 << 9  # ignored by current kernels
DM_SKIP_LOCKFS_FLAG = 1 << 10  # in: suspend without freezing the filesystem
DM_NOFLUSH_FLAG = 1 << 11  # in: suspend without flushing; status without a commit
DM_QUERY_INACTIVE_TABLE_FLAG = 1 << 12  # in: report on the inactive table
DM_UEVENT_GENERATED_FLAG = 1 << 13  # out: the ioctl sent a uevent
DM_UUID_FLAG = 1 << 14  # in: rename sets the uuid; list devices returns uuids
DM_SECURE_DATA_FLAG = 1 << 15  # in: wipe buffers after use
DM_DATA_OUT_FLAG = 1 << 16  # out: a target message produced reply text
DM_DEFERRED_REMOVE = 1 << 17  # in: remove on last close; out: removal is deferred
DM_INTERNAL_SUSPEND_FLAG = 1 << 18  # out: suspended internally (e.g. by a pool)
DM_IMA_MEASUREMENT_FLAG = 1 << 19  # in: return the IMA measurement data

# Trailer flags of a dm_name_list record (kernels >= 5.13 / interface 4.45).
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

# udev flags: libdevmapper passes them in the upper 16 bits of event_nr for the
# ioctls that emit a uevent (resume, remove, rename).  The kernel hands event_nr
# to udev as DM_COOKIE; 55-dm.rules decodes the flags with `dmsetup udevflags`,
# and 95-dm-notify.rules runs `dmsetup udevcomplete`, which treats a cookie
# whose lower 16 bits are zero as "flags only, nobody waits on a semaphore".
DM_UDEV_FLAGS_SHIFT = 16
DM_UDEV_FLAGS_MASK = 0xFFFF0000
DM_COOKIE_MAGIC = 0x0D4D  # the upper half of libdm's semaphore keys
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001  # udev makes no /dev/mapper/<name>
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_LOW_PRIORITY_FLAG = 0x0010
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
# Marks a genuine event from a device-mapper tool (as opposed to a synthetic
# "udevadm trigger" or inotify-watch event): only then do the rules treat the
# device as activated and create its /dev/mapper symlink.
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040


class DmIoctlHeader(ctypes.Structure):
    """``struct dm_ioctl``."""

    _fields_ = [
        ("version", ctypes.c_uint32 * 3),
        ("data_size", ctypes.c_uint32),
        ("data_start", ctypes.c_uint32),
        ("target_count", ctypes.c_uint32),
        ("open_count", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("event_nr", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("dev", ctypes.c_uint64),
        ("name", ctypes.c_char * DM_NAME_LEN),
        ("uuid", ctypes.c_char * DM_UUID_LEN),
        ("data", ctypes.c_char * 7),
    ]


class DmTargetSpec(ctypes.Structure):
    """``struct dm_target_spec``; its parameter string follows it."""

    _fields_ = [
        ("sector_start", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("status", ctypes.c_int32),
        ("next", ctypes.c_uint32),
        ("target_type", ctypes.c_char * DM_MAX_TYPE_NAME),
    ]


class DmNameList(ctypes.Structure):
    """``struct dm_name_list`` without its flexible ``name`` (which starts at 12)."""

    _fields_ = [
        ("dev", ctypes.c_uint64),
        ("next", ctypes.c_uint32),
    ]


NAME_LIST_NAME_OFFSET = DmNameList.next.offset + ctypes.sizeof(ctypes.c_uint32)
# Native byte order, standard sizes: dev and next; event_nr and flags.
_NAME_LIST_HEAD = struct.Struct("=QI")
_NAME_LIST_TRAILER = struct.Struct("=II")


class DmTargetMsg(ctypes.Structure):
    """``struct dm_target_msg`` without its flexible ``message``."""

    _fields_ = [("sector", ctypes.c_uint64)]


HEADER_SIZE = ctypes.sizeof(DmIoctlHeader)
TARGET_SPEC_SIZE = ctypes.sizeof(DmTargetSpec)


@dataclass(frozen=True)
class IocEncoding:
    """How an architecture packs direction, size, type and number into an ioctl."""

    size_bits: int
    read: int
    write: int

    def iowr(self, ioc_type: int, number: int, size: int) -> int:
        """``_IOWR(type, nr, size)``."""
        if not 0 <= size < 1 << self.size_bits:
            raise ValueError(f"ioctl argument size {size} does not fit {self.size_bits} bits")
        direction_shift = 16 + self.size_bits
        return ((self.read | self.write) << direction_shift | size << 16
                | ioc_type << 8 | number)


# asm-generic/ioctl.h (x86, arm, riscv, s390, ...).
GENERIC_IOC = IocEncoding(size_bits=14, read=2, write=1)
# alpha, mips, powerpc and sparc: 13 size bits, three direction bits.
LEGACY_IOC = IocEncoding(size_bits=13, read=2, write=4)
_LEGACY_IOC_MACHINES = ("alpha", "mips", "ppc", "powerpc", "sparc")


def native_ioc_encoding(machine: str | None = None) -> IocEncoding:
    """The ioctl encoding of this machine (or of the ``uname -m`` given)."""
    machine = os.uname().machine if machine is None else machine  # = platform.machine()
    return LEGACY_IOC if machine.startswith(_LEGACY_IOC_MACHINES) else GENERIC_IOC


def dm_request(command: int, encoding: IocEncoding | None = None) -> int:
    """The ioctl request number of a dm command: ``_IOWR(0xfd, nr, struct dm_ioctl)``."""
    return (encoding or native_ioc_encoding()).iowr(DM_IOCTL, command, HEADER_SIZE)


def align(offset: int) -> int:
    """``offset`` rounded up to the 8-byte alignment dm records keep."""
    return (offset + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def udev_cookie(flags: int) -> int:
    """An event_nr carrying udev ``flags`` and no semaphore (the lower half is zero)."""
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"udev flags {flags:#x} do not fit 16 bits")
    return flags << DM_UDEV_FLAGS_SHIFT


def encode_device_name(name: str) -> bytes:
    """``name`` as the kernel takes it; ValueError when it cannot be a dm name."""
    raw = os.fsencode(name)
    if not raw:
        raise ValueError("a device name cannot be empty")
    if len(raw) >= DM_NAME_LEN:
        raise ValueError(f"device name is {len(raw)} bytes, at most {DM_NAME_LEN - 1} fit")
    if b"/" in raw or b"\0" in raw:
        raise ValueError("a device name cannot contain '/' or NUL")
    if raw in (b".", b".."):
        raise ValueError(f"{name!r} cannot be a device name")
    return raw


def encode_uuid(uuid: str) -> bytes:
    """``uuid`` as the kernel takes it; ValueError when it is too long."""
    raw = os.fsencode(uuid)
    if len(raw) >= DM_UUID_LEN:
        raise ValueError(f"uuid is {len(raw)} bytes, at most {DM_UUID_LEN - 1} fit")
    if b"\0" in raw:
        raise ValueError("a uuid cannot contain NUL")
    return raw


def encode_request(*, name: bytes = b"", uuid: bytes = b"", flags: int = 0,
                   event_nr: int = 0, dev: int = 0, target_count: int = 0,
                   payload: bytes = b"", buffer_size: int = 0) -> bytearray:
    """A request buffer: header, ``payload`` at data_start, room up to ``buffer_size``."""
    size = max(buffer_size, HEADER_SIZE + len(payload))
    buffer = bytearray(size)
    header = DmIoctlHeader.from_buffer(buffer)
    header.version[:] = INTERFACE_VERSION
    header.data_size = size
    header.data_start = HEADER_SIZE
    header.target_count = target_count
    header.flags = flags
    header.event_nr = event_nr
    header.dev = dev
    header.name = name
    header.uuid = uuid
    del header  # release the buffer export so the caller may hand it on freely
    buffer[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload
    return buffer


def encode_table(targets: Sequence[Target]) -> bytes:
    """DM_TABLE_LOAD payload: one dm_target_spec + parameters per target.

    On load, each ``next`` is the distance from this spec to the following one.
    """
    records = []
    for target in targets:
        target_type = target.target_type.encode()
        if not target_type or len(target_type) >= DM_MAX_TYPE_NAME:
            raise ValueError(f"target type {target.target_type!r} must be 1 to "
                             f"{DM_MAX_TYPE_NAME - 1} bytes")
        params = target.params.encode()
        if b"\0" in params:
            raise ValueError("target parameters cannot contain NUL")
        record_size = align(TARGET_SPEC_SIZE + len(params) + 1)
        spec = DmTargetSpec(sector_start=target.start, length=target.length, status=0,
                            next=record_size, target_type=target_type)
        record = bytes(spec) + params
        records.append(record + bytes(record_size - len(record)))
    return b"".join(records)


def encode_message(sector: int, message: str) -> bytes:
    """DM_TARGET_MSG payload: dm_target_msg, then the NUL-terminated message."""
    text = message.encode()
    if not text or b"\0" in text:
        raise ValueError("a target message must be non-empty and contain no NUL")
    return bytes(DmTargetMsg(sector=sector)) + text + b"\0"


@dataclass(frozen=True)
class Reply:
    """The header of the kernel's answer."""

    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int  # a dev_t as the kernel encodes it (os.major / os.minor read it)
    name: str
    uuid: str

    @property
    def devnum(self) -> tuple[int, int]:
        return (os.major(self.dev), os.minor(self.dev))


def decode_reply(buffer: bytes | bytearray) -> Reply:
    """The header of a reply buffer."""
    header = DmIoctlHeader.from_buffer_copy(buffer)
    return Reply(
        version=(header.version[0], header.version[1], header.version[2]),
        data_size=header.data_size, data_start=header.data_start,
        target_count=header.target_count, open_count=header.open_count,
        flags=header.flags, event_nr=header.event_nr, dev=header.dev,
        name=os.fsdecode(header.name), uuid=os.fsdecode(header.uuid))


class MalformedReply(ValueError):
    """The kernel's reply does not have the layout this module expects."""


def _data_bounds(buffer: bytes | bytearray, reply: Reply) -> tuple[int, int]:
    end = min(reply.data_size, len(buffer))
    if not HEADER_SIZE <= reply.data_start <= end:
        raise MalformedReply(f"data_start {reply.data_start} outside the reply "
                             f"(data_size {reply.data_size}, buffer {len(buffer)})")
    return reply.data_start, end


def _string_at(buffer: bytes | bytearray, start: int, end: int) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset of its NUL."""
    nul = buffer.find(b"\0", start, end)
    if nul < 0:
        raise MalformedReply(f"unterminated string at offset {start}")
    return bytes(buffer[start:nul]), nul


def decode_targets(buffer: bytes | bytearray, reply: Reply) -> list[Target]:
    """The targets of a DM_TABLE_STATUS reply (status or table text per target).

    On output, each ``next`` is the distance from the *first* spec.
    """
    start, end = _data_bounds(buffer, reply)
    targets = []
    offset = 0
    for index in range(reply.target_count):
        spec_at = start + offset
        if spec_at + TARGET_SPEC_SIZE > end:
            raise MalformedReply(f"target spec at offset {spec_at} beyond the reply ({end})")
        spec = DmTargetSpec.from_buffer_copy(buffer, spec_at)
        params, _ = _string_at(buffer, spec_at + TARGET_SPEC_SIZE, end)
        targets.append(Target(spec.sector_start, spec.length, spec.target_type.decode(),
                              params.decode()))
        if index + 1 < reply.target_count and spec.next <= offset:
            raise MalformedReply(f"target spec {index} points back to offset {spec.next}")
        offset = spec.next
    return targets


@dataclass(frozen=True)
class NameListEntry:
    """One device of a DM_LIST_DEVICES reply."""

    name: str
    dev: int
    event_nr: int | None = None  # kernels >= 5.13 add it; None on older ones
    uuid: str | None = None  # only when asked for with DM_UUID_FLAG

    @property
    def devnum(self) -> tuple[int, int]:
        return (os.major(self.dev), os.minor(self.dev))


def decode_name_list(buffer: bytes | bytearray, reply: Reply) -> list[NameListEntry]:
    """The devices of a DM_LIST_DEVICES reply.

    Records are chained by ``next`` (distance from this record, 0 on the last).
    Newer kernels put ``event_nr`` and ``flags`` (u32 each) after the name,
    8-byte aligned, and the uuid after those when it was asked for; a record
    too short for that trailer comes from an older kernel and has none.
    """
    start, end = _data_bounds(buffer, reply)
    if end - start < ctypes.sizeof(ctypes.c_uint64):
        return []
    entries = []
    offset = start
    while True:
        if offset + NAME_LIST_NAME_OFFSET > end:
            raise MalformedReply(f"name list record at {offset} beyond the reply ({end})")
        dev, next_offset = _NAME_LIST_HEAD.unpack_from(buffer, offset)
        if dev == 0 and offset == start:
            return []  # the kernel's marker for "no devices"
        record_end = offset + next_offset if next_offset else end
        if record_end > end:
            raise MalformedReply(f"name list record at {offset} runs past the reply ({end})")
        raw_name, nul = _string_at(buffer, offset + NAME_LIST_NAME_OFFSET, record_end)
        event_nr = uuid = None
        trailer = align(nul + 1)
        if trailer + 8 <= record_end:
            event_nr, flags = _NAME_LIST_TRAILER.unpack_from(buffer, trailer)
            if flags & DM_NAME_LIST_FLAG_HAS_UUID:
                raw_uuid, _ = _string_at(buffer, trailer + 8, record_end)
                uuid = os.fsdecode(raw_uuid)
        entries.append(NameListEntry(os.fsdecode(raw_name), dev, event_nr, uuid))
        if next_offset == 0:
            return entries
        if next_offset < NAME_LIST_NAME_OFFSET:
            raise MalformedReply(f"name list record at {offset} has next={next_offset}")
        offset += next_offset


def decode_text(buffer: bytes | bytearray, reply: Reply) -> str:
    """The NUL-terminated text at data_start (a target message's reply)."""
    start, end = _data_bounds(buffer, reply)
    text, _ = _string_at(buffer, start, end)
    return text.decode(errors="replace")
