"""The dm ioctl encoding and the driver's logic, against a fake kernel (no dm needed)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmfs.pool import dmioctl_abi as abi
from dmfs.pool.dm import DeviceExists, DeviceMapper, DmError, NoData, NoSuchDevice, Target
from dmfs.pool.dmioctl import INITIAL_REPLY_ROOM, IoctlDriver
from dmfs.pool.dmioctl_abi import (
    DmIoctlHeader,
    DmNameList,
    DmTargetMsg,
    DmTargetSpec,
    Reply,
    decode_name_list,
    decode_reply,
    decode_targets,
    encode_message,
    encode_request,
    encode_table,
)

# offsetof() of every field of struct dm_ioctl and dm_target_spec in linux/dm-ioctl.h.
DM_IOCTL_OFFSETS = {
    "version": 0, "data_size": 12, "data_start": 16, "target_count": 20, "open_count": 24,
    "flags": 28, "event_nr": 32, "padding": 36, "dev": 40, "name": 48, "uuid": 176,
    "data": 305,
}
TARGET_SPEC_OFFSETS = {"sector_start": 0, "length": 8, "status": 16, "next": 20,
                       "target_type": 24}
# _IOWR(0xfd, nr, struct dm_ioctl) with sizeof = 312 = 0x138.
IOCTL_NUMBERS = {
    "DM_VERSION": (abi.DM_VERSION_CMD, 0xC138FD00),
    "DM_LIST_DEVICES": (abi.DM_LIST_DEVICES_CMD, 0xC138FD02),
    "DM_DEV_CREATE": (abi.DM_DEV_CREATE_CMD, 0xC138FD03),
    "DM_DEV_REMOVE": (abi.DM_DEV_REMOVE_CMD, 0xC138FD04),
    "DM_DEV_SUSPEND": (abi.DM_DEV_SUSPEND_CMD, 0xC138FD06),
    "DM_DEV_STATUS": (abi.DM_DEV_STATUS_CMD, 0xC138FD07),
    "DM_DEV_WAIT": (abi.DM_DEV_WAIT_CMD, 0xC138FD08),
    "DM_TABLE_LOAD": (abi.DM_TABLE_LOAD_CMD, 0xC138FD09),
    "DM_TABLE_STATUS": (abi.DM_TABLE_STATUS_CMD, 0xC138FD0C),
    "DM_TARGET_MSG": (abi.DM_TARGET_MSG_CMD, 0xC138FD0E),
}
FLAGS = {
    "DM_READONLY_FLAG": 0x1, "DM_SUSPEND_FLAG": 0x2, "DM_PERSISTENT_DEV_FLAG": 0x8,
    "DM_STATUS_TABLE_FLAG": 0x10, "DM_ACTIVE_PRESENT_FLAG": 0x20,
    "DM_INACTIVE_PRESENT_FLAG": 0x40, "DM_BUFFER_FULL_FLAG": 0x100,
    "DM_SKIP_LOCKFS_FLAG": 0x400, "DM_NOFLUSH_FLAG": 0x800,
    "DM_QUERY_INACTIVE_TABLE_FLAG": 0x1000, "DM_UEVENT_GENERATED_FLAG": 0x2000,
    "DM_UUID_FLAG": 0x4000, "DM_SECURE_DATA_FLAG": 0x8000, "DM_DATA_OUT_FLAG": 0x10000,
    "DM_DEFERRED_REMOVE": 0x20000, "DM_INTERNAL_SUSPEND_FLAG": 0x40000,
}


# -- layout -------------------------------------------------------------------

def test_struct_sizes_match_the_kernel_header() -> None:
    assert ctypes.sizeof(DmIoctlHeader) == abi.HEADER_SIZE == 312
    assert ctypes.sizeof(DmTargetSpec) == abi.TARGET_SPEC_SIZE == 40
    assert ctypes.sizeof(DmNameList) == 16  # u64 dev, u32 next, padded to 8
    assert abi.NAME_LIST_NAME_OFFSET == 12  # the flexible name[] starts right after next
    assert ctypes.sizeof(DmTargetMsg) == 8


@pytest.mark.parametrize(("structure", "offsets"), [(DmIoctlHeader, DM_IOCTL_OFFSETS),
                                                     (DmTargetSpec, TARGET_SPEC_OFFSETS)])
def test_field_offsets_match_the_kernel_header(structure: type[ctypes.Structure],
                                               offsets: dict[str, int]) -> None:
    assert {name: getattr(structure, name).offset for name, _ in structure._fields_} == offsets


@pytest.mark.parametrize("name", sorted(IOCTL_NUMBERS))
def test_ioctl_numbers(name: str) -> None:
    command, number = IOCTL_NUMBERS[name]
    assert abi.dm_request(command, abi.GENERIC_IOC) == number


def test_ioctl_encodings_of_other_architectures() -> None:
    assert abi.native_ioc_encoding("x86_64") is abi.GENERIC_IOC
    assert abi.native_ioc_encoding("ppc64le") is abi.LEGACY_IOC
    assert abi.native_ioc_encoding("mips64") is abi.LEGACY_IOC
    # Three direction bits at 29 and 13 size bits: 6 << 29 == 3 << 30, so the
    # dm numbers happen to coincide, but a size needing 14 bits does not fit.
    assert abi.dm_request(abi.DM_DEV_CREATE_CMD, abi.LEGACY_IOC) == 0xC138FD03
    assert abi.LEGACY_IOC.iowr(0xFD, 1, 0x1FFF) == 0xDFFFFD01
    with pytest.raises(ValueError, match="13 bits"):
        abi.LEGACY_IOC.iowr(0xFD, 1, 0x2000)


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_flag_values(name: str) -> None:
    assert getattr(abi, name) == FLAGS[name]


def test_udev_cookie_puts_flags_in_the_upper_half() -> None:
    assert abi.udev_cookie(abi.DM_UDEV_PRIMARY_SOURCE_FLAG) == 0x00400000
    cookie = abi.udev_cookie(abi.DM_UDEV_DISABLE_DM_RULES_FLAG
                             | abi.DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG)
    assert cookie & ~abi.DM_UDEV_FLAGS_MASK == 0  # no semaphore: udevcomplete ignores it
    assert cookie >> abi.DM_UDEV_FLAGS_SHIFT == 0x3
    with pytest.raises(ValueError):
        abi.udev_cookie(0x10000)


HEADER_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/dm-ioctl.h>
#define OFF(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f))
int main(void) {
    printf("sizeof.dm_ioctl %zu\nsizeof.dm_target_spec %zu\nsizeof.dm_target_msg %zu\n",
           sizeof(struct dm_ioctl), sizeof(struct dm_target_spec),
           sizeof(struct dm_target_msg));
    OFF(dm_ioctl, version); OFF(dm_ioctl, data_size); OFF(dm_ioctl, data_start);
    OFF(dm_ioctl, target_count); OFF(dm_ioctl, open_count); OFF(dm_ioctl, flags);
    OFF(dm_ioctl, event_nr); OFF(dm_ioctl, padding); OFF(dm_ioctl, dev);
    OFF(dm_ioctl, name); OFF(dm_ioctl, uuid); OFF(dm_ioctl, data);
    OFF(dm_target_spec, sector_start); OFF(dm_target_spec, length);
    OFF(dm_target_spec, status); OFF(dm_target_spec, next); OFF(dm_target_spec, target_type);
    OFF(dm_name_list, name);
    printf("ioctl.DM_VERSION %lu\nioctl.DM_LIST_DEVICES %lu\nioctl.DM_DEV_CREATE %lu\n"
           "ioctl.DM_DEV_REMOVE %lu\nioctl.DM_DEV_SUSPEND %lu\nioctl.DM_DEV_STATUS %lu\n"
           "ioctl.DM_DEV_WAIT %lu\nioctl.DM_TABLE_LOAD %lu\nioctl.DM_TABLE_STATUS %lu\n"
           "ioctl.DM_TARGET_MSG %lu\n",
           (unsigned long)DM_VERSION, (unsigned long)DM_LIST_DEVICES,
           (unsigned long)DM_DEV_CREATE, (unsigned long)DM_DEV_REMOVE,
           (unsigned long)DM_DEV_SUSPEND, (unsigned long)DM_DEV_STATUS,
           (unsigned long)DM_DEV_WAIT, (unsigned long)DM_TABLE_LOAD,
           (unsigned long)DM_TABLE_STATUS, (unsigned long)DM_TARGET_MSG);
    printf("flag.DM_READONLY_FLAG %u\nflag.DM_SUSPEND_FLAG %u\nflag.DM_STATUS_TABLE_FLAG %u\n"
           "flag.DM_ACTIVE_PRESENT_FLAG %u\nflag.DM_INACTIVE_PRESENT_FLAG %u\n"
           "flag.DM_BUFFER_FULL_FLAG %u\nflag.DM_NOFLUSH_FLAG %u\n"
           "flag.DM_UEVENT_GENERATED_FLAG %u\nflag.DM_DATA_OUT_FLAG %u\n"
           "flag.DM_DEFERRED_REMOVE %u\n",
           DM_READONLY_FLAG, DM_SUSPEND_FLAG, DM_STATUS_TABLE_FLAG, DM_ACTIVE_PRESENT_FLAG,
           DM_INACTIVE_PRESENT_FLAG, DM_BUFFER_FULL_FLAG, DM_NOFLUSH_FLAG,
           DM_UEVENT_GENERATED_FLAG, DM_DATA_OUT_FLAG, DM_DEFERRED_REMOVE);
    return 0;
}
"""


