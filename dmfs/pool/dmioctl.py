"""A :class:`~dmfs.pool.dm.DeviceMapper` that speaks the device-mapper ioctls.

Every operation is one or a few ioctls on ``/dev/mapper/control`` (no process,
no libdevmapper), so it costs microseconds where the dmsetup driver spends
milliseconds starting a process.  The encoding lives in
:mod:`dmfs.pool.dmioctl_abi`, the ``/dev/mapper/<name>`` nodes in
:mod:`dmfs.pool.dmnodes`.  Kernel errors arrive as :class:`~dmfs.pool.dm.DmError`
subclasses chosen by errno, naming the device and the operation.

The driver is blocking and thread-safe: each call builds its own buffer, and
the control file descriptor carries no state between ioctls.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from dmfs.pool.dm import DeviceInfo, DmError, Target, dm_error
from dmfs.pool.dmioctl_abi import (
    DM_ACTIVE_PRESENT_FLAG,
    DM_BUFFER_FULL_FLAG,
    DM_DATA_OUT_FLAG,
    DM_DEFERRED_REMOVE,
    DM_DEV_ARM_POLL_CMD,
    DM_DEV_CREATE_CMD,
    DM_DEV_REMOVE_CMD,
    DM_DEV_STATUS_CMD,
    DM_DEV_SUSPEND_CMD,
    DM_DEV_WAIT_CMD,
    DM_INACTIVE_PRESENT_FLAG,
    DM_LIST_DEVICES_CMD,
    DM_NOFLUSH_FLAG,
    DM_READONLY_FLAG,
    DM_STATUS_TABLE_FLAG,
    DM_SUSPEND_FLAG,
    DM_TABLE_LOAD_CMD,
    DM_TABLE_STATUS_CMD,
    DM_TARGET_MSG_CMD,
    DM_UEVENT_GENERATED_FLAG,
    DM_VERSION_CMD,
    MalformedReply,
    Reply,
    decode_name_list,
    decode_reply,
    decode_targets,
    decode_text,
    dm_request,
    encode_device_name,
    encode_message,
    encode_request,
    encode_table,
    encode_uuid,
    native_ioc_encoding,
)
from dmfs.pool.dmnodes import DEFAULT_UDEV_TIMEOUT, DeviceNodes, device_nodes

CONTROL_PATH = "/dev/mapper/control"
# Room for replies that carry data (device lists, status lines, message
# replies); it doubles, per command, each time the kernel says it was too small.
INITIAL_REPLY_ROOM = 16 * 1024
MAX_BUFFER = 64 * 2**20
MAX_EVENT_NR = 2**32 - 1

Decoded = TypeVar("Decoded")
#: ``fcntl.ioctl``'s shape: (fd, request, mutable buffer) -> result
IoctlFunction = Callable[[int, int, bytearray], object]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl_without_gil(fd: int, request: int, buffer: bytearray) -> int:
    """ioctl(2) on a buffer the kernel reads and writes in place.

    Not fcntl.ioctl: for buffers over 1024 bytes CPython (3.11) calls ioctl
    *holding the GIL*, so one that blocks (a status waiting for a pool's
    metadata commit while its data device is suspended, DM_DEV_WAIT) would
    freeze every thread of the daemon.  ctypes releases the GIL around the call.
    """
    address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    result = _libc.ioctl(fd, request, address)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # EINTR comes out as InterruptedError
    return result


class IoctlDriver:
    """Device-mapper through its ioctls on ``/dev/mapper/control``.

    ``nodes`` decides who makes ``/dev/mapper/<name>`` (by default: udev when
    udevd runs and ``DM_DISABLE_UDEV`` is unset, else this driver); ``ioctl``
    replaces ``fcntl.ioctl`` (tests inject a fake kernel).
    """

    name = "ioctl"

    def __init__(self, control: str = CONTROL_PATH, *, nodes: DeviceNodes | None = None,
                 udev_timeout: float = DEFAULT_UDEV_TIMEOUT,
                 ioctl: IoctlFunction = ioctl_without_gil) -> None:
        self._ioctl = ioctl
        self._control = control
        self._encoding = native_ioc_encoding()
        self._reply_room: dict[int, int] = {}
        self._nodes = nodes if nodes is not None else device_nodes(udev_timeout=udev_timeout)
        try:
            self._fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno_codes.ENOENT,
                f"{control} not found: this kernel has no device-mapper (modprobe dm_mod)",
                control) from None
        try:
            self.kernel_version = self._call(DM_VERSION_CMD, "version", None).version
        except BaseException:
            self.close()
            raise
        if self.kernel_version[0] != 4:
            self.close()
            raise DmError(errno_codes.EPROTO, "version", None,
                          f"kernel speaks dm ioctl interface {self._version_text()}, "
                          f"this driver speaks 4")

    # -- plumbing ---------------------------------------------------------

    def fileno(self) -> int:
        """The open /dev/mapper/control."""
        return self._fd

    def close(self) -> None:
        """Close the control device; the driver is unusable afterwards."""
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> IoctlDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _version_text(self) -> str:
        return ".".join(str(part) for part in self.kernel_version)

    def _call(self, command: int, operation: str, name: str | None, *, flags: int = 0,
              event_nr: int = 0, uuid: str = "", payload: bytes = b"",
              target_count: int = 0, wants_data: bool = False,
              grow: bool = True) -> Reply:
        """One ioctl whose reply carries no data: just the header."""
        reply, _ = self._call_with_data(
            command, operation, name, flags=flags, event_nr=event_nr, uuid=uuid,
            payload=payload, target_count=target_count, wants_data=wants_data, grow=grow)
        return reply

    def _call_with_data(self, command: int, operation: str, name: str | None, *,
                        flags: int = 0, event_nr: int = 0, uuid: str = "",
                        payload: bytes = b"", target_count: int = 0,
                        wants_data: bool = False,
                        grow: bool = True) -> tuple[Reply, bytearray]:
        """One ioctl, repeated with a bigger buffer while the kernel reports it full."""
        try:
            raw_name = b"" if name is None else encode_device_name(name)
            raw_uuid = encode_uuid(uuid)
        except ValueError as error:
            raise DmError(errno_codes.EINVAL, operation, name, str(error)) from None
        request = dm_request(command, self._encoding)
        size = self._reply_room.get(command, INITIAL_REPLY_ROOM) if wants_data else 0
        while True:
            buffer = encode_request(name=raw_name, uuid=raw_uuid, flags=flags,
                                    event_nr=event_nr, target_count=target_count,
                                    payload=payload, buffer_size=size)
            try:
                self._ioctl(self._fd, request, buffer)
            except InterruptedError:
                continue  # a signal whose handler did not raise: ask again
            except OSError as error:
                invalid = error.errno == errno_codes.EINVAL
                detail = "the kernel log (dmesg) says why" if invalid else ""
                raise dm_error(error.errno, operation, name, detail) from error
            reply = decode_reply(buffer)
            if not (grow and reply.flags & DM_BUFFER_FULL_FLAG):
                return reply, buffer
            size = max(size, len(buffer)) * 2
            if size > MAX_BUFFER:
                raise DmError(errno_codes.EOVERFLOW, operation, name,
                              f"the reply does not fit {MAX_BUFFER} bytes")
            self._reply_room[command] = size

    @staticmethod
    def _device_info(reply: Reply) -> DeviceInfo:
        major, minor = reply.devnum
        return DeviceInfo(
            name=reply.name, major=major, minor=minor, open_count=reply.open_count,
            target_count=reply.target_count,
            suspended=bool(reply.flags & DM_SUSPEND_FLAG),
            read_only=bool(reply.flags & DM_READONLY_FLAG),
            live_table=bool(reply.flags & DM_ACTIVE_PRESENT_FLAG),
            inactive_table=bool(reply.flags & DM_INACTIVE_PRESENT_FLAG),
            event_nr=reply.event_nr, uuid=reply.uuid)

    def _resume(self, operation: str, name: str) -> Reply:
        with self._nodes.watch() as watch:
            reply = self._call(DM_DEV_SUSPEND_CMD, operation, name, event_nr=self._nodes.cookie)
            # Only resuming a suspended device sends a uevent (a "change").
            if reply.flags & DM_UEVENT_GENERATED_FLAG:
                watch.wait_for(operation, name, reply.devnum, "change")
        return reply

    def _remove(self, operation: str, name: str, devnum: tuple[int, int] | None,
                deferred: bool) -> None:
        with self._nodes.watch() as watch:
            reply = self._call(DM_DEV_REMOVE_CMD, operation, name,
                               flags=DM_DEFERRED_REMOVE if deferred else 0,
                               event_nr=self._nodes.cookie)
            if reply.flags & DM_DEFERRED_REMOVE:
                # Still open: the kernel removes it on last close, and its
                # node (when this driver made it) stays until then.
                return
            if reply.flags & DM_UEVENT_GENERATED_FLAG and devnum is not None:
                watch.wait_for(operation, name, devnum, "remove")
        self._nodes.after_remove(name)

    @staticmethod
    def _decoded(operation: str, name: str | None, decode: Callable[[], Decoded]) -> Decoded:
        try:
            return decode()
        except MalformedReply as error:
            raise DmError(errno_codes.EPROTO, operation, name, str(error)) from None

    # -- DeviceMapper -----------------------------------------------------

    def version(self) -> str:
        """The kernel's dm ioctl interface version, e.g. ``4.47.0``."""
        self.kernel_version = self._call(DM_VERSION_CMD, "version", None).version
        return self._version_text()

    def create(self, name: str, targets: Sequence[Target], *, read_only: bool = False,
               uuid: str = "") -> DeviceInfo:
        """Create, load and resume a device; on failure nothing is left behind."""
        try:
            table = encode_table(targets)
        except ValueError as error:
            raise DmError(errno_codes.EINVAL, "create", name, str(error)) from None
        created = self._call(DM_DEV_CREATE_CMD, "create", name, uuid=uuid)
        try:
            self._call(DM_TABLE_LOAD_CMD, "create: load table", name,
                       flags=DM_READONLY_FLAG if read_only else 0, payload=table,
                       target_count=len(targets))
            live = self._resume("create: resume", name)
            self._nodes.after_create(name, live.devnum)
        except BaseException as error:
            self._undo_create(name, created.devnum, error)
            raise
        return self._device_info(live)

    def _undo_create(self, name: str, devnum: tuple[int, int], error: BaseException) -> None:
        try:
            self._remove("create: undo", name, devnum, deferred=False)
        except DmError as undo_error:
            error.add_note(f"the half-created device {name} could not be removed: {undo_error}")

    def remove(self, name: str, *, deferred: bool = False) -> None:
        """Remove a device; DeviceBusy while it is open (unless ``deferred``)."""
        devnum = None
        if self._nodes.waits_for_udev:
            devnum = self._call(DM_DEV_STATUS_CMD, "remove", name).devnum
        self._remove("remove", name, devnum, deferred)

    def suspend(self, name: str, *, flush: bool = True) -> None:
        """Suspend I/O; with ``flush`` False, queued I/O stays queued (DM_NOFLUSH_FLAG)."""
        self._call(DM_DEV_SUSPEND_CMD, "suspend", name,
                   flags=DM_SUSPEND_FLAG | (0 if flush else DM_NOFLUSH_FLAG))

    def resume(self, name: str) -> None:
        """Resume a suspended device (a no-op on a live one)."""
        reply = self._resume("resume", name)
        self._nodes.after_resume(name, reply.devnum)

    def info(self, name: str) -> DeviceInfo:
        """State of one device (DM_DEV_STATUS); NoSuchDevice when it does not exist."""
        return self._device_info(self._call(DM_DEV_STATUS_CMD, "info", name))

    def _targets(self, operation: str, name: str, flags: int) -> list[Target]:
        reply, buffer = self._call_with_data(DM_TABLE_STATUS_CMD, operation, name,
                                             flags=flags, wants_data=True)
        targets = self._decoded(operation, name, lambda: decode_targets(buffer, reply))
        return [Target(t.start, t.length, t.target_type, t.params.strip()) for t in targets]

    def status(self, name: str, *, flush: bool = True) -> list[Target]:
        """The status text of each target of the live table (DM_NOFLUSH_FLAG
        without ``flush``)."""
        return self._targets("status", name, 0 if flush else DM_NOFLUSH_FLAG)

    def table(self, name: str) -> list[Target]:
        """The live table (DM_TABLE_STATUS with DM_STATUS_TABLE_FLAG)."""
        return self._targets("table", name, DM_STATUS_TABLE_FLAG)

    def message(self, name: str, message: str, sector: int = 0) -> str:
        """Send a target message; returns the reply text ("" when there is none).

        A reply too long for the buffer makes the kernel answer "buffer full"
        after the message ran, and the message is sent again with more room:
        only messages that answer (queries such as ``@stats_list``) reach that.
        """
        try:
            payload = encode_message(sector, message)
        except ValueError as error:
            raise DmError(errno_codes.EINVAL, "message", name, str(error)) from None
        reply, buffer = self._call_with_data(DM_TARGET_MSG_CMD, "message", name,
                                             payload=payload, wants_data=True)
        if not reply.flags & DM_DATA_OUT_FLAG:
            return ""
        text = self._decoded("message", name, lambda: decode_text(buffer, reply))
        return text.strip()

    def list_devices(self) -> dict[str, tuple[int, int]]:
        """Every mapped device: name -> (major, minor)."""
        reply, buffer = self._call_with_data(DM_LIST_DEVICES_CMD, "list", None,
                                             wants_data=True)
        entries = self._decoded("list", None, lambda: decode_name_list(buffer, reply))
        return {entry.name: entry.devnum for entry in entries}

    def wait_event(self, name: str, event_nr: int) -> int:
        """Block until the device's event counter differs from ``event_nr``; return it.

        Events: table changes, and target events such as a pool crossing its
        low-water mark or running out of space.  Pass the ``event_nr`` of a
        previous :meth:`info` so no event between the two calls is missed.
        """
        if not 0 <= event_nr <= MAX_EVENT_NR:
            raise DmError(errno_codes.EINVAL, "wait", name, f"event number {event_nr}")
        # DM_DEV_WAIT also writes the target status after the wait; with no
        # room for it the kernel skips it (and says "buffer full", ignored),
        # and NOFLUSH spares a thin pool a metadata commit for it.
        reply = self._call(DM_DEV_WAIT_CMD, "wait", name, flags=DM_NOFLUSH_FLAG,
                           event_nr=event_nr, grow=False)
        return reply.event_nr

    def device_path(self, name: str) -> str:
        """``/dev/mapper/<name>``."""
        return str(self._nodes.directory / name)

    def event_watch(self) -> PollEventWatch:
        """A control fd of its own that poll(2) reports readable after any
        device-mapper event (DM_DEV_ARM_POLL): waiting on it is cancellable,
        unlike DM_DEV_WAIT."""
        return PollEventWatch(IoctlDriver(self._control, nodes=self._nodes,
                                          ioctl=self._ioctl))


class PollEventWatch:
    """See :meth:`IoctlDriver.event_watch`."""

    def __init__(self, driver: IoctlDriver) -> None:
        self._driver = driver

    def fileno(self) -> int:
        return self._driver.fileno()

    def arm(self) -> None:
        """Readable again only after the next event from now."""
        self._driver._call(DM_DEV_ARM_POLL_CMD, "arm poll", None)

    def close(self) -> None:
        self._driver.close()

