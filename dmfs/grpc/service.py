"""containerd's snapshots service mapped onto the engine (runs on the trio thread).

Each method takes the request message and returns the response message; the
server (:mod:`dmfs.grpc.server`) brings requests here from gRPC's thread.  What
containerd's side relies on, and where it comes from:

- keys and labels are stored as containerd sends them (namespaced keys such as
  ``default/12/sha256:...``); an empty ``parent`` is no parent; a label with an
  empty value is no label (containerd's stores drop them);
- Prepare and View return the mounts at once, as containerd's devmapper
  snapshotter builds them: the snapshot's block device ``/dev/mapper/<name>``,
  of the pool's ``fs_type``, with ``nouuid`` for xfs and ``ro`` for views and
  committed snapshots (:meth:`dmfs.pool.Snapshotter.block_device`);
- Commit replaces the labels with the request's, as containerd's stores do;
- Update changes labels only: field paths ``labels`` (all of them) and
  ``labels.<key>`` (one; absent or empty in the request's info: deleted); no
  path means every field that may change, the labels; a path to any other field
  (``parent``, ``kind``, ``name``...) is InvalidArgument, and the other fields
  of the request's info are ignored (containerd's metadata store sends only the
  name and labels);
- List streams the matching snapshots by key, 100 per message as containerd's
  own service does, with containerd's filter syntax (:mod:`dmfs.pool.filters`);
- Usage answers bytes and no inode count, as containerd's devmapper does;
- Remove answers once the removal is journaled and the snapshot's device
  released; the thin device is deleted after the answer, in the background
  (:data:`REMOVE_IN_BACKGROUND`);
- Commit and Remove tell the tree afterwards (``changed``), whose kernel caches
  the old names and attributes otherwise;
- Cleanup waits for those deletions and deletes what failed ones left
  (:meth:`dmfs.pool.Snapshotter.cleanup`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from dmfs.grpc.errors import answered, refuse
from dmfs.grpc.proto import mount_pb2
from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.pool import BlockDevice, Info, Kind, Snapshotter, shown

#: snapshots per ListSnapshotsResponse (containerd's service sends 100)
LIST_BATCH = 100

log = logging.getLogger(__name__)

KINDS = {Kind.VIEW: api.VIEW, Kind.ACTIVE: api.ACTIVE, Kind.COMMITTED: api.COMMITTED}

#: Remove deletes the thin device after answering, whatever ``async_remove`` (the
#: tree's rmdir) says.  Only containerd's garbage collector sends Remove, and it
#: sends Cleanup after its Removes (containerd's metadata/snapshot.go), which waits
#: for these deletions; what containerd relies on holds as soon as Remove answers
#: (Stat: NotFound, a Prepare of the key works).  Measured in the test guest
#: (bench/grpc_ops.py, both sides alike): the engine's remove of an active
#: snapshot takes 2.4 ms instead of 5.0 ms, most of it the device's deletion.
REMOVE_IN_BACKGROUND = True


def _key(request: object) -> str:
    return shown(getattr(request, "key", ""))


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if text:
        stamp.FromDatetime(datetime.fromisoformat(text))
    return stamp


def info_message(info: Info) -> api.Info:
    """containerd's Info of a snapshot."""
    return api.Info(name=info.key, parent=info.parent or "", kind=KINDS[info.kind],
                    created_at=_timestamp(info.created), updated_at=_timestamp(info.updated),
                    labels=dict(info.labels))


def mounts_of(device: BlockDevice) -> list[mount_pb2.Mount]:
    """The mounts containerd's devmapper snapshotter returns for the same device."""
    options = [*device.options, *(["ro"] if device.read_only else [])]
    return [mount_pb2.Mount(type=device.fs_type, source=device.path, options=options)]


def labels_of(labels: Mapping[str, str]) -> dict[str, str]:
    """A request's labels as containerd stores them: empty values are no labels."""
    return {name: value for name, value in labels.items() if value}


#: what the daemon tells the tree after a Commit or Remove (the snapshot's Info before)
ChangeListener = Callable[[Info], Awaitable[None]]


async def _nobody(before: Info) -> None:
    """The default listener: no other front end to tell."""