def test_layout_agrees_with_the_installed_kernel_header(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/linux/dm-ioctl.h").exists():
        pytest.skip("needs a C compiler and linux/dm-ioctl.h (linux-libc-dev)")
    source, program = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(HEADER_PROBE)
    subprocess.run([compiler, "-o", str(program), str(source)], check=True)
    facts = dict(line.split() for line in subprocess.run(
        [str(program)], capture_output=True, text=True, check=True).stdout.splitlines())
    ours = {
        "sizeof.dm_ioctl": ctypes.sizeof(DmIoctlHeader),
        "sizeof.dm_target_spec": ctypes.sizeof(DmTargetSpec),
        "sizeof.dm_target_msg": ctypes.sizeof(DmTargetMsg),
        "dm_name_list.name": abi.NAME_LIST_NAME_OFFSET,
    }
    ours |= {f"dm_ioctl.{field}": offset for field, offset in DM_IOCTL_OFFSETS.items()}
    ours |= {f"dm_target_spec.{field}": offset
             for field, offset in TARGET_SPEC_OFFSETS.items()}
    ours |= {f"ioctl.{name}": abi.dm_request(command) for name, (command, _) in
             IOCTL_NUMBERS.items()}
    ours |= {key: getattr(abi, key.removeprefix("flag."))
             for key in facts if key.startswith("flag.")}
    assert {key: int(value) for key, value in facts.items()} == ours


# -- encoding -----------------------------------------------------------------

def test_request_header_and_payload() -> None:
    buffer = encode_request(name=b"pool", uuid=b"LVM-x", flags=abi.DM_READONLY_FLAG,
                            event_nr=0x00400000, target_count=2, payload=b"abc",
                            buffer_size=1024)
    assert len(buffer) == 1024
    header = DmIoctlHeader.from_buffer_copy(buffer)
    assert list(header.version) == [4, 0, 0]
    assert (header.data_size, header.data_start, header.target_count) == (1024, 312, 2)
    assert (header.flags, header.event_nr) == (abi.DM_READONLY_FLAG, 0x00400000)
    assert (header.name, header.uuid) == (b"pool", b"LVM-x")
    assert buffer[312:316] == b"abc\0"
    # Without a buffer size the request is exactly header + payload.
    assert len(encode_request(name=b"x", payload=b"12345")) == 317


def test_table_encoding() -> None:
    payload = encode_table([Target(0, 2048, "thin", "254:0 5"),
                            Target(2048, 100, "zero", "")])
    first = DmTargetSpec.from_buffer_copy(payload, 0)
    assert (first.sector_start, first.length, first.target_type) == (0, 2048, b"thin")
    # 40-byte spec + "254:0 5\0" (8 bytes) = 48, already aligned.
    assert first.next == 48
    assert payload[40:48] == b"254:0 5\0"
    second = DmTargetSpec.from_buffer_copy(payload, first.next)
    assert (second.sector_start, second.length, second.target_type) == (2048, 100, b"zero")
    # On load, next is relative to the spec itself: 40 + "\0", aligned to 48.
    assert second.next == 48
    assert len(payload) == 96
    assert payload[88] == 0


def test_table_encoding_pads_params_to_eight_bytes() -> None:
    payload = encode_table([Target(0, 8, "linear", "7:0 0")])
    spec = DmTargetSpec.from_buffer_copy(payload, 0)
    assert spec.next == len(payload) == 48
    assert payload[40:46] == b"7:0 0\0"


@pytest.mark.parametrize(("target", "problem"), [
    (Target(0, 8, "a-very-long-type-name", ""), "target type"),
    (Target(0, 8, "", ""), "target type"),
    (Target(0, 8, "linear", "7:0\0 0"), "NUL"),
])
def test_table_encoding_refuses_what_the_kernel_cannot_take(target: Target,
                                                            problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        encode_table([target])


def test_message_encoding() -> None:
    payload = encode_message(0, "create_thin 5")
    assert payload == struct.pack("=Q", 0) + b"create_thin 5\0"
    assert encode_message(2048, "x")[:8] == struct.pack("=Q", 2048)
    with pytest.raises(ValueError):
        encode_message(0, "")


# -- decoding -----------------------------------------------------------------

def reply_buffer(data: bytes, *, flags: int = 0, target_count: int = 0,
                 room: int = 0) -> bytearray:
    """A buffer as the kernel leaves it: header, then ``data`` at data_start."""
    buffer = encode_request(name=b"dev", flags=flags, target_count=target_count,
                            payload=data, buffer_size=room)
    header = DmIoctlHeader.from_buffer(buffer)
    header.data_size = abi.HEADER_SIZE + len(data)
    del header
    return buffer


def status_data(targets: list[tuple[int, int, str, str]]) -> bytes:
    """DM_TABLE_STATUS output: each ``next`` counts from the first spec."""
    data = b""
    for start, length, target_type, params in targets:
        record_end = abi.align(len(data) + abi.TARGET_SPEC_SIZE + len(params) + 1)
        spec = DmTargetSpec(sector_start=start, length=length, next=record_end,
                            target_type=target_type.encode())
        data += bytes(spec) + params.encode() + b"\0"
        data += bytes(record_end - len(data))
    return data


def test_status_decoding() -> None:
    lines = [(0, 1048576, "thin-pool", "0 418/4096 0/8192 - rw discard_passdown "
              "error_if_no_space - 1024 "),
             (1048576, 8, "error", "")]
    buffer = reply_buffer(status_data(lines), target_count=2)
    reply = decode_reply(buffer)
    assert decode_targets(buffer, reply) == [Target(*line) for line in lines]


def test_status_decoding_rejects_a_spec_beyond_the_reply() -> None:
    buffer = reply_buffer(status_data([(0, 8, "zero", "")]), target_count=2)
    with pytest.raises(abi.MalformedReply):
        decode_targets(buffer, decode_reply(buffer))


def name_list_data(devices: list[tuple[str, int, int]], *, trailer: bool = True,
                   uuids: dict[str, str] | None = None) -> bytes:
    """DM_LIST_DEVICES output as the kernel writes it (with or without the 5.13 trailer)."""
    records = []
    for name, dev, event_nr in devices:
        record = struct.pack("=QI", dev, 0) + name.encode() + b"\0"
        record += bytes(abi.align(len(record)) - len(record))
        if trailer:
            uuid = (uuids or {}).get(name)
            flags = 0 if uuids is None else (abi.DM_NAME_LIST_FLAG_HAS_UUID if uuid
                                             else abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID)
            record += struct.pack("=II", event_nr, flags)
            if uuid:
                record += uuid.encode() + b"\0"
                record += bytes(abi.align(len(record)) - len(record))
        records.append(record)
    data = b""
    for index, record in enumerate(records):
        if index + 1 < len(records):
            record = record[:8] + struct.pack("=I", len(record)) + record[12:]
        data += record
    return data


DEVICES = [("pool", os.makedev(254, 0), 3), ("a-thin-device-name", os.makedev(254, 1), 0),
           ("x", os.makedev(254, 300), 7)]


@pytest.mark.parametrize("trailer", [True, False], ids=["kernel-5.13+", "older-kernel"])
def test_name_list_decoding(trailer: bool) -> None:
    buffer = reply_buffer(name_list_data(DEVICES, trailer=trailer))
    entries = decode_name_list(buffer, decode_reply(buffer))
    assert [(entry.name, entry.dev) for entry in entries] == [(n, d) for n, d, _ in DEVICES]
    assert [entry.devnum for entry in entries] == [(254, 0), (254, 1), (254, 300)]
    expected_events = [e for _, _, e in DEVICES] if trailer else [None] * 3
    assert [entry.event_nr for entry in entries] == expected_events


def test_name_list_decoding_with_uuids() -> None:
    data = name_list_data(DEVICES, uuids={"pool": "DMFS-pool-0001"})
    buffer = reply_buffer(data)
    entries = decode_name_list(buffer, decode_reply(buffer))
    assert [entry.uuid for entry in entries] == ["DMFS-pool-0001", None, None]


def test_empty_name_list() -> None:
    # The kernel writes a record with dev 0 when there is no device at all.
    buffer = reply_buffer(struct.pack("=QI", 0, 0) + bytes(4))
    assert decode_name_list(buffer, decode_reply(buffer)) == []


def test_name_list_with_a_looping_next_is_refused() -> None:
    data = bytearray(name_list_data(DEVICES))
    struct.pack_into("=I", data, 8, 4)  # next shorter than a record header
    buffer = reply_buffer(bytes(data))
    with pytest.raises(abi.MalformedReply):
        decode_name_list(buffer, decode_reply(buffer))


# -- the driver against a fake kernel ------------------------------------------

class FakeKernel:
    """An ``ioctl`` function that answers dm commands like the kernel does.

    Replies that do not fit set DM_BUFFER_FULL_FLAG.  ``fail`` maps a command
    number to the errno it raises.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []  # (command, buffer size, name)
        self.fail: dict[int, int] = {}
        self.interrupt_once: set[int] = set()
        self.devices: list[tuple[str, int, int]] = []
        self.status_lines: list[tuple[int, int, str, str]] = []
        self.message_reply = ""
        self.event_nr = 0
        self.open_devices: set[str] = set()

    def __call__(self, fd: int, request: int, buffer: bytearray) -> int:
        command = request & 0xFF
        assert request == abi.dm_request(command, abi.GENERIC_IOC)
        header = DmIoctlHeader.from_buffer(buffer)
        assert header.data_size == len(buffer)
        assert header.data_start == abi.HEADER_SIZE
        self.calls.append((command, len(buffer), header.name.decode()))
        if command in self.interrupt_once:
            self.interrupt_once.discard(command)
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        if command in self.fail:
            raise OSError(self.fail[command], os.strerror(self.fail[command]))
        header.version[:] = (4, 47, 0)
        answer = self._answer(command, header)
        if answer is not None:
            room = header.data_size - header.data_start
            if len(answer) > room:
                header.flags |= abi.DM_BUFFER_FULL_FLAG
            else:
                buffer[abi.HEADER_SIZE:abi.HEADER_SIZE + len(answer)] = answer
                header.data_size = abi.HEADER_SIZE + len(answer)
        return 0

    def _answer(self, command: int, header: DmIoctlHeader) -> bytes | None:
        header.dev = os.makedev(254, 7)
        if command == abi.DM_LIST_DEVICES_CMD:
            return name_list_data(self.devices)
        if command == abi.DM_TABLE_STATUS_CMD:
            header.target_count = len(self.status_lines)
            return status_data(self.status_lines)
        if command == abi.DM_TARGET_MSG_CMD and self.message_reply:
            header.flags |= abi.DM_DATA_OUT_FLAG
            return self.message_reply.encode() + b"\0"
        if command == abi.DM_DEV_WAIT_CMD:
            header.event_nr = self.event_nr
            return b"x" * 4096  # the status the kernel appends after the wait
        if command == abi.DM_DEV_REMOVE_CMD and header.name.decode() not in self.open_devices:
            header.flags &= ~abi.DM_DEFERRED_REMOVE  # set on return only while still open
        if command == abi.DM_DEV_STATUS_CMD:
            header.flags = abi.DM_ACTIVE_PRESENT_FLAG | abi.DM_SUSPEND_FLAG
            header.open_count, header.target_count, header.event_nr = 2, 1, 9
        return None

    def commands(self) -> list[int]:
        return [command for command, _, _ in self.calls]


class NoWatch:
    def wait_for(self, operation: str, name: str, devnum: tuple[int, int],
                 action: str) -> None:
        return None


class RecordingNodes:
    """A DeviceNodes that records what the driver asks of it."""

    cookie = abi.udev_cookie(abi.DM_UDEV_PRIMARY_SOURCE_FLAG)
    waits_for_udev = False
    directory = Path("/dev/mapper")

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def watch(self) -> contextlib.nullcontext[NoWatch]:
        return contextlib.nullcontext(NoWatch())

    def after_create(self, name: str, devnum: tuple[int, int]) -> None:
        self.log.append(("create", name))

    def after_resume(self, name: str, devnum: tuple[int, int]) -> None:
        self.log.append(("resume", name))

    def after_remove(self, name: str) -> None:
        self.log.append(("remove", name))


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def nodes() -> RecordingNodes:
    return RecordingNodes()


@pytest.fixture
def driver(kernel: FakeKernel, nodes: RecordingNodes) -> Iterator[IoctlDriver]:
    with IoctlDriver("/dev/null", nodes=nodes, ioctl=kernel) as driver:
        yield driver


def test_driver_implements_the_interface(driver: IoctlDriver) -> None:
    assert isinstance(driver, DeviceMapper)
    assert driver.name == "ioctl"
    assert driver.version() == "4.47.0"
    assert driver.device_path("thin-1") == "/dev/mapper/thin-1"


def test_device_list_grows_the_buffer_until_it_fits(driver: IoctlDriver,
                                                    kernel: FakeKernel) -> None:
    kernel.devices = [(f"thin-device-{i:04d}", os.makedev(254, i), i) for i in range(1000)]
    needed = len(name_list_data(kernel.devices))
    assert needed > 2 * INITIAL_REPLY_ROOM
    devices = driver.list_devices()
    assert len(devices) == 1000
    assert devices["thin-device-0777"] == (254, 777)
    sizes = [size for command, size, _ in kernel.calls if command == abi.DM_LIST_DEVICES_CMD]
    assert sizes[0] == INITIAL_REPLY_ROOM
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(sizes))
    assert sizes[-1] - abi.HEADER_SIZE >= needed > sizes[-2] - abi.HEADER_SIZE
    # The next list starts with the size that worked: one ioctl.
    kernel.calls.clear()
    assert len(driver.list_devices()) == 1000
    assert kernel.commands() == [abi.DM_LIST_DEVICES_CMD]


def test_long_status_lines_grow_the_buffer(driver: IoctlDriver, kernel: FakeKernel) -> None:
    kernel.status_lines = [(i * 8, 8, "striped", "x" * 100 + str(i)) for i in range(400)]
    status = driver.status("big")
    assert len(status) == 400
    assert status[399] == Target(399 * 8, 8, "striped", "x" * 100 + "399")
    assert kernel.commands().count(abi.DM_TABLE_STATUS_CMD) > 1


def test_table_asks_for_the_table_flag(driver: IoctlDriver, kernel: FakeKernel) -> None:
    seen: list[int] = []
    original = kernel._answer

    def answer(command: int, header: DmIoctlHeader) -> bytes | None:
        seen.append(header.flags)
        return original(command, header)
    kernel._answer = answer  # type: ignore[method-assign]
    kernel.status_lines = [(0, 2048, "thin", "254:0 1 ")]
    assert driver.table("thin") == [Target(0, 2048, "thin", "254:0 1")]
    assert driver.status("thin")
    assert seen[0] & abi.DM_STATUS_TABLE_FLAG and not seen[1] & abi.DM_STATUS_TABLE_FLAG
    assert not seen[1] & abi.DM_NOFLUSH_FLAG
    assert driver.status("thin", flush=False)
    assert seen[2] & abi.DM_NOFLUSH_FLAG and not seen[2] & abi.DM_STATUS_TABLE_FLAG


def test_long_message_reply_grows_the_buffer(driver: IoctlDriver, kernel: FakeKernel) -> None:
    kernel.message_reply = "".join(f"{i * 8}+8 0 0 0 0 0 0 0 0 0 0 0\n" for i in range(2000))
    reply = driver.message("dev", "@stats_print 0")
    assert len(reply.splitlines()) == 2000
    assert kernel.commands().count(abi.DM_TARGET_MSG_CMD) > 1


def test_message_without_reply_text(driver: IoctlDriver, kernel: FakeKernel) -> None:
    assert driver.message("pool", "create_thin 5") == ""
    assert kernel.commands()[-1] == abi.DM_TARGET_MSG_CMD


def test_info_decodes_the_status_reply(driver: IoctlDriver) -> None:
    info = driver.info("thin-1")
    assert (info.name, info.devnum) == ("thin-1", (254, 7))
    assert (info.open_count, info.target_count, info.event_nr) == (2, 1, 9)
    assert info.live_table and info.suspended
    assert not (info.inactive_table or info.read_only)


@pytest.mark.parametrize(("err", "error_type"), [
    (errno.EEXIST, DeviceExists), (errno.ENODATA, NoData), (errno.ENXIO, NoSuchDevice)])
def test_kernel_errors_become_typed_errors(driver: IoctlDriver, kernel: FakeKernel, err: int,
                                           error_type: type[DmError]) -> None:
    kernel.fail[abi.DM_TARGET_MSG_CMD] = err
    with pytest.raises(error_type) as raised:
        driver.message("my-pool", "create_thin 1")
    assert raised.value.errno == err
    assert "message on my-pool" in str(raised.value)


def test_interrupted_ioctl_is_repeated(driver: IoctlDriver, kernel: FakeKernel) -> None:
    kernel.interrupt_once.add(abi.DM_DEV_WAIT_CMD)
    kernel.event_nr = 4
    assert driver.wait_event("pool", 3) == 4
    assert kernel.commands()[-2:] == [abi.DM_DEV_WAIT_CMD, abi.DM_DEV_WAIT_CMD]


def test_wait_ignores_the_full_status_buffer(driver: IoctlDriver, kernel: FakeKernel) -> None:
    kernel.event_nr = 12
    assert driver.wait_event("pool", 11) == 12
    # Waiting again just to make room for a status nobody reads would wait twice.
    assert kernel.commands().count(abi.DM_DEV_WAIT_CMD) == 1
    with pytest.raises(DmError) as raised:
        driver.wait_event("pool", -1)
    assert raised.value.errno == errno.EINVAL


def test_create_sends_create_load_resume(driver: IoctlDriver, kernel: FakeKernel,
                                        nodes: RecordingNodes) -> None:
    info = driver.create("thin-1", [Target(0, 2048, "thin", "254:0 1")], read_only=True,
                         uuid="DMFS-1")
    assert kernel.commands()[-3:] == [abi.DM_DEV_CREATE_CMD, abi.DM_TABLE_LOAD_CMD,
                                      abi.DM_DEV_SUSPEND_CMD]
    assert info.devnum == (254, 7)
    assert nodes.log == [("create", "thin-1")]


def recorded_flags(kernel: FakeKernel, command: int) -> Callable[[], list[tuple[int, int]]]:
    """Start recording (flags, event_nr) of ``command``; call the result to read them."""
    seen: list[tuple[int, int]] = []
    original = kernel._answer

    def answer(cmd: int, header: DmIoctlHeader) -> bytes | None:
        if cmd == command:
            seen.append((header.flags, header.event_nr))
        return original(cmd, header)
    kernel._answer = answer  # type: ignore[method-assign]
    return lambda: seen


def test_suspend_resume_and_remove_flags(driver: IoctlDriver, kernel: FakeKernel,
                                         nodes: RecordingNodes) -> None:
    suspends = recorded_flags(kernel, abi.DM_DEV_SUSPEND_CMD)
    driver.suspend("d")
    driver.suspend("d", flush=False)
    driver.resume("d")
    assert [flags for flags, _ in suspends()] == [
        abi.DM_SUSPEND_FLAG, abi.DM_SUSPEND_FLAG | abi.DM_NOFLUSH_FLAG, 0]
    # Only the resume carries the udev cookie (suspend sends no uevent).
    assert suspends()[2][1] == nodes.cookie
    removes = recorded_flags(kernel, abi.DM_DEV_REMOVE_CMD)
    driver.remove("d", deferred=True)
    assert removes() == [(abi.DM_DEFERRED_REMOVE, nodes.cookie)]
    assert nodes.log == [("resume", "d"), ("remove", "d")]


def test_deferred_remove_of_an_open_device_keeps_its_node(
        driver: IoctlDriver, kernel: FakeKernel, nodes: RecordingNodes) -> None:
    kernel.open_devices.add("held")
    driver.remove("held", deferred=True)
    assert kernel.commands()[-1] == abi.DM_DEV_REMOVE_CMD
    assert nodes.log == []


def test_failed_table_load_removes_the_half_created_device(
        driver: IoctlDriver, kernel: FakeKernel, nodes: RecordingNodes) -> None:
    kernel.fail[abi.DM_TABLE_LOAD_CMD] = errno.ENODATA
    with pytest.raises(NoData) as raised:
        driver.create("thin-9", [Target(0, 2048, "thin", "254:0 9")])
    assert "create: load table on thin-9" in str(raised.value)
    assert kernel.calls[-1][0::2] == (abi.DM_DEV_REMOVE_CMD, "thin-9")
    assert nodes.log == [("remove", "thin-9")]


def test_failed_resume_removes_the_half_created_device(driver: IoctlDriver,
                                                       kernel: FakeKernel) -> None:
    kernel.fail[abi.DM_DEV_SUSPEND_CMD] = errno.EINVAL
    with pytest.raises(DmError) as raised:
        driver.create("thin-9", [Target(0, 2048, "thin", "254:0 9")])
    assert "dmesg" in str(raised.value)
    assert kernel.commands()[-1] == abi.DM_DEV_REMOVE_CMD


def test_create_of_an_existing_name_leaves_that_device_alone(driver: IoctlDriver,
                                                             kernel: FakeKernel) -> None:
    kernel.fail[abi.DM_DEV_CREATE_CMD] = errno.EBUSY
    with pytest.raises(DmError) as raised:
        driver.create("taken", [Target(0, 8, "zero", "")])
    assert raised.value.errno == errno.EBUSY
    assert abi.DM_DEV_REMOVE_CMD not in kernel.commands()


def test_failed_undo_is_told_too(driver: IoctlDriver, kernel: FakeKernel) -> None:
    kernel.fail[abi.DM_TABLE_LOAD_CMD] = errno.ENODATA
    kernel.fail[abi.DM_DEV_REMOVE_CMD] = errno.EBUSY
    with pytest.raises(NoData) as raised:
        driver.create("thin-9", [Target(0, 8, "thin", "254:0 9")])
    assert any("could not be removed" in note for note in raised.value.__notes__)


@pytest.mark.parametrize(("name", "uuid", "problem"), [
    ("n" * 128, "", "at most 127"),
    ("ok", "u" * 129, "at most 128"),
    ("a/b", "", "'/'"),
    ("", "", "empty"),
    ("..", "", "cannot be a device name"),
])
def test_invalid_names_are_refused_before_any_ioctl(driver: IoctlDriver, kernel: FakeKernel,
                                                     name: str, uuid: str,
                                                     problem: str) -> None:
    kernel.calls.clear()
    with pytest.raises(DmError, match=problem) as raised:
        driver.create(name, [Target(0, 8, "zero", "")], uuid=uuid)
    assert raised.value.errno == errno.EINVAL
    assert kernel.calls == []


def test_longest_name_and_uuid_fit(driver: IoctlDriver, kernel: FakeKernel) -> None:
    driver.create("n" * 127, [Target(0, 8, "zero", "")], uuid="u" * 128)
    assert kernel.calls[-3][2] == "n" * 127


def test_missing_control_device_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no device-mapper"):
        IoctlDriver(str(tmp_path / "control"), nodes=RecordingNodes(), ioctl=FakeKernel())


def test_reply_dev_decodes_to_major_minor() -> None:
    reply = Reply((4, 47, 0), 312, 312, 0, 0, 0, 0, os.makedev(253, 1048575), "d", "")
    assert reply.devnum == (253, 1048575)
