"""When two snapshots' files last agreed: the moment each side could start changing.

A snapshot starts as a block copy of its parent, so an inode nothing changed
is the same record, change time (ctime) included, in every descendant.  An
inode that did change was changed after the two snapshots' lineages split,
and ext4 stamped the change with the time of that moment (to the kernel's
clock tick, at most 10 ms).  So an inode whose ctime is equal on both sides
and older than the split, by more than a tick, is the same on both sides;
one whose ctime is close to or after the split may have been changed on both
sides within one tick and has to be checked (git calls such index entries
"racily clean" and handles them the same way).

The split is the creation of the first snapshot below the two snapshots'
nearest common ancestor, on either side: nothing on a side can change before
that snapshot's filesystem exists.  Its ``created`` stamp is taken just after
its filesystem is mounted, so :data:`RACY_MARGIN_NS` (far above a tick plus
the gap between the mount and the stamp) is subtracted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

#: how much earlier than a side's first ``created`` stamp its changes may carry
#: ctimes: the clock tick (≤ 10 ms, HZ ≥ 100) and the mount-to-stamp gap
#: (≤ 1 ms in the test guest), with room for a loaded machine
RACY_MARGIN_NS = 1_000_000_000


@dataclass(frozen=True)
class Lineage:
    """Where a snapshot comes from: its parent's name and its creation stamp."""

    parent: str | None
    created: str  # ISO 8601, as the journal records it


def stamp_ns(created: str) -> int:
    """An ISO 8601 stamp (``2024-05-01T12:00:00.123456Z``) in ns since the epoch."""
    moment = datetime.fromisoformat(created)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def ancestry(snapshots: Mapping[str, Lineage], name: str) -> list[str]:
    """``name``, its parent, its parent's parent, ... up to a snapshot without one."""
    chain, seen = [], set()
    current: str | None = name
    while current is not None:
        if current in seen or current not in snapshots:
            raise KeyError(f"snapshot {current!r} is missing from the lineage")
        seen.add(current)
        chain.append(current)
        current = snapshots[current].parent
    return chain


def split_ns(snapshots: Mapping[str, Lineage], old: str, new: str) -> int | None:
    """The earliest moment at which ``old`` or ``new`` can differ from their
    common state, in ns; None when they are the same snapshot.

    Snapshots without a parent all copy the pool's base device, which never
    changes after mkfs: two lineages that share no snapshot split at the first
    of their roots.
    """
    if old == new:
        return None
    old_chain, new_chain = ancestry(snapshots, old), ancestry(snapshots, new)
    common = set(old_chain) & set(new_chain)
    firsts = []
    for chain in (old_chain, new_chain):
        below = [name for name in chain if name not in common]
        if below:  # the last one is the child of the common ancestor (or a root)
            firsts.append(stamp_ns(snapshots[below[-1]].created))
    return min(firsts)


def racy_after_ns(snapshots: Mapping[str, Lineage], old: str, new: str) -> int | None:
    """Inodes with a ctime at or after this need a closer look (see the module
    docstring); None when the snapshots are the same."""
    split = split_ns(snapshots, old, new)
    return None if split is None else split - RACY_MARGIN_NS
