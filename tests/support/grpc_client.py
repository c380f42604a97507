"""A Python client of dmfs's snapshots socket, and mounting what Mounts returns the
way containerd does, for guest tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.grpc.proto import snapshots_pb2_grpc


class SnapshotsClient:
    """containerd's side of the socket: each method sends one request."""

    def __init__(self, path: Path, snapshotter: str = "dmfs") -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.snapshotter = snapshotter

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SnapshotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: float = 60) -> Any:
        answer = getattr(self.stub, method)(request, timeout=timeout)
        return list(answer) if method == "List" else answer

    def refused(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        """The status and message a request is refused with."""
        with pytest.raises(grpc.RpcError) as refusal:
            self.call(method, request)
        return refusal.value.code(), refusal.value.details()

    def prepare(self, key: str, parent: str = "", **labels: str) -> list[Any]:
        return list(self.call("Prepare", api.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels)).mounts)

    def view(self, key: str, parent: str = "", **labels: str) -> list[Any]:
        return list(self.call("View", api.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels)).mounts)

    def mounts(self, key: str) -> list[Any]:
        return list(self.call("Mounts", api.MountsRequest(snapshotter=self.snapshotter,
                                                          key=key)).mounts)

    def commit(self, name: str, key: str, **labels: str) -> None:
        self.call("Commit", api.CommitSnapshotRequest(snapshotter=self.snapshotter, name=name,
                                                      key=key, labels=labels))

    def remove(self, key: str) -> None:
        self.call("Remove", api.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> Any:
        return self.call("Stat", api.StatSnapshotRequest(snapshotter=self.snapshotter,
                                                         key=key)).info

    def update(self, key: str, paths: list[str], **labels: str) -> Any:
        return self.call("Update", api.UpdateSnapshotRequest(
            snapshotter=self.snapshotter, info=api.Info(name=key, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths))).info

    def list(self, *filters: str) -> list[Any]:
        answers = self.call("List", api.ListSnapshotsRequest(snapshotter=self.snapshotter,
                                                             filters=list(filters)))
        return [info for answer in answers for info in answer.info]

    def usage(self, key: str) -> Any:
        return self.call("Usage", api.UsageRequest(snapshotter=self.snapshotter, key=key))

    def cleanup(self) -> None:
        self.call("Cleanup", api.CleanupRequest(snapshotter=self.snapshotter))


@contextlib.contextmanager
def mounted(mounts: list[Any], target: Path) -> Iterator[Path]:
    """Mount what Mounts returned at ``target`` as containerd does (mount(8) with
    the type, source and options given), and unmount it afterwards."""
    [mount] = mounts
    target.mkdir(parents=True, exist_ok=True)
    options = ["-o", ",".join(mount.options)] if mount.options else []
    subprocess.run(["mount", "-t", mount.type, *options, mount.source, str(target)],
                   check=True, capture_output=True, text=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)
