"""Pool-space events: the low-water mark and running out of data space.

These are not udev events.  With the ioctl driver the watcher sleeps on a
control fd armed with DM_DEV_ARM_POLL (woken by any dm event, then it reads
the pool's status); with dmsetup it reads the status every few seconds.  Each
change of state is logged once, and the latest state is what ``.dmfs/pool``
and ``dmfs status`` show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from dmfs.pool.dm import DeviceMapper
from dmfs.pool.metadata import now
from dmfs.pool.status import PoolStatus
from dmfs.pool.summary import below_low_water
from dmfs.pool.thinpool import ThinPool

log = logging.getLogger(__name__)

#: how often the status is read when the driver has no pollable events
POLL_SECONDS = 5.0
#: after a dm event, wait this long before reading the status: one commit makes
#: three events, and a status read in a worker thread during the commit's own
#: dm sequence makes the two threads fight for the GIL (measured: +1-3 ms a
#: commit in the guest).  Space events still show within a fraction of a second.
SETTLE_SECONDS = 0.25


@dataclass
class PoolWatch:
    """The last pool state seen, and how many space events there were."""

    pool: ThinPool
    status: PoolStatus | None = None
    low_water_reached: bool = False
    events: int = 0
    last_event: str | None = None
    history: list[str] = field(default_factory=list)

    def event_counts(self) -> dict[str, Any]:
        """How many space events there were, and when the last one was."""
        return {"space_events": self.events, "last_space_event": self.last_event}

    def note(self, status: PoolStatus) -> None:
        """Compare with the previous status; log and count what changed."""
        table = self.pool.table
        low_water = table.low_water_blocks if table else 0
        reached = below_low_water(status, low_water)
        previous = self.status
        self.status = status
        name, free, total = self.pool.name, status.free_data_blocks, status.total_data_blocks
        if reached != self.low_water_reached:
            self.low_water_reached = reached
            if reached:
                self._event(logging.WARNING, f"thin pool {name} is at its low-water mark: "
                            f"{free} of {total} data blocks free (mark: {low_water}); "
                            "extend the pool or remove snapshots")
            elif previous is not None:
                self._event(logging.INFO, f"thin pool {name} is above its low-water mark "
                            f"again: {free} of {total} data blocks free")
        old_mode = previous.mode if previous else "rw"
        if status.mode != old_mode:
            if status.mode == "out_of_data_space":
                self._event(logging.ERROR, f"thin pool {name} is out of data space: writes "
                            "that need new blocks fail with ENOSPC until snapshots are "
                            "removed or the pool grows")
            elif status.mode == "ro":
                self._event(logging.ERROR, f"thin pool {name} switched to read-only "
                            "(metadata space or a metadata error)")
            else:
                self._event(logging.INFO, f"thin pool {name} is writable again "
                            f"({free} data blocks free)")
        if status.needs_check and not (previous and previous.needs_check):
            self._event(logging.ERROR, f"thin pool {name} needs a check (thin_check, "
                        "offline)")

    def _event(self, level: int, message: str) -> None:
        self.events += 1
        self.last_event = now()
        self.history.append(message)
        log.log(level, "%s", message)


async def watch_pool(watch: PoolWatch, dm: DeviceMapper, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Follow the pool's space state until cancelled."""
    events = dm.event_watch()
    started = False
    try:
        while True:
            if events is not None:
                events.arm()  # before reading the status, so no event slips between
            # No metadata commit for a look: a watcher must not add pool I/O.
            watch.note(await trio.to_thread.run_sync(lambda: watch.pool.status(flush=False)))
            if not started:
                task_status.started()
                started = True
            if events is not None:
                await trio.lowlevel.wait_readable(events.fileno())
                await trio.sleep(SETTLE_SECONDS)
            else:
                await trio.sleep(POLL_SECONDS)
    finally:
        if events is not None:
            events.close()
