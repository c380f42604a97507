"""Device-mapper block device events from pyudev, delivered inside trio.

With systemd-udevd running, the monitor listens to udev's processed events
(their rules have run, device nodes exist); without it, to the kernel's raw
uevents.  Kernel uevents for dm devices carry no ``DM_NAME``, so the name is
read from ``/sys/block/dm-N/dm/name`` when the device appears and remembered
by device number, because a ``remove`` event arrives after sysfs is gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pyudev
import trio

from dmfs.pool.udevd import RECEIVE_BUFFER, udevd_running


@dataclass(frozen=True)
class DmEvent:
    """One uevent of a device-mapper block device."""

    action: str  # add, change, remove, ...
    sys_name: str  # dm-N
    devnum: tuple[int, int]
    name: str | None  # the dm name, when known


def _read_dm_name(sys_name: str) -> str | None:
    try:
        return Path(f"/sys/block/{sys_name}/dm/name").read_text().strip()
    except OSError:
        return None


class DmEventMonitor:
    """A netlink monitor for dm block devices, read from the trio loop.

    Open it (it is a context manager) *before* issuing the operation whose event
    you want, then iterate ``events()``.
    """

    def __init__(self, source: str | None = None) -> None:
        self.source = source or ("udev" if udevd_running() else "kernel")
        self._context = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(self._context, source=self.source)
        self._monitor.filter_by("block")
        self._names: dict[tuple[int, int], str] = {}

    def __enter__(self) -> DmEventMonitor:
        # Bursts (many devices at once) must not overflow the socket; without
        # root the default buffer still serves small bursts.
        with contextlib.suppress(OSError):
            self._monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        self._monitor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # pyudev has no close(); dropping the last reference unrefs the
        # libudev monitor, which closes its socket.
        self._monitor = None  # type: ignore[assignment]

    def _event_of(self, device: pyudev.Device) -> DmEvent | None:
        sys_name = device.sys_name
        if not sys_name.startswith("dm-"):
            return None
        devnum = (os.major(device.device_number), os.minor(device.device_number))
        name = device.properties.get("DM_NAME") or _read_dm_name(sys_name)
        if name:
            self._names[devnum] = name
        else:
            name = self._names.get(devnum)
        if device.action == "remove":
            self._names.pop(devnum, None)
        return DmEvent(device.action or "", sys_name, devnum, name)

    async def events(self) -> AsyncIterator[DmEvent]:
        """Yield dm events forever; each wait is a trio checkpoint."""
        fd = self._monitor.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            # One message per readable wakeup: poll() answers None both for
            # "nothing there" and for a message the filter dropped.
            device = self._monitor.poll(timeout=0)
            if device is None:
                continue
            event = self._event_of(device)
            if event is not None:
                yield event


class DmWatcher:
    """Runs a :class:`DmEventMonitor` in the trio loop and reports removals.

    Every ``remove`` of a watched device goes to ``on_remove``; telling
    dmfs's own removals from removals behind its back is the engine's job
    (it looks under the device's lock, see ``Snapshotter._check_vanished``):
    events can arrive late, after the name was reused.  Readiness after
    activation is the drivers' job: they wait for udev's event themselves
    when udevd runs.
    """

    def __init__(self, watched_prefix: str,
                 on_remove: Callable[[DmEvent], None] | None = None) -> None:
        self.watched_prefix = watched_prefix
        self.on_remove = on_remove
        self.running = False
        self.source: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with DmEventMonitor() as monitor:
            self.source = monitor.source
            self.running = True
            task_status.started()
            try:
                async for event in monitor.events():
                    self._dispatch(event)
            finally:
                self.running = False

    def _dispatch(self, event: DmEvent) -> None:
        if (event.name is not None and event.action == "remove"
                and event.name.startswith(self.watched_prefix)
                and self.on_remove is not None):
            self.on_remove(event)
