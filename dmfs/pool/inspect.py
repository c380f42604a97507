"""A look at a pool and its journal without changing either (dmfs status/tree/check).

Works whether or not a daemon serves the pool: the journal is read without
its lock, the pool through status calls and a thin_ls of a metadata snapshot.
What differs between journal and pool is the start-up plan itself
(:func:`dmfs.pool.plan.plan`): the findings are its actions that repair
something, so ``dmfs check`` says exactly what the next start (or
``dmfs check --repair``) will do.
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmfs.config import Config
from dmfs.pool.dm import DeviceMapper
from dmfs.pool.journal import LOCK_NAME, Journal
from dmfs.pool.metadata import DeviceState, Kind, Metadata, read_metadata
from dmfs.pool.plan import Plan, Step, observe, owner_of, plan
from dmfs.pool.status import PoolStatus
from dmfs.pool.summary import PoolSummary
from dmfs.pool.thinpool import ThinPool, ThinUsage

#: how check names the kind of repair each step of the plan makes
FINDING_KINDS = {
    Step.DELETE: "interrupted", Step.ROLL_BACK: "interrupted", Step.MARK_FAULTY: "missing",
    Step.RECOVER: "faulty", Step.RESUME: "suspended", Step.UNMOUNT_STALE: "stale-mount",
    Step.DEACTIVATE: "live-device", Step.UNMOUNT_STRAY: "stray-mount",
    Step.DEACTIVATE_STRAY: "stray-device",
}


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
    served: bool  # a dmfs process holds the journal
    plan: Plan | None = None  # None when the journal belongs to another pool
    findings: list[Finding] = field(default_factory=list)

    @property
    def summary(self) -> PoolSummary:
        return PoolSummary.of(self.config.pool_name, self.status, self.block_size,
                              self.low_water_blocks, self.meta)

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

    def routine(self) -> list[str]:
        """What the next start does that repairs nothing (activating, mounting,
        adopting mounts), one line per step with how many snapshots."""
        if self.plan is None:
            return []
        counts = Counter(a.step for a in self.plan.actions if not a.problem)
        return [f"{step.value} {count} snapshot device(s)" for step, count in counts.items()]


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
    world = observe(pool, config, usage=True)
    inspection = Inspection(
        config=config, meta=meta, status=status, block_size=pool.block_size,
        low_water_blocks=pool.table.low_water_blocks, usage=world.usage,
        served=journal_in_use(config.state_dir))
    if meta.pool_name not in (None, config.pool_name):
        inspection.findings = [Finding("journal", f"{config.state_dir} belongs to pool "
                                       f"{meta.pool_name!r}, not {config.pool_name!r}",
                                       repairable=False)]
        return inspection
    inspection.plan = plan(meta, world)
    inspection.findings = _findings(meta, inspection.plan, world.usage)
    return inspection


def _findings(meta: Metadata, the_plan: Plan, usage: dict[int, ThinUsage]) -> list[Finding]:
    findings = [Finding(FINDING_KINDS.get(action.step, action.step.value), action.why)
                for action in the_plan.problems]
    recovering = {a.device_id for a in the_plan.actions if a.step is Step.RECOVER}
    for device in sorted(meta.devices.values(), key=lambda d: d.id):
        if device.state is DeviceState.FAULTY and device.id not in recovering:
            owner = owner_of(device, meta.snapshot_of_device(device.id))
            findings.append(Finding("faulty", f"thin device {device.id} ({owner}) is Faulty: "
                                    f"{device.error}", repairable=device.id in usage))
    foreign = sorted(the_plan.foreign_ids)
    if foreign:
        findings.append(Finding("foreign", f"{len(foreign)} thin device(s) in the pool are not "
                                f"dmfs's (ids {', '.join(map(str, foreign[:10]))}"
                                f"{', ...' if len(foreign) > 10 else ''}); they are left "
                                "alone", repairable=False, problem=False))
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
