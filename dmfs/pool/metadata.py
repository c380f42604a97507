"""The engine's metadata: snapshots and thin devices, and how records change them.

Everything here is plain data.  The journal (:mod:`dmfs.pool.journal`) stores
the records; :class:`Metadata` applies them, so replaying the journal after a
crash rebuilds exactly the state the engine had written.  A record that changes
several objects (commit, rename, remove) is one record, applied at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from dmfs.pool.dm import SECTOR_SIZE

MAX_DEVICE_ID = 2**24 - 1
#: how many snapshot changes Metadata.touched_since remembers (a front end that
#: falls further behind compares the whole state instead)
TOUCHED_KEPT = 4096


class Kind(StrEnum):
    """containerd's snapshot kinds."""

    ACTIVE = "active"
    VIEW = "view"
    COMMITTED = "committed"


class DeviceState(StrEnum):
    """containerd's device states; each dm operation is journaled before and after."""

    UNKNOWN = "Unknown"
    CREATING = "Creating"
    CREATED = "Created"
    ACTIVATING = "Activating"
    ACTIVATED = "Activated"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    RESUMING = "Resuming"
    RESUMED = "Resumed"
    DEACTIVATING = "Deactivating"
    DEACTIVATED = "Deactivated"
    REMOVING = "Removing"
    REMOVED = "Removed"
    FAULTY = "Faulty"


#: states in which the dm device is live (unless removed behind dmfs's back)
LIVE_STATES = frozenset({DeviceState.ACTIVATED, DeviceState.SUSPENDING, DeviceState.SUSPENDED,
                         DeviceState.RESUMING, DeviceState.RESUMED,
                         DeviceState.DEACTIVATING})
#: states in which the dm device is known not to exist; in every other state
#: (Activating, Removing, Faulty, Unknown: an operation was interrupted, or the
#: device was lost) it may or may not, and only the kernel can tell
INACTIVE_STATES = frozenset({DeviceState.CREATING, DeviceState.CREATED,
                             DeviceState.DEACTIVATED, DeviceState.REMOVED})


class DeviceRole(StrEnum):
    """What a thin device is for."""

    BASE = "base"  # the hidden pre-formatted device parentless snapshots copy
    SNAPSHOT = "snapshot"


