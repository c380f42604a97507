"""A plain gRPC client of containerd's snapshots API, for tests and benchmarks.

The same client speaks to containerd's own socket (where every snapshotter it
knows, devmapper or the dmfs proxy, sits behind containerd's metadata layer, in
the namespace sent as the ``containerd-namespace`` header) and to dmfs's socket
directly (where the keys are the engine's own): one client, so a comparison
between them measures the servers, not two clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc

from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.grpc.proto import snapshots_pb2_grpc as api_grpc

NAMESPACE_HEADER = "containerd-namespace"
#: containerd's garbage collector removes any snapshot nothing refers to at its
#: next run (after any removal) unless it carries this label; ctr sets it too
GC_ROOT = {"containerd.io/gc.root": "bench"}


class SnapshotsClient:
    """``containerd.services.snapshots.v1.Snapshots`` on a unix socket, for one
    snapshotter (and, through containerd, one namespace)."""

    def __init__(self, address: Path, snapshotter: str, namespace: str | None = None,
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

    def _call(self, method: str, request: object) -> object:
        return getattr(self.stub, method)(request, metadata=self.metadata,
                                          timeout=self.timeout, wait_for_ready=True)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
                ) -> list[object]:
        return list(self._call("Prepare", api.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent,
            labels={**self.labels, **(labels or {})})).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
             ) -> list[object]:
        return list(self._call("View", api.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent,
            labels={**self.labels, **(labels or {})})).mounts)

    def mounts(self, key: str) -> list[object]:
        return list(self._call("Mounts", api.MountsRequest(
            snapshotter=self.snapshotter, key=key)).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._call("Commit", api.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key,
            labels={**self.labels, **(labels or {})}))

    def remove(self, key: str) -> None:
        self._call("Remove", api.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> object:
        return self._call("Stat", api.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key)).info

    def list(self, *filters: str) -> list[object]:
        request = api.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return [info for response in self.stub.List(request, metadata=self.metadata,
                                                    timeout=self.timeout, wait_for_ready=True)
                for info in response.info]

    def usage(self, key: str) -> tuple[int, int]:
        answer = self._call("Usage", api.UsageRequest(snapshotter=self.snapshotter, key=key))
        return answer.size, answer.inodes


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()  # type: ignore[attr-defined,no-any-return]
