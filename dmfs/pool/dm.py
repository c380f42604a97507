"""The narrow device-mapper interface the pool layer uses, and its errors.

Two drivers implement :class:`DeviceMapper`: one that runs ``dmsetup``
(:mod:`dmfs.pool.dmsetup`) and one that speaks the device-mapper ioctls on
``/dev/mapper/control`` directly.  Calls are blocking; the async layers above
run them in worker threads.  Errors carry the kernel's errno, so callers tell
"already exists" (EEXIST), "no such thin id" (ENODATA) and "busy" (EBUSY)
apart without reading messages.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# The pool layer's spelling of the sector size; defined once, in dmfs.units.
from dmfs.units import SECTOR_SIZE as SECTOR_SIZE


class DmError(OSError):
    """A device-mapper operation failed; ``errno`` is the kernel's answer."""

    def __init__(self, err: int, operation: str, device: str | None, detail: str = "") -> None:
        what = f"{operation} on {device}" if device else operation
        text = f"device-mapper {what} failed: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)
        self.operation = operation
        self.device = device

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class DeviceExists(DmError):
    """EEXIST: the device name, or the thin id in a pool message, is taken."""


class NoSuchDevice(DmError):
    """ENXIO / ENODEV: no device of that name."""


class NoData(DmError):
    """ENODATA: the pool has no thin device with that id (e.g. ``delete``)."""


class DeviceBusy(DmError):
    """EBUSY: the device is open (mounted, held) and cannot be removed, or
    DM_DEV_CREATE named a device (or uuid) that already exists."""


_ERROR_TYPES: dict[int, type[DmError]] = {
    errno_codes.EEXIST: DeviceExists,
    errno_codes.ENXIO: NoSuchDevice,
    errno_codes.ENODEV: NoSuchDevice,
    errno_codes.ENODATA: NoData,
    errno_codes.EBUSY: DeviceBusy,
}


def dm_error(err: int, operation: str, device: str | None, detail: str = "") -> DmError:
    """The most specific :class:`DmError` subclass for an errno."""
    return _ERROR_TYPES.get(err, DmError)(err, operation, device, detail)


@dataclass(frozen=True)
class Target:
    """One line of a table (``params``) or of a status (``params`` = status text)."""

    start: int
    length: int
    target_type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.target_type} {self.params}"


@dataclass(frozen=True)
class DeviceInfo:
    """What the kernel says about one mapped device."""

    name: str
    major: int
    minor: int
    open_count: int
    target_count: int
    suspended: bool
    read_only: bool
    live_table: bool
    inactive_table: bool
    event_nr: int
    uuid: str = ""

    @property
    def devnum(self) -> tuple[int, int]:
        return (self.major, self.minor)


class EventWatch(Protocol):
    """A file descriptor that becomes readable after device-mapper events."""

    def fileno(self) -> int: ...

    def arm(self) -> None:
        """Forget the events so far; readable again after the next one."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceMapper(Protocol):
    """Blocking device-mapper operations; every failure raises :class:`DmError`."""

    #: short name for logs and benchmarks ("dmsetup", "ioctl")
    name: str

    def version(self) -> str:
        """The kernel driver's interface version, e.g. ``4.47.0``."""
        ...

    def create(self, name: str, targets: Sequence[Target], *, read_only: bool = False,
               uuid: str = "") -> DeviceInfo:
        """Create a device, load its table and resume it (make it live)."""
        ...

    def remove(self, name: str, *, deferred: bool = False) -> None:
        """Remove a device; DeviceBusy while it is open (unless deferred)."""
        ...

    def suspend(self, name: str, *, flush: bool = True) -> None:
        """Suspend I/O (flushing outstanding I/O first unless ``flush`` is False)."""
        ...

    def resume(self, name: str) -> None:
        """Resume a suspended device."""
        ...

    def info(self, name: str) -> DeviceInfo:
        """State of one device; NoSuchDevice when it does not exist."""
        ...

    def status(self, name: str, *, flush: bool = True) -> list[Target]:
        """The status line of each target of a live device; ``flush`` False
        spares a thin pool the metadata commit it does before answering."""
        ...

    def table(self, name: str) -> list[Target]:
        """The live table of a device."""
        ...

    def message(self, name: str, message: str, sector: int = 0) -> str:
        """Send a target message (e.g. ``create_thin 5``); returns its reply text."""
        ...

    def list_devices(self) -> dict[str, tuple[int, int]]:
        """Every mapped device: name -> (major, minor)."""
        ...

    def wait_event(self, name: str, event_nr: int) -> int:
        """Block until the device's event counter passes ``event_nr``; return it."""
        ...

    def device_path(self, name: str) -> str:
        """A block device node for the device (``/dev/mapper/<name>``)."""
        ...

    def close(self) -> None:
        """Release what the driver holds open; it is unusable afterwards."""
        ...

    def event_watch(self) -> EventWatch | None:
        """A pollable watch for pool events, or None (then status is polled)."""
        ...
