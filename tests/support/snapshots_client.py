"""A plain gRPC client of containerd's snapshots API, for tests and benchmarks.

The same client speaks to containerd's own socket (where every snapshotter it
knows, devmapper or the dmfs proxy, sits behind containerd's metadata layer, in
the namespace sent as the ``containerd-namespace`` header) and to dmfs's socket
directly (where the keys are the engine's own): one client, so a comparison
between them measures the servers, not two clients.  :func:`mounted` mounts what
Mounts returns the way containerd does.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.grpc.proto import snapshots_pb2_grpc as api_grpc

NAMESPACE_HEADER = "containerd-namespace"
#: containerd's garbage collector removes any snapshot nothing refers to at its
#: next run (after any removal) unless it carries this label; ctr sets it too
GC_ROOT = {"containerd.io/gc.root": "bench"}


class SnapshotsClient:
    """``containerd.services.snapshots.v1.Snapshots`` on a unix socket, for one
    snapshotter (and, through containerd, one namespace): each method sends one
    request."""

    def __init__(self, address: Path, snapshotter: str = "dmfs", namespace: str | None = None,
                 timeout: float = 120.0, labels: Mapping[str, str] | None = None) -> None:
        """``labels``: added to every Prepare, View and Commit (e.g. :data:`GC_ROOT`
        through containerd)."""
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.stub = api_grpc.SnapshotsStub(self.channel)
        self.snapshotter = snapshotter
        self.metadata = ((NAMESPACE_HEADER, namespace),) if namespace else ()
        self.timeout = timeout
        self.labels = dict(labels or {})

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SnapshotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: object) -> Any:
        """The answer to one request (List's stream, as a list)."""
        answer = getattr(self.stub, method)(request, metadata=self.metadata,
                                            timeout=self.timeout, wait_for_ready=True)
        return list(answer) if method == "List" else answer

    def refused(self, method: str, request: object) -> tuple[grpc.StatusCode, str]:
        """The status and message a request is refused with."""
        try:
            self.call(method, request)
        except grpc.RpcError as refusal:
            return refusal.code(), refusal.details()  # type: ignore[attr-defined]
        raise AssertionError(f"{method} was answered, not refused")

    def _labels(self, labels: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.labels, **(labels or {})}

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
                ) -> list[Any]:
        return list(self.call("Prepare", api.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent,
            labels=self._labels(labels))).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
             ) -> list[Any]:
        return list(self.call("View", api.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent,
            labels=self._labels(labels))).mounts)

    def mounts(self, key: str) -> list[Any]:
        return list(self.call("Mounts", api.MountsRequest(
            snapshotter=self.snapshotter, key=key)).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.call("Commit", api.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=self._labels(labels)))

    def remove(self, key: str) -> None:
        self.call("Remove", api.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> Any:
        return self.call("Stat", api.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key)).info

    def update(self, key: str, paths: list[str], labels: Mapping[str, str]) -> Any:
        return self.call("Update", api.UpdateSnapshotRequest(
            snapshotter=self.snapshotter, info=api.Info(name=key, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=paths))).info

    def list(self, *filters: str) -> list[Any]:
        answers = self.call("List", api.ListSnapshotsRequest(snapshotter=self.snapshotter,
                                                             filters=list(filters)))
        return [info for answer in answers for info in answer.info]

    def usage(self, key: str) -> Any:
        return self.call("Usage", api.UsageRequest(snapshotter=self.snapshotter, key=key))

    def cleanup(self) -> None:
        self.call("Cleanup", api.CleanupRequest(snapshotter=self.snapshotter))


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()  # type: ignore[attr-defined,no-any-return]


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