class SnapshotsService:
    """The ``containerd.services.snapshots.v1.Snapshots`` methods over one engine.

    ``changed`` hears of each Commit and Remove done here: the tree's kernel
    caches names and attributes, and only requests through the tree tell it of
    changes by themselves."""

    def __init__(self, engine: Snapshotter, changed: ChangeListener = _nobody) -> None:
        self.engine = engine
        self.changed = changed

    async def _tell(self, before: Info | None) -> None:
        # The change is done and durable: a failure to tell the tree must not fail it.
        if before is None:
            return
        try:
            await self.changed(before)
        except Exception:
            log.exception("telling the tree of the change to snapshot %s failed; it may "
                          "show the old entry until the kernel's cache expires",
                          shown(before.key))

    @answered("Prepare", _key)
    async def prepare(self, request: api.PrepareSnapshotRequest) -> api.PrepareSnapshotResponse:
        await self.engine.prepare(request.key, request.parent or None, labels_of(request.labels))
        device = await self.engine.block_device(request.key)
        return api.PrepareSnapshotResponse(mounts=mounts_of(device))

    @answered("View", _key)
    async def view(self, request: api.ViewSnapshotRequest) -> api.ViewSnapshotResponse:
        await self.engine.view(request.key, request.parent or None, labels_of(request.labels),
                               live=True)
        device = await self.engine.block_device(request.key)
        return api.ViewSnapshotResponse(mounts=mounts_of(device))

    @answered("Mounts", _key)
    async def mounts(self, request: api.MountsRequest) -> api.MountsResponse:
        return api.MountsResponse(mounts=mounts_of(await self.engine.block_device(request.key)))

    @answered("Commit", _key)
    async def commit(self, request: api.CommitSnapshotRequest) -> empty_pb2.Empty:
        before = self.engine.get(request.key)
        await self.engine.commit(request.name, request.key, labels_of(request.labels))
        await self._tell(before)
        return empty_pb2.Empty()

    @answered("Remove", _key)
    async def remove(self, request: api.RemoveSnapshotRequest) -> empty_pb2.Empty:
        before = self.engine.get(request.key)
        if before is not None and before.made_by is not None:
            # containerd's garbage collector removes every snapshot its database
            # does not list, and goes on after FailedPrecondition.
            raise refuse(grpc.StatusCode.FAILED_PRECONDITION, "Remove", shown(request.key),
                         f"snapshot {shown(request.key)} was made in the tree, and only "
                         "rmdir there removes it")
        await self.engine.remove(request.key, background=REMOVE_IN_BACKGROUND)
        await self._tell(before)
        return empty_pb2.Empty()

    @answered("Stat", _key)
    async def stat(self, request: api.StatSnapshotRequest) -> api.StatSnapshotResponse:
        return api.StatSnapshotResponse(info=info_message(await self.engine.stat(request.key)))

    @answered("Update", lambda request: shown(request.info.name))
    async def update(self, request: api.UpdateSnapshotRequest) -> api.UpdateSnapshotResponse:
        name, given = request.info.name, request.info.labels
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        replace_all = not paths
        changes: dict[str, str | None] = {}
        for path in paths:
            if path == "labels":
                replace_all = True
            elif path.startswith("labels."):
                label = path.removeprefix("labels.")
                changes[label] = given.get(label) or None
            else:
                raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "Update", shown(name),
                             f"cannot update {shown(path)} field on snapshot {shown(name)}: "
                             "only labels can change")
        if replace_all:
            changes = {**labels_of(given), **changes}
        info = await self.engine.update(name, changes, replace_all=replace_all)
        return api.UpdateSnapshotResponse(info=info_message(info))

    @answered("List", lambda request: shown(",".join(request.filters)))
    async def list(self, request: api.ListSnapshotsRequest) -> list[api.ListSnapshotsResponse]:
        infos = [info_message(info) for info in await self.engine.walk(*request.filters)]
        return [api.ListSnapshotsResponse(info=infos[start:start + LIST_BATCH])
                for start in range(0, len(infos), LIST_BATCH)]

    @answered("Usage", _key)
    async def usage(self, request: api.UsageRequest) -> api.UsageResponse:
        return api.UsageResponse(size=(await self.engine.usage(request.key)).size, inodes=0)

    @answered("Cleanup", lambda request: "")
    async def cleanup(self, request: api.CleanupRequest) -> empty_pb2.Empty:
        await self.engine.cleanup()
        return empty_pb2.Empty()
