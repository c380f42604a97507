"""The device-mapper drivers dmfs ships, by the name the config's ``driver`` key uses."""

from __future__ import annotations

from dmfs.config import DRIVERS
from dmfs.pool.dm import DeviceMapper


def open_driver(name: str, *, udev_timeout: float = 10.0) -> DeviceMapper:
    """A new driver instance; OSError/RuntimeError when this machine cannot use it."""
    if name == "ioctl":
        from dmfs.pool.dmioctl import IoctlDriver

        return IoctlDriver(udev_timeout=udev_timeout)
    if name == "dmsetup":
        from dmfs.pool.dmsetup import DmsetupDriver

        return DmsetupDriver()
    raise ValueError(f"unknown device-mapper driver {name!r} (one of {', '.join(DRIVERS)})")
