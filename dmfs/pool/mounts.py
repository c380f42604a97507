"""Where snapshots' filesystems are mounted: the mount table, mounting and
unmounting, adoption after a crash, and idle expiry.

A snapshot's filesystem is mounted at ``<runtime>/snapshots/<device id>``; the
directory exists only while it is mounted, so a path that still names it
after the unmount (a stale symlink target cached by the kernel) gives ENOENT,
never an empty directory.  The table belongs to the trio thread: mounting and
unmounting run in worker threads, inside a :meth:`dmfs.pool.store.Store.run`
sequence, and reach the table through its effects.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dmfs.pool import fs
from dmfs.pool.errors import InUse, as_snapshot_error
from dmfs.pool.metadata import Device
from dmfs.pool.store import Effects

log = logging.getLogger(__name__)


@dataclass
class Mount:
    """A mounted snapshot filesystem and when it was last used (monotonic clock)."""

    path: Path
    read_only: bool
    last_used: float = field(default_factory=time.monotonic)
    #: an operation is taking it down (idle expiry, commit, remove): whoever
    #: wants the files waits for the device's lock instead of using this path
    unmounting: bool = False

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used


class MountTable:
    """The mounted snapshots of one pool, by thin device id."""

    def __init__(self, directory: Path, fs_type: str, device_path: Callable[[str], str]) -> None:
        self.directory = directory
        self.fs_type = fs_type
        self._device_path = device_path
        self._mounts: dict[int, Mount] = {}

    def path_of(self, device_id: int) -> Path:
        """Where a snapshot's filesystem is (or will be) mounted."""
        return self.directory / str(device_id)

    def get(self, device_id: int) -> Mount | None:
        return self._mounts.get(device_id)

    def __contains__(self, device_id: int) -> bool:
        return device_id in self._mounts

    def ids(self) -> list[int]:
        return sorted(self._mounts)

    def idle(self, timeout: float) -> list[int]:
        """Read-only mounts unused for ``timeout`` seconds."""
        return [device_id for device_id, mount in list(self._mounts.items())
                if mount.read_only and mount.idle_for() >= timeout]

    # -- trio thread ------------------------------------------------------------------
    def adopt(self, device_id: int, path: Path, read_only: bool) -> None:
        """Take over a mount a previous dmfs left (found at start)."""
        log.info("adopting existing mount %s of device %d", path, device_id)
        self._mounts[device_id] = Mount(path, read_only)

    # -- worker thread (inside a Store.run sequence) -------------------------------------
    def mount(self, effects: Effects, device: Device, *, read_only: bool) -> Mount:
        """Mount a live device's filesystem; PoolError (or NoSpace...) on failure."""
        path = self.path_of(device.id)
        try:
            path.mkdir(exist_ok=True)
            fs.mount(self._device_path(device.name), path, self.fs_type, read_only=read_only)
        except OSError as error:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise as_snapshot_error(error, f"mounting device {device.name} on {path}") from error
        mount = Mount(path, read_only)
        effects.later(lambda: self._mounts.__setitem__(device.id, mount))
        return mount

    def unmount(self, effects: Effects, device_id: int, mount: Mount | None) -> None:
        """Unmount a snapshot's filesystem (``mount`` is its table entry, read by
        the caller); InUse, with nothing changed, while files in it are in use."""
        if mount is None:
            return
        if not mount.read_only:
            with contextlib.suppress(OSError):
                fs.syncfs(mount.path)
        try:
            fs.umount(mount.path)
        except OSError as error:
            if fs.is_busy(error):
                effects.later(mount.touch)
                raise InUse(f"files under {mount.path} are in use") from None
            if error.errno != errno.EINVAL:  # EINVAL: not mounted any more
                raise as_snapshot_error(error, f"unmounting {mount.path}") from error
        effects.later(lambda: self._forget(device_id, mount))
        with contextlib.suppress(OSError):
            mount.path.rmdir()

    def detach(self, effects: Effects, device_id: int, mount: Mount) -> None:
        """Unmount lazily a filesystem whose device is gone (nothing can be
        written back to it any more)."""
        with contextlib.suppress(OSError):
            fs.umount(mount.path, lazy=True)
        effects.later(lambda: self._forget(device_id, mount))

    @contextlib.contextmanager
    def taking_down(self, device_id: int) -> Iterator[None]:
        """Mark a snapshot's mount as on its way out while an operation runs."""
        mount = self._mounts.get(device_id)
        if mount is not None:
            mount.unmounting = True
        try:
            yield
        finally:
            if mount is not None:
                mount.unmounting = False

    def _forget(self, device_id: int, mount: Mount) -> None:
        if self._mounts.get(device_id) is mount:
            del self._mounts[device_id]


async def expire_idle_mounts(table: MountTable, timeout: float,
                             expire: Callable[[int], Awaitable[bool]]) -> None:
    """Forever: hand read-only mounts unused for ``timeout`` to ``expire``."""
    while True:
        await trio.sleep(max(0.5, timeout / 4))
        for device_id in table.idle(timeout):
            await expire(device_id)
