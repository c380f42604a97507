"""``/dev/mapper/<name>`` nodes for the ioctl driver: made by itself or by udev.

The kernel only makes ``/dev/dm-N`` (devtmpfs); the ``/dev/mapper/<name>``
name comes from userspace.  Like libdevmapper, the driver works in one of two
ways, chosen once when it starts:

* **own nodes** (no udevd running, or ``DM_DISABLE_UDEV`` set, as libdm reads
  it): the driver mknods the node after a device goes live and unlinks it after
  removal.  Its uevents carry flags that tell dm udev rules, if a udevd runs
  after all, to leave ``/dev/mapper`` alone.
* **udev nodes**: the resume/remove uevents carry ``DM_UDEV_PRIMARY_SOURCE_FLAG``
  so 55-dm.rules creates the ``/dev/mapper/<name>`` symlink; the driver opens a
  udev monitor before the ioctl and blocks until udev has processed the event
  (rules run, node made or removed).  Waiting matters beyond the node: udev's
  rules open the device (blkid), and a remove racing them would fail with EBUSY.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import select
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dmfs.pool.dm import DmError
from dmfs.pool.dmioctl_abi import (
    DM_UDEV_DISABLE_DM_RULES_FLAG,
    DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG,
    DM_UDEV_PRIMARY_SOURCE_FLAG,
    udev_cookie,
)
from dmfs.pool.udevd import RECEIVE_BUFFER, udevd_running

if TYPE_CHECKING:
    import pyudev

DEV_MAPPER = Path("/dev/mapper")
DEFAULT_UDEV_TIMEOUT = 30.0
NODE_MODE = 0o600  # libdevmapper's default for nodes it makes itself


def udev_makes_nodes() -> bool:
    """True when udevd runs and ``DM_DISABLE_UDEV`` is unset (any value disables, as in libdm)."""
    return udevd_running() and "DM_DISABLE_UDEV" not in os.environ


class UeventWatch(Protocol):
    """Waits, after an ioctl, for the uevent that ioctl sent."""

    def wait_for(self, operation: str, name: str, devnum: tuple[int, int],
                 action: str) -> None:
        """Block until the ``action`` event of ``devnum`` has been handled."""
        ...


class DeviceNodes(Protocol):
    """Who makes ``/dev/mapper/<name>``, and what the driver must do about it."""

    #: event_nr for the ioctls that send a uevent (resume, remove)
    cookie: int
    #: whether uevents are waited for (a remove then needs the device number first)
    waits_for_udev: bool
    directory: Path

    def watch(self) -> contextlib.AbstractContextManager[UeventWatch]:
        """Open before an ioctl whose uevent ``wait_for`` may then wait for."""
        ...

    def after_create(self, name: str, devnum: tuple[int, int]) -> None:
        """The device is live: make sure its node exists."""
        ...

    def after_resume(self, name: str, devnum: tuple[int, int]) -> None:
        """An existing device was resumed."""
        ...

    def after_remove(self, name: str) -> None:
        """The device is gone."""
        ...


class _NoWatch:
    def wait_for(self, operation: str, name: str, devnum: tuple[int, int],
                 action: str) -> None:
        return None


class OwnNodes:
    """The driver makes and removes the nodes itself (no udev)."""

    # What libdm passes with DM_DISABLE_UDEV: should a udevd run after all,
    # its dm rules leave /dev/mapper to us.
    DEFAULT_COOKIE = udev_cookie(DM_UDEV_DISABLE_DM_RULES_FLAG
                                 | DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG
                                 | DM_UDEV_PRIMARY_SOURCE_FLAG)
    waits_for_udev = False

    def __init__(self, directory: Path = DEV_MAPPER, *, cookie: int = DEFAULT_COOKIE) -> None:
        self.directory = directory
        self.cookie = cookie

    @contextlib.contextmanager
    def watch(self) -> Iterator[UeventWatch]:
        yield _NoWatch()

    def after_create(self, name: str, devnum: tuple[int, int]) -> None:
        self.make_node(name, devnum)

    def after_resume(self, name: str, devnum: tuple[int, int]) -> None:
        # As libdm does on resume: a node lost since create comes back.
        self.make_node(name, devnum)

    def after_remove(self, name: str) -> None:
        path = self.directory / name
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise DmError(error.errno, "remove node", name, str(path)) from error

    def make_node(self, name: str, devnum: tuple[int, int]) -> None:
        """Create ``<directory>/<name>`` for ``devnum``, replacing a stale entry."""
        path = self.directory / name
        rdev = os.makedev(*devnum)
        try:
            try:
                st = path.lstat()
            except FileNotFoundError:
                self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            else:
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                    return
                path.unlink()
            os.mknod(path, stat.S_IFBLK | NODE_MODE, rdev)
            os.chmod(path, NODE_MODE)  # the umask may have taken bits away
        except OSError as error:
            raise DmError(error.errno, "create node", name, str(path)) from error


class _UdevWatch:
    def __init__(self, monitor: pyudev.Monitor, cookie: int, timeout: float) -> None:
        self._monitor = monitor
        self._cookie = str(cookie)
        self._timeout = timeout

    def wait_for(self, operation: str, name: str, devnum: tuple[int, int],
                 action: str) -> None:
        poller = select.poll()
        poller.register(self._monitor.fileno(), select.POLLIN)
        deadline = time.monotonic() + self._timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not poller.poll(remaining * 1000):
                continue
            # None both for "nothing there" and for an event the filter dropped.
            device = self._monitor.poll(timeout=0)
            if device is not None and self._is_the_event(device, devnum, action):
                return
        raise DmError(errno_codes.ETIMEDOUT, operation, name,
                      f"udev did not finish the {action!r} event of device "
                      f"{devnum[0]}:{devnum[1]} within {self._timeout:g} s; "
                      f"is systemd-udevd processing events?")

    def _is_the_event(self, device: pyudev.Device, devnum: tuple[int, int],
                      action: str) -> bool:
        # The cookie tells our event from synthetic ones (inotify watch,
        # udevadm trigger) for the same device, which carry no DM_COOKIE.
        number = device.device_number
        return (device.action == action
                and (os.major(number), os.minor(number)) == devnum
                and device.properties.get("DM_COOKIE") == self._cookie)


class UdevNodes:
    """udev's dm rules make the nodes; the driver waits for udev to finish."""

    cookie = udev_cookie(DM_UDEV_PRIMARY_SOURCE_FLAG)
    waits_for_udev = True

    def __init__(self, directory: Path = DEV_MAPPER,
                 timeout: float = DEFAULT_UDEV_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self._context: pyudev.Context | None = None

    @contextlib.contextmanager
    def watch(self) -> Iterator[UeventWatch]:
        # pyudev (and libudev) load on the first operation that sends a uevent,
        # not when the driver opens: reading tables and sending messages
        # (dmfs diff, dmfs status) need neither.
        import pyudev

        if self._context is None:
            self._context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(self._context, source="udev")
        monitor.filter_by("block")
        with contextlib.suppress(OSError):
            monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        monitor.start()
        try:
            yield _UdevWatch(monitor, self.cookie, self.timeout)
        finally:
            # pyudev has no close(): the last reference going unrefs the
            # libudev monitor, which closes its socket.
            del monitor

    def after_create(self, name: str, devnum: tuple[int, int]) -> None:
        path = self.directory / name
        try:
            rdev = path.stat().st_rdev
        except FileNotFoundError:
            raise DmError(errno_codes.ENOENT, "create", name,
                          f"udev handled the device's event but made no {path}; "
                          f"are the device-mapper udev rules (55-dm.rules) installed?") from None
        if (os.major(rdev), os.minor(rdev)) != devnum:
            raise DmError(errno_codes.EEXIST, "create", name,
                          f"{path} is device {os.major(rdev)}:{os.minor(rdev)}, "
                          f"not {devnum[0]}:{devnum[1]}")

    def after_resume(self, name: str, devnum: tuple[int, int]) -> None:
        return None

    def after_remove(self, name: str) -> None:
        return None


def device_nodes(directory: Path = DEV_MAPPER, *, udev: bool | None = None,
                 udev_timeout: float = DEFAULT_UDEV_TIMEOUT) -> DeviceNodes:
    """The node strategy for this system (``udev`` forces one)."""
    if udev is None:
        udev = udev_makes_nodes()
    return UdevNodes(directory, udev_timeout) if udev else OwnNodes(directory)
