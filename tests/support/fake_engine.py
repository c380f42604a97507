"""An in-memory engine with the snapshotter's API and its typed errors, for host
tests of the gRPC front end (the real one runs in tests/guest/test_grpc*.py).

It keeps containerd's rules where the front end's answers depend on them (kinds,
parents, existing and missing keys, labels, filters) and records every call, so
a test can check what a request became.  ``fail`` makes the next call of a
method raise what it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import trio

from dmfs.pool import (
    AlreadyExists,
    BlockDevice,
    DeviceState,
    FailedPrecondition,
    HasChildren,
    Info,
    InvalidArgument,
    Kind,
    NotFound,
    Usage,
)
from dmfs.pool.filters import compile_filters, snapshot_fields


class FakeEngine:
    def __init__(self, fs_type: str = "ext4") -> None:
        self.fs_type = fs_type
        self.snapshots: dict[str, Info] = {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.failures: dict[str, BaseException] = {}
        self._ids = iter(range(2, 2**24))
        self._clock = iter(range(10**6))
        #: held by `prepare` between its check and its change: a test can make
        #: concurrent requests overlap there
        self.gate: trio.Event | None = None

    def fail(self, method: str, error: BaseException) -> None:
        self.failures[method] = error

    def _enter(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        error = self.failures.pop(method, None)
        if error is not None:
            raise error

    def _stamp(self) -> str:
        return f"2026-01-01T00:00:{next(self._clock) % 60:02d}.000001Z"

    def get(self, key: str) -> Info | None:
        return self.snapshots.get(key)

    def _get(self, key: str) -> Info:
        try:
            return self.snapshots[key]
        except KeyError:
            raise NotFound(f"snapshot {key!r} does not exist") from None

    async def _create(self, key: str, parent: str | None, labels: Mapping[str, str] | None,
                      kind: Kind) -> Info:
        if not key:
            raise InvalidArgument("snapshot key must be a non-empty string")
        if key in self.snapshots:
            raise AlreadyExists(f"snapshot {key!r} already exists ({self.snapshots[key].kind})")
        if parent is not None and self._get(parent).kind is not Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is {self._get(parent).kind}, "
                                  "not committed")
        if self.gate is not None:
            await self.gate.wait()
        if key in self.snapshots:  # a concurrent request made it meanwhile
            raise AlreadyExists(f"snapshot {key!r} already exists")
        stamp = self._stamp()
        info = Info(key=key, kind=kind, parent=parent, labels=dict(labels or {}),
                    created=stamp, updated=stamp, device_id=next(self._ids),
                    state=DeviceState.ACTIVATED if kind is Kind.ACTIVE
                    else DeviceState.DEACTIVATED, mountpoint=None)
        self.snapshots[key] = info
        return info

    async def prepare(self, key: str, parent: str | None = None,
                      labels: Mapping[str, str] | None = None) -> Info:
        self._enter("prepare", key, parent, labels)
        return await self._create(key, parent, labels, Kind.ACTIVE)

    async def view(self, key: str, parent: str | None = None,
                   labels: Mapping[str, str] | None = None, *, live: bool = False) -> Info:
        self._enter("view", key, parent, labels, live=live)
        return await self._create(key, parent, labels, Kind.VIEW)

    async def block_device(self, key: str) -> BlockDevice:
        self._enter("block_device", key)
        info = self._get(key)
        return BlockDevice(path=f"/dev/mapper/pool-snap-{info.device_id}", fs_type=self.fs_type,
                           read_only=info.kind is not Kind.ACTIVE,
                           options=("nouuid",) if self.fs_type == "xfs" else ())

    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> Info:
        self._enter("commit", name, key, labels)
        info = self._get(key)
        if info.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is {info.kind}, not active")
        if name in self.snapshots:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        del self.snapshots[key]
        committed = replace(info, key=name, kind=Kind.COMMITTED, updated=self._stamp(),
                            labels=dict(labels) if labels is not None else info.labels)
        self.snapshots[name] = committed
        return committed

    async def remove(self, key: str, *, background: bool | None = None) -> None:
        self._enter("remove", key, background=background)
        self._get(key)
        children = [i.key for i in self.snapshots.values() if i.parent == key]
        if children:
            raise HasChildren(f"snapshot {key!r} has {len(children)} child snapshot(s)")
        del self.snapshots[key]

    async def stat(self, key: str) -> Info:
        self._enter("stat", key)
        return self._get(key)

    async def update(self, key: str, labels: Mapping[str, str | None], *,
                     replace_all: bool = False) -> Info:
        self._enter("update", key, dict(labels), replace_all=replace_all)
        info = self._get(key)
        merged = {} if replace_all else dict(info.labels)
        for name, value in labels.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        self.snapshots[key] = replace(info, labels=merged, updated=self._stamp())
        return self.snapshots[key]

    async def walk(self, *filters: str) -> list[Info]:
        self._enter("walk", *filters)
        matches = compile_filters(filters)
        return [info for key, info in sorted(self.snapshots.items())
                if matches(snapshot_fields(key, info.kind.value, info.parent, dict(info.labels)))]

    async def usage(self, key: str) -> Usage:
        self._enter("usage", key)
        self._get(key)
        return Usage(4096 * len(key))

    async def cleanup(self) -> int:
        self._enter("cleanup")
        return 0
