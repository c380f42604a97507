"""A pool's state in one summary, for ``.dmfs/pool``, ``dmfs status`` and the engine.

The facts (space in blocks and bytes, the low-water state, snapshots by kind,
faulty devices) are computed here once, from the pool's status line and the
metadata; each reader only chooses a layout: :meth:`PoolSummary.flat` (one
``key: value`` per line in ``.dmfs/pool``) or :meth:`PoolSummary.nested`
(``dmfs status --json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmfs.pool.metadata import DeviceState, Kind, Metadata
from dmfs.pool.status import PoolStatus


def below_low_water(status: PoolStatus, low_water_blocks: int) -> bool:
    """The kernel's test: free data blocks at or under the low-water mark."""
    return low_water_blocks > 0 and status.free_data_blocks <= low_water_blocks


@dataclass(frozen=True)
class PoolSummary:
    """What people and scripts want to know about a pool at one moment."""

    name: str
    status: PoolStatus
    block_size: int
    low_water_blocks: int
    snapshots: dict[str, int]  # by kind, every kind present
    devices: int
    faulty_devices: list[int]
    #: from the daemon's pool watcher (space events since it started)
    events: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, status: PoolStatus, block_size: int, low_water_blocks: int,
           meta: Metadata, events: dict[str, Any] | None = None) -> PoolSummary:
        kinds = {kind.value: 0 for kind in Kind}
        for snapshot in list(meta.snapshots.values()):
            kinds[snapshot.kind.value] += 1
        faulty = sorted(d.id for d in list(meta.devices.values())
                        if d.state is DeviceState.FAULTY)
        return cls(name, status, block_size, low_water_blocks, kinds, len(meta.devices),
                   faulty, events or {})

    @property
    def low_water_reached(self) -> bool:
        return below_low_water(self.status, self.low_water_blocks)

    @property
    def low_water_state(self) -> str:
        return "reached" if self.low_water_reached else "ok"

    def flat(self) -> dict[str, Any]:
        """One level of keys (``.dmfs/pool``, the engine's ``pool_info``)."""
        status, block = self.status, self.block_size
        return {
            "name": self.name, "mode": status.mode,
            "transaction_id": status.transaction_id, "block_size": block,
            "data_used_blocks": status.used_data_blocks,
            "data_total_blocks": status.total_data_blocks,
            "data_used_bytes": status.used_data_blocks * block,
            "data_total_bytes": status.total_data_blocks * block,
            "metadata_used_blocks": status.used_metadata_blocks,
            "metadata_total_blocks": status.total_metadata_blocks,
            "low_water_blocks": self.low_water_blocks,
            "low_water": self.low_water_state,
            **self.events,
            "needs_check": status.needs_check,
            "snapshots": dict(self.snapshots),
            "devices": self.devices,
            "faulty_devices": list(self.faulty_devices),
        }

    def nested(self) -> dict[str, Any]:
        """Grouped keys (``dmfs status --json``)."""
        status, block = self.status, self.block_size
        return {
            "pool": self.name, "mode": status.mode, "transaction_id": status.transaction_id,
            "block_size": block,
            "data": {"used_blocks": status.used_data_blocks,
                     "total_blocks": status.total_data_blocks,
                     "used_bytes": status.used_data_blocks * block,
                     "total_bytes": status.total_data_blocks * block},
            "metadata": {"used_blocks": status.used_metadata_blocks,
                         "total_blocks": status.total_metadata_blocks},
            "low_water": {"blocks": self.low_water_blocks, "state": self.low_water_state},
            "needs_check": status.needs_check, "snapshots": dict(self.snapshots),
            "faulty_devices": list(self.faulty_devices),
        }