def now() -> str:
    """A UTC timestamp with nanosecond-style precision, as containerd prints them."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Device:
    """One thin device in the pool."""

    id: int
    name: str  # the dm device name while active
    size: int  # virtual size in bytes
    state: DeviceState
    role: DeviceRole = DeviceRole.SNAPSHOT
    origin: int | None = None  # the thin id it was snapshotted from
    read_only: bool = False  # activated read-only
    baseline_sectors: int | None = None  # mapped sectors when it was taken (usage = growth)
    frozen_sectors: int | None = None  # mapped sectors when it became read-only for good
    error: str | None = None  # why it is Faulty

    @property
    def is_live(self) -> bool:
        """The journal says its dm device exists."""
        return self.state in LIVE_STATES

    @property
    def may_be_live(self) -> bool:
        """Its dm device may exist (live, or an operation on it was interrupted)."""
        return self.state not in INACTIVE_STATES

    def growth(self, mapped_bytes: int) -> int:
        """Bytes provisioned beyond what the device mapped when it was taken
        (containerd's usage), given what it maps now."""
        return max(0, mapped_bytes - (self.baseline_sectors or 0) * SECTOR_SIZE)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies and costs ~40 µs a call, paid
        # on every journal record.
        return {name: getattr(self, name) for name in _DEVICE_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Device:
        values = dict(data)
        values["state"] = DeviceState(values["state"])
        values["role"] = DeviceRole(values["role"])
        return cls(**values)


@dataclass
class Snapshot:
    """One snapshot (containerd's Info plus the device behind it)."""

    key: str
    kind: Kind
    parent: str | None
    device_id: int
    labels: dict[str, str] = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    usage: int | None = None  # bytes, fixed when committed
    pending: str | None = None  # "commit" while a commit is in flight
    #: the front end that made it, when its removal is that front end's only:
    #: "tree" for mkdir (containerd's garbage collector removes every snapshot
    #: its own database does not list); None for the engine API
    made_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}
        data["labels"] = dict(self.labels)
        if self.made_by is None:
            del data["made_by"]  # journals written before the field read the same
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        values = dict(data)
        values["kind"] = Kind(values["kind"])
        return cls(**values)


_DEVICE_FIELDS = tuple(f.name for f in fields(Device))
_SNAPSHOT_FIELDS = tuple(f.name for f in fields(Snapshot))


class MetadataError(ValueError):
    """A record that does not fit the state (a bug or a foreign journal)."""


class Metadata:
    """Snapshots by key and devices by id, changed only through :meth:`apply`."""

    FORMAT = 1

    def __init__(self) -> None:
        self.pool_name: str | None = None
        self.base_id: int | None = None
        self.devices: dict[int, Device] = {}
        self.snapshots: dict[str, Snapshot] = {}
        # Indexes, kept by _store/_drop: listing a node with 10,000 children
        # must not scan every snapshot per entry.
        self._children: dict[str | None, set[str]] = {}
        self._by_device: dict[int, str] = {}
        #: every id below it is used by a device: allocation at 10,000 devices
        #: need not test 10,000 ids
        self._free_floor = 1
        #: counts applied records, so readers can tell the state has not changed
        self.version = 0
        #: when each node's list of children last changed, and when any key came
        #: or went (ns since the epoch; since this process started): the mtimes of
        #: the tree's directories, which move whenever their entries change so
        #: that the kernel drops its cached listings of them
        self._children_changed: dict[str | None, int] = {}
        self.keys_changed_ns = 0
        #: (version, device id, parent) of each snapshot stored or dropped, oldest
        #: first, the last TOUCHED_KEPT of them: what changed since a version, so a
        #: front end following the state need not compare all of it
        self._touched: deque[tuple[int, int, str | None]] = deque(maxlen=TOUCHED_KEPT)
        #: the oldest version since which _touched is complete
        self._touched_floor = 0

    # -- queries ---------------------------------------------------------------
    def children(self, key: str | None) -> list[Snapshot]:
        """The snapshots whose parent is ``key`` (None: the parentless ones)."""
        return [self.snapshots[k] for k in self._children.get(key, ())]

    def child_count(self, key: str | None) -> int:
        return len(self._children.get(key, ()))

    def children_changed_ns(self, key: str | None) -> int:
        """When a child of ``key`` (None: a parentless snapshot) last came, went or
        was renamed, in ns since the epoch; 0 when not since this process started."""
        return self._children_changed.get(key, 0)

    def _children_change(self, parent: str | None) -> None:
        # Strictly increasing, so two changes within one clock tick differ.
        stamp = max(time.time_ns(), self.keys_changed_ns + 1)
        self._children_changed[parent] = self.keys_changed_ns = stamp

    def snapshot_of_device(self, device_id: int) -> Snapshot | None:
        key = self._by_device.get(device_id)
        return self.snapshots[key] if key is not None else None

    def touched_since(self, version: int) -> tuple[set[int], set[str | None]] | None:
        """The thin devices of the snapshots stored or dropped since ``version``
        (new, removed, renamed, committed or relabelled), and their parents (whose
        children changed); None when that is no longer known (too long ago)."""
        if version < self._touched_floor:
            return None
        devices: set[int] = set()
        parents: set[str | None] = set()
        for touched_at, device_id, parent in reversed(self._touched):
            if touched_at < version:
                break
            devices.add(device_id)
            parents.add(parent)
        return devices, parents

    def _touch(self, snapshot: Snapshot) -> None:
        if len(self._touched) == self._touched.maxlen:
            self._touched_floor = self._touched[0][0] + 1
        self._touched.append((self.version, snapshot.device_id, snapshot.parent))

    def _store(self, snapshot: Snapshot) -> None:
        self._touch(snapshot)
        old = self.snapshots.get(snapshot.key)
        if old is not None and (old.parent, old.device_id) == (snapshot.parent,
                                                               snapshot.device_id):
            # Same place in the tree: one assignment, so a reader in another
            # thread never sees the key missing in between.
            self.snapshots[snapshot.key] = snapshot
            return
        if old is not None:
            self._drop(snapshot.key)
        self.snapshots[snapshot.key] = snapshot
        self._children.setdefault(snapshot.parent, set()).add(snapshot.key)
        self._by_device[snapshot.device_id] = snapshot.key
        self._children_change(snapshot.parent)

    def _drop(self, key: str) -> Snapshot:
        try:
            snapshot = self.snapshots.pop(key)
        except KeyError:
            raise MetadataError(f"record names unknown snapshot {key!r}") from None
        self._touch(snapshot)
        siblings = self._children[snapshot.parent]
        siblings.discard(key)
        if not siblings:
            del self._children[snapshot.parent]
        del self._by_device[snapshot.device_id]
        self._children_change(snapshot.parent)
        return snapshot

    def allocate_id(self, unavailable: set[int] | frozenset[int] = frozenset()) -> int | None:
        """The lowest id no device of ours (any state, Faulty included) nor
        ``unavailable`` uses; None when all 2**24 - 1 are taken."""
        free = self.free_ids(1, unavailable)
        return free[0] if free else None

    def free_ids(self, count: int, unavailable: set[int] | frozenset[int] = frozenset()
                 ) -> list[int]:
        """The ``count`` lowest ids :meth:`allocate_id` could give, in order
        (fewer when the id space runs out)."""
        free: list[int] = []
        floor_found = False
        for candidate in range(self._free_floor, MAX_DEVICE_ID + 1):
            if candidate in self.devices:
                continue
            if not floor_found:
                self._free_floor, floor_found = candidate, True
            if candidate not in unavailable:
                free.append(candidate)
                if len(free) == count:
                    break
        return free

    # -- records ---------------------------------------------------------------
    def apply(self, record: dict[str, Any]) -> None:
        """Apply one journal record; raise MetadataError when it does not fit."""
        kind = record.get("type")
        handler = getattr(self, f"_apply_{str(kind).replace('-', '_')}", None)
        if handler is None:
            raise MetadataError(f"unknown record type {kind!r}")
        handler(record)
        self.version += 1

    def _apply_header(self, record: dict[str, Any]) -> None:
        if record.get("format") != self.FORMAT:
            raise MetadataError(f"journal format {record.get('format')!r} is not {self.FORMAT}")
        self.pool_name = record["pool"]

    def _apply_base(self, record: dict[str, Any]) -> None:
        self.base_id = record["id"]

    def _apply_device(self, record: dict[str, Any]) -> None:
        device = Device.from_json(record["device"])
        self.devices[device.id] = device

    def _apply_device_deleted(self, record: dict[str, Any]) -> None:
        self.devices.pop(record["id"], None)
        self._free_floor = min(self._free_floor, record["id"])
        if self.base_id == record["id"]:
            self.base_id = None

    def _apply_snapshot(self, record: dict[str, Any]) -> None:
        self._store(Snapshot.from_json(record["snapshot"]))

    def _apply_commit(self, record: dict[str, Any]) -> None:
        snapshot = self._drop(record["key"])
        snapshot.key = record["name"]
        snapshot.kind = Kind.COMMITTED
        snapshot.usage = record["usage"]
        snapshot.updated = record["updated"]
        snapshot.pending = None
        if "labels" in record:
            snapshot.labels = record["labels"]
        self._store(snapshot)

    def _apply_rename(self, record: dict[str, Any]) -> None:
        old, new = record["key"], record["name"]
        snapshot = self._drop(old)
        snapshot.key = new
        snapshot.updated = record["updated"]
        self._store(snapshot)
        for child in self.children(old):
            self._drop(child.key)
            child.parent = new
            self._store(child)

    def _apply_remove(self, record: dict[str, Any]) -> None:
        snapshot = self._drop(record["key"])
        device = self.devices.get(snapshot.device_id)
        if device is not None:
            device.state = DeviceState.REMOVING

    # -- checkpoint --------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "pool": self.pool_name,
            "base_id": self.base_id,
            "devices": [d.to_json() for d in sorted(self.devices.values(), key=lambda d: d.id)],
            "snapshots": [s.to_json() for s in sorted(self.snapshots.values(),
                                                      key=lambda s: s.key)],
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Metadata:
        if data.get("format") != cls.FORMAT:
            raise MetadataError(f"checkpoint format {data.get('format')!r} is not {cls.FORMAT}")
        meta = cls()
        meta.pool_name = data["pool"]
        meta.base_id = data["base_id"]
        meta.devices = {d["id"]: Device.from_json(d) for d in data["devices"]}
        for snapshot in data["snapshots"]:
            meta._store(Snapshot.from_json(snapshot))
        return meta


def read_metadata(journal_records: tuple[dict[str, Any] | None, list[dict[str, Any]]]
                  ) -> Metadata:
    """The state a checkpoint and the records after it describe."""
    checkpoint, records = journal_records
    meta = Metadata.load(checkpoint) if checkpoint is not None else Metadata()
    for record in records:
        meta.apply(record)
    return meta
