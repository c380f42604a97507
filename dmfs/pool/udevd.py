"""Whether systemd-udevd runs, and the socket buffer dmfs's udev monitors ask for.

Its own module, importing neither pyudev nor trio, so that a device-mapper
driver that only reads tables and sends messages (``dmfs diff``, ``dmfs
status``) can choose its node strategy without loading them: importing
:mod:`dmfs.pool.udev` costs ~0.2 s in the test guest, most of it trio.
"""

from __future__ import annotations

from pathlib import Path

UDEVD_CONTROL = Path("/run/udev/control")
#: room for bursts of events (many devices at once) on a monitor's socket
RECEIVE_BUFFER = 8 * 2**20


def udevd_running() -> bool:
    """True when systemd-udevd is listening (its control socket exists)."""
    return UDEVD_CONTROL.exists()
