"""What the engine reports about a snapshot (containerd's Info and Usage)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dmfs.pool.metadata import DeviceState, Kind


@dataclass(frozen=True)
class Info:
    """A snapshot as the API reports it (containerd's snapshots.Info plus device)."""

    key: str
    kind: Kind
    parent: str | None
    labels: Mapping[str, str]
    created: str
    updated: str
    device_id: int
    state: DeviceState
    mountpoint: Path | None  # where its filesystem is mounted now, if it is
    usage: int | None = None  # bytes, for committed snapshots (fixed at commit)
    made_by: str | None = None  # "tree": made with mkdir (see Snapshot.made_by)

    @property
    def identity(self) -> tuple[int, str]:
        """What stays the same through commit and rename: (device id, created)."""
        return (self.device_id, self.created)


@dataclass(frozen=True)
class Usage:
    """Bytes this snapshot provisioned beyond its parent (containerd's Usage.Size)."""

    size: int


@dataclass(frozen=True)
class BlockDevice:
    """A snapshot's block device, live, for a client that mounts it itself
    (containerd's Mounts): mount ``path`` as ``fs_type`` with ``options``, and
    read-only if ``read_only``."""

    path: str  # /dev/mapper/<name>
    fs_type: str  # the pool's fs_type
    read_only: bool  # views and committed snapshots
    options: tuple[str, ...] = ()  # what every mount of it needs (xfs: nouuid)
