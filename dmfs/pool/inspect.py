"""A look at a pool and its journal without changing either (dmfs status/tree/check).

Works whether or not a daemon serves the pool: the journal is read without
its lock, the pool through status calls and a thin_ls of a metadata snapshot.
:func:`inspect_pool` also lists where journal and pool disagree; most of it is
what the next start (reconcile) fixes, which ``dmfs check --repair`` runs.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.dm import DeviceMapper
from dmfs.pool.journal import LOCK_NAME, Journal
from dmfs.pool.metadata import DeviceState, Kind, Metadata, read_metadata
from dmfs.pool.poolwatch import below_low_water
from dmfs.pool.status import PoolStatus
from dmfs.pool.thinpool import ThinPool, ThinUsage


@dataclass(frozen=True)
class Finding:
    """One difference between the journal and the pool."""

    kind: str
    message: str
    repairable: bool = True
    problem: bool = True  # False: worth knowing, nothing to fix

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "repairable": self.repairable,
                "problem": self.problem}


@dataclass
class Inspection:
    """What the journal and the kernel say about one pool."""

    config: Config
    meta: Metadata
    status: PoolStatus
    block_size: int
    low_water_blocks: int
    usage: dict[int, ThinUsage]
    live: dict[str, tuple[int, int]]
    served: bool  # a dmfs process holds the journal
    findings: list[Finding] = field(default_factory=list)

    @property
    def low_water_reached(self) -> bool:
        return below_low_water(self.status, self.low_water_blocks)

    def usage_of(self, device_id: int) -> int | None:
        """containerd's usage: bytes provisioned beyond the parent."""
        device = self.meta.devices.get(device_id)
        snapshot = self.meta.snapshot_of_device(device_id)
        if snapshot is not None and snapshot.kind is Kind.COMMITTED:
            return snapshot.usage
        if snapshot is not None and snapshot.kind is Kind.VIEW:
            return 0
        thin = self.usage.get(device_id)
        if device is None or thin is None:
            return None
        return device.growth(thin.mapped)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]


def journal_in_use(state_dir: Path) -> bool:
    """True while a dmfs process holds the journal's lock."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def inspect_pool(config: Config, dm: DeviceMapper) -> Inspection:
    """Read journal and pool (blocking); raises JournalCorrupt / PoolError as the
    engine would."""
    meta = read_metadata(Journal(config.state_dir).read())
    pool = ThinPool(dm, config.pool_name)
    status = pool.attach()
    assert pool.table is not None
    inspection = Inspection(
        config=config, meta=meta, status=status, block_size=pool.block_size,
        low_water_blocks=pool.table.low_water_blocks, usage=pool.thin_usage(),
        live=pool.live_devices(), served=journal_in_use(config.state_dir))
    inspection.findings = _findings(inspection)
    return inspection


def _findings(inspection: Inspection) -> list[Finding]:
    meta, config = inspection.meta, inspection.config
    findings = []
    if meta.pool_name not in (None, config.pool_name):
        findings.append(Finding("journal", f"{config.state_dir} belongs to pool "
                                f"{meta.pool_name!r}, not {config.pool_name!r}", False))
        return findings
    for device in sorted(meta.devices.values(), key=lambda d: d.id):
        snapshot = meta.snapshot_of_device(device.id)
        owner = f"snapshot {snapshot.key!r}" if snapshot else (
            "the base device" if device.id == meta.base_id else "no snapshot")
        if device.state is DeviceState.FAULTY:
            findings.append(Finding("faulty", f"thin device {device.id} ({owner}) is Faulty: "
                                    f"{device.error}", repairable=device.id
                                    in inspection.usage))
        elif snapshot is None and device.id != meta.base_id:
            what = "remove" if device.state is DeviceState.REMOVING else "prepare"
            findings.append(Finding("interrupted", f"thin device {device.id}: an interrupted "
                                    f"{what}, to be finished or rolled back"))
        elif device.id not in inspection.usage:
            findings.append(Finding("missing", f"thin device {device.id} ({owner}) is missing "
                                    "from the pool; it will be marked Faulty"))
        if snapshot is not None and snapshot.pending:
            findings.append(Finding("interrupted", f"snapshot {snapshot.key!r}: an "
                                    f"interrupted {snapshot.pending}, to be rolled back"))
    foreign = sorted(set(inspection.usage) - set(meta.devices))
    if foreign:
        findings.append(Finding("foreign", f"{len(foreign)} thin device(s) in the pool are not "
                                f"dmfs's (ids {', '.join(map(str, foreign[:10]))}"
                                f"{', ...' if len(foreign) > 10 else ''}); they are left "
                                "alone", repairable=False, problem=False))
    known = {d.name for d in meta.devices.values()}
    for name in sorted(inspection.live):
        if config.names_a_dmfs_device(name) and name not in known:
            findings.append(Finding("stray-device", f"device-mapper device {name} looks like "
                                    "dmfs's but no snapshot uses it; to be deactivated"))
    if not inspection.served:
        for path in sorted(fs.mounts_under(config.mount_dir)):
            findings.append(Finding("stray-mount", f"{path} is still mounted though no dmfs "
                                    "runs (a killed daemon); the next start adopts or "
                                    "unmounts it"))
    return findings


def tree_of(inspection: Inspection) -> list[dict[str, Any]]:
    """The snapshot lineage as nested dicts, roots first, children by name."""
    meta = inspection.meta

    def node(key: str) -> dict[str, Any]:
        snapshot = meta.snapshots[key]
        device = meta.devices.get(snapshot.device_id)
        thin = inspection.usage.get(snapshot.device_id)
        return {
            "name": key, "kind": snapshot.kind.value,
            "state": device.state.value if device else "Unknown",
            "device_id": snapshot.device_id, "usage": inspection.usage_of(snapshot.device_id),
            "exclusive": thin.exclusive if thin else None,
            "labels": dict(snapshot.labels), "created": snapshot.created,
            "children": [node(child.key) for child in
                         sorted(meta.children(key), key=lambda s: s.key)],
        }

    return [node(s.key) for s in sorted(meta.children(None), key=lambda s: s.key)]
