"""The snapshots service against a fake engine, over a real unix-socket gRPC channel:
what each request becomes, what each engine error is answered with, and that
nothing a client sends ends the service."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from google.protobuf import field_mask_pb2

from dmfs.config import socket_path_problem
from dmfs.grpc import address
from dmfs.grpc.errors import STATUS_CODES, status_code_of
from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.grpc.proto import snapshots_pb2_grpc
from dmfs.grpc.server import snapshots_api
from dmfs.pool import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    Info,
    InUse,
    InvalidArgument,
    JournalCorrupt,
    LabelTooLarge,
    NoSpace,
    NotFound,
    PoolError,
    SnapshotError,
)
from tests.support.fake_engine import FakeEngine

Code = grpc.StatusCode


class Client:
    """A gRPC client of the service, called from worker threads (trio serves meanwhile)."""

    def __init__(self, path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    async def __call__(self, method: str, request: Any, timeout: float = 30) -> Any:
        def call() -> Any:
            answer = getattr(self.stub, method)(request, timeout=timeout)
            return list(answer) if method == "List" else answer
        return await trio.to_thread.run_sync(call)

    async def code(self, method: str, request: Any) -> tuple[Code, str]:
        """The status a request is refused with."""
        with pytest.raises(grpc.RpcError) as refused:
            await self(method, request)
        return refused.value.code(), refused.value.details()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "grpc" / "snapshots.sock"


@pytest.fixture
async def client(engine: FakeEngine, socket_path: Path) -> AsyncIterator[Client]:
    async with snapshots_api(engine, socket_path, None):  # type: ignore[arg-type]
        client = Client(socket_path)
        try:
            yield client
        finally:
            client.channel.close()


def labels(**pairs: str) -> dict[str, str]:
    return {name.replace("_", "."): value for name, value in pairs.items()}


async def test_prepare_returns_the_device_as_containerds_devmapper_does(
        client: Client, engine: FakeEngine) -> None:
    answer = await client("Prepare", api.PrepareSnapshotRequest(
        snapshotter="dmfs", key="default/1/a", labels={"k": "v", "empty": ""}))
    [mount] = answer.mounts
    device = engine.snapshots["default/1/a"].device_id
    assert (mount.type, mount.source, list(mount.options), mount.target) == (
        "ext4", f"/dev/mapper/pool-snap-{device}", [], "")
    # an empty parent is none, a label with an empty value is no label
    assert engine.calls[0] == ("prepare", ("default/1/a", None, {"k": "v"}), {})


async def test_views_and_committed_snapshots_are_read_only(client: Client,
                                                           engine: FakeEngine) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    await client("Commit", api.CommitSnapshotRequest(name="base", key="a"))
    view = await client("View", api.ViewSnapshotRequest(key="look", parent="base"))
    assert list(view.mounts[0].options) == ["ro"]
    assert ("view", ("look", "base", {}), {"live": True}) in engine.calls
    for key in ("look", "base"):
        mounts = await client("Mounts", api.MountsRequest(key=key))
        assert list(mounts.mounts[0].options) == ["ro"], key
    active = await client("Prepare", api.PrepareSnapshotRequest(key="work", parent="base"))
    assert (await client("Mounts", api.MountsRequest(key="work"))).mounts == active.mounts


@pytest.mark.parametrize("engine", [FakeEngine(fs_type="xfs")])
async def test_xfs_mounts_get_nouuid_first(client: Client) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    await client("Commit", api.CommitSnapshotRequest(name="c", key="a"))
    [mount] = (await client("Mounts", api.MountsRequest(key="c"))).mounts
    assert (mount.type, list(mount.options)) == ("xfs", ["nouuid", "ro"])


async def test_stat_reports_containerds_info(client: Client) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a", labels={"x": "1"}))
    await client("Commit", api.CommitSnapshotRequest(name="c", key="a", labels={"y": "2"}))
    await client("Prepare", api.PrepareSnapshotRequest(key="w", parent="c"))
    info = (await client("Stat", api.StatSnapshotRequest(key="w"))).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("w", "c", api.ACTIVE, {})
    assert info.created_at.ToJsonString().startswith("2026-01-01T00:00:")
    committed = (await client("Stat", api.StatSnapshotRequest(key="c"))).info
    # Commit replaces the labels (containerd's stores do not inherit the active's)
    assert (committed.kind, committed.parent, dict(committed.labels)) == (
        api.COMMITTED, "", {"y": "2"})
    assert committed.updated_at.ToDatetime() >= committed.created_at.ToDatetime()


def update(name: str, paths: list[str] | None, **given: str) -> api.UpdateSnapshotRequest:
    request = api.UpdateSnapshotRequest(info=api.Info(name=name, labels=given))
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return request


async def test_update_field_paths(client: Client, engine: FakeEngine) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a", labels={"k": "1", "j": "2"}))

    async def labels_after(request: api.UpdateSnapshotRequest) -> dict[str, str]:
        return dict((await client("Update", request)).info.labels)

    assert await labels_after(update("a", ["labels.k"], k="9", j="ignored")) == {"k": "9",
                                                                               "j": "2"}
    assert await labels_after(update("a", ["labels.j"])) == {"k": "9"}  # absent: deleted
    assert await labels_after(update("a", ["labels.n"], n="")) == {"k": "9"}  # empty: deleted
    assert await labels_after(update("a", ["labels"], x="1", y="")) == {"x": "1"}
    assert await labels_after(update("a", None, z="3")) == {"z": "3"}  # no mask: labels
    assert await labels_after(update("a", [], q="4")) == {"q": "4"}
    assert await labels_after(update("a", ["labels", "labels.r"], r="5", s="6")) == {
        "r": "5", "s": "6"}
    # the other fields of the request's info are ignored, as containerd's stores do
    request = update("a", None, t="7")
    request.info.parent, request.info.kind = "elsewhere", api.COMMITTED
    assert (await client("Update", request)).info.kind == api.ACTIVE
    assert engine.calls[-1] == ("update", ("a", {"t": "7"}), {"replace_all": True})


@pytest.mark.parametrize("path", ["parent", "kind", "name", "created_at", "label", "labelsx"])
async def test_update_of_other_fields_is_invalid(client: Client, engine: FakeEngine,
                                                 path: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    code, message = await client.code("Update", update("a", ["labels.k", path], k="v"))
    assert code is Code.INVALID_ARGUMENT and repr(path) in message
    assert [c for c in engine.calls if c[0] == "update"] == []  # nothing changed
    assert f"grpc Update 'a' refused (INVALID_ARGUMENT): cannot update {path!r}" in caplog.text


async def test_list_streams_matches_in_batches_of_100(client: Client) -> None:
    for number in range(250):
        await client("Prepare", api.PrepareSnapshotRequest(
            key=f"s{number:03}", labels={"tens": str(number // 10)}))
    answers = await client("List", api.ListSnapshotsRequest())
    assert [len(a.info) for a in answers] == [100, 100, 50]
    assert [i.name for a in answers for i in a.info] == [f"s{n:03}" for n in range(250)]
    answers = await client("List", api.ListSnapshotsRequest(
        filters=['labels.tens==3,name~=/[05]$/', 'name=="s249"']))
    assert [i.name for a in answers for i in a.info] == ["s030", "s035", "s249"]
    assert await client("List", api.ListSnapshotsRequest(filters=["name==none"])) == []


async def test_a_bad_filter_is_invalid(client: Client) -> None:
    code, message = await client.code("List", api.ListSnapshotsRequest(filters=["name=="]))
    assert code is Code.INVALID_ARGUMENT and "bad filter" in message


async def test_usage_reports_bytes_and_no_inodes(client: Client) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="ab"))
    answer = await client("Usage", api.UsageRequest(key="ab"))
    assert (answer.size, answer.inodes) == (8192, 0)


async def test_remove_and_cleanup(client: Client, engine: FakeEngine) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    await client("Remove", api.RemoveSnapshotRequest(key="a"))
    assert engine.snapshots == {}
    # the thin device goes after the answer: containerd's collector calls Cleanup next
    assert engine.calls[-1] == ("remove", ("a",), {"background": True})
    await client("Cleanup", api.CleanupRequest(snapshotter="dmfs"))
    assert engine.calls[-1][0] == "cleanup"


async def test_snapshots_made_in_the_tree_are_not_removed_through_the_socket(
        client: Client, engine: FakeEngine) -> None:
    """containerd's garbage collector removes what its database does not list and
    goes on after FailedPrecondition: the tree's snapshots must survive it."""
    made = await engine.prepare("built-by-hand")
    engine.snapshots["built-by-hand"] = dataclasses.replace(made, made_by="tree")
    code, details = await client.code("Remove", api.RemoveSnapshotRequest(key="built-by-hand"))
    assert code is Code.FAILED_PRECONDITION
    assert details == ("snapshot 'built-by-hand' was made in the tree, and only rmdir there "
                       "removes it")
    assert "built-by-hand" in engine.snapshots


async def test_commit_and_remove_tell_the_tree(engine: FakeEngine, socket_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """The tree hears of each Commit and Remove with the snapshot as it was; a
    listener that fails costs a log line, never the change."""
    told: list[tuple[str, str]] = []

    async def changed(before: Info) -> None:
        told.append((before.key, before.kind.value))
        if before.key == "b":
            raise RuntimeError("the tree is gone")

    async with snapshots_api(engine, socket_path, None, changed):  # type: ignore[arg-type]
        client = Client(socket_path)
        try:
            await client("Prepare", api.PrepareSnapshotRequest(key="a"))
            await client("Commit", api.CommitSnapshotRequest(name="b", key="a"))
            await client("Update", update("b", ["labels.k"], k="v"))
            await client("Remove", api.RemoveSnapshotRequest(key="b"))  # the listener fails
            assert (await client.code("Remove", api.RemoveSnapshotRequest(key="b")))[0] is \
                Code.NOT_FOUND
        finally:
            client.channel.close()
    assert told == [("a", "active"), ("b", "committed")]
    assert engine.snapshots == {}
    assert "telling the tree of the change to snapshot 'b' failed" in caplog.text


async def test_what_containerds_unpacker_relies_on(client: Client) -> None:
    assert (await client.code("Stat", api.StatSnapshotRequest(key="missing")))[0] is \
        Code.NOT_FOUND
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    assert (await client.code("Prepare", api.PrepareSnapshotRequest(key="a")))[0] is \
        Code.ALREADY_EXISTS
    await client("Prepare", api.PrepareSnapshotRequest(key="b"))
    await client("Commit", api.CommitSnapshotRequest(name="c", key="a"))
    assert (await client.code("Commit", api.CommitSnapshotRequest(name="c", key="b")))[0] is \
        Code.ALREADY_EXISTS


#: an engine error of every kind, raised by the method a request reaches
ERRORS = [AlreadyExists("snapshot 'a' already exists"), NotFound("snapshot 'a' does not exist"),
          InvalidArgument("bad key"), LabelTooLarge("label 'l' is 5000 bytes"),
          FailedPrecondition("snapshot 'a' is view, not active"),
          HasChildren("snapshot 'a' has 1 child snapshot(s): 'b'"),
          InUse("device pool-snap-3 is mounted at /mnt outside dmfs"),
          NoSpace("thin pool pool has no free data space"),
          PoolError("journal fsync failed: EIO"), JournalCorrupt("record 7 is damaged"),
          SnapshotError("something else")]
EXPECTED = {AlreadyExists: Code.ALREADY_EXISTS, NotFound: Code.NOT_FOUND,
            InvalidArgument: Code.INVALID_ARGUMENT, LabelTooLarge: Code.INVALID_ARGUMENT,
            FailedPrecondition: Code.FAILED_PRECONDITION,
            HasChildren: Code.FAILED_PRECONDITION, InUse: Code.FAILED_PRECONDITION,
            NoSpace: Code.RESOURCE_EXHAUSTED, PoolError: Code.UNAVAILABLE,
            JournalCorrupt: Code.UNKNOWN, SnapshotError: Code.UNKNOWN}


def test_every_engine_error_has_its_code() -> None:
    assert {type(e): status_code_of(e) for e in ERRORS} == EXPECTED
    assert STATUS_CODES[-1][0] is SnapshotError  # the catch-all comes last


#: each method, a request for it, and the engine method it reaches
REQUESTS: list[tuple[str, Any, str]] = [
    ("Prepare", api.PrepareSnapshotRequest(key="k"), "prepare"),
    ("View", api.ViewSnapshotRequest(key="k"), "view"),
    ("Mounts", api.MountsRequest(key="k"), "block_device"),
    ("Commit", api.CommitSnapshotRequest(name="n", key="k"), "commit"),
    ("Remove", api.RemoveSnapshotRequest(key="k"), "remove"),
    ("Stat", api.StatSnapshotRequest(key="k"), "stat"),
    ("Update", update("k", ["labels"]), "update"),
    ("List", api.ListSnapshotsRequest(), "walk"),
    ("Usage", api.UsageRequest(key="k"), "usage"),
    ("Cleanup", api.CleanupRequest(), "cleanup"),
]


@pytest.mark.parametrize(("method", "request_", "target"), REQUESTS,
                         ids=[r[0] for r in REQUESTS])
async def test_engine_errors_reach_the_client_with_their_message_and_one_log_line(
        client: Client, engine: FakeEngine, method: str, request_: Any, target: str,
        caplog: pytest.LogCaptureFixture) -> None:
    for error in ERRORS:
        caplog.clear()
        engine.fail(target, error)
        code, message = await client.code(method, request_)
        assert (code, message) == (EXPECTED[type(error)], str(error)), (method, error)
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and str(error) in refusals[0].getMessage()


@pytest.mark.parametrize(("method", "request_", "target"), REQUESTS,
                         ids=[r[0] for r in REQUESTS])
async def test_a_bug_is_internal_logged_once_and_the_service_goes_on(
        client: Client, engine: FakeEngine, method: str, request_: Any, target: str,
        caplog: pytest.LogCaptureFixture) -> None:
    engine.fail(target, ZeroDivisionError("a bug"))
    with caplog.at_level(logging.ERROR, logger="dmfs.grpc"):
        code, message = await client.code(method, request_)
    assert code is Code.INTERNAL and "ZeroDivisionError: a bug" in message
    [record] = [r for r in caplog.records if r.exc_info]
    assert f"grpc {method} handler" in record.getMessage()
    await client("Prepare", api.PrepareSnapshotRequest(key="after"))  # still serving


async def test_garbage_and_huge_requests_leave_the_service_serving(
        client: Client, socket_path: Path) -> None:
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    try:
        for method in ("Prepare", "Stat", "List", "Nonexistent"):
            raw = channel.unary_unary(f"/containerd.services.snapshots.v1.Snapshots/{method}")
            for garbage in (b"\xff" * 64, b"\x12\x03\xff\xfe\xfd",  # key: not UTF-8
                            b"\x0a\x80\x80\x80\x80\x10"):  # a length past the end
                with pytest.raises(grpc.RpcError) as refused:
                    await trio.to_thread.run_sync(lambda r=raw, g=garbage: r(g, timeout=10))
                assert refused.value.code() is (Code.UNIMPLEMENTED if method == "Nonexistent"
                                                  else Code.INVALID_ARGUMENT), method
    finally:
        channel.close()
    huge = "x" * (5 * 2**20)  # more than grpc takes in one message
    assert (await client.code("Prepare", api.PrepareSnapshotRequest(key=huge)))[0] is \
        Code.RESOURCE_EXHAUSTED
    # a raw connection that sends nonsense and hangs up
    with socket.socket(socket.AF_UNIX) as raw_socket:
        raw_socket.connect(os.fspath(socket_path))
        raw_socket.sendall(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(256))
    assert (await client("Prepare", api.PrepareSnapshotRequest(key="fine"))).mounts


async def test_huge_values_are_refused_in_short_lines(client: Client, engine: FakeEngine,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A 3 MiB key or field path (under grpc's 4 MiB limit) is answered with a short
    message and logged in a short line: the status travels in a trailer that
    clients cap, and the log should not grow by megabytes."""
    huge = "k" * (3 * 2**20)
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    engine.fail("prepare", InvalidArgument(f"snapshot key {huge!r} is too long"))
    for method, request in (("Stat", api.StatSnapshotRequest(key=huge)),
                            ("Update", update("a", ["labels.k", huge], k="v")),
                            ("Prepare", api.PrepareSnapshotRequest(key=huge))):
        caplog.clear()
        code, message = await client.code(method, request)
        assert code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), (method, code)
        assert len(message) < 2000, (method, len(message))
        [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(line) < 2500, (method, len(line))
    assert (await client("Stat", api.StatSnapshotRequest(key="a"))).info.name == "a"


async def test_a_client_that_gives_up_leaves_the_service_serving(
        client: Client, engine: FakeEngine, socket_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A deadline that passes while the engine works, and a List stream the client
    cancels after its first message: the engine's work ends as it would have, and
    nothing is logged as an error."""
    for number in range(250):
        await client("Prepare", api.PrepareSnapshotRequest(key=f"s{number:03}"))
    engine.gate = trio.Event()
    with caplog.at_level(logging.WARNING, logger="dmfs.grpc"), \
            pytest.raises(grpc.RpcError) as gave_up:
        await client("Prepare", api.PrepareSnapshotRequest(key="late"), timeout=0.5)
    assert gave_up.value.code() is Code.DEADLINE_EXCEEDED
    with trio.fail_after(10):  # the request reached the engine and waits there
        while not any(c[:2] == ("prepare", ("late", None, {})) for c in engine.calls):
            await trio.sleep(0.01)
    engine.gate.set()
    engine.gate = None

    def read_one_then_cancel() -> int:
        call = client.stub.List(api.ListSnapshotsRequest(), timeout=30)
        first = next(call)
        call.cancel()
        return len(first.info)

    assert await trio.to_thread.run_sync(read_one_then_cancel) == 100
    # the late prepare finished in the engine after its client had gone
    with trio.fail_after(10):
        while "late" not in engine.snapshots:
            await trio.sleep(0.01)
    answers = await client("List", api.ListSnapshotsRequest())
    assert sum(len(a.info) for a in answers) == 251
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_unknown_kinds_and_odd_values_are_answered(client: Client) -> None:
    await client("Prepare", api.PrepareSnapshotRequest(key="a"))
    request = update("a", ["labels"], k="v")
    request.info.kind = 42  # not a Kind: proto3 keeps it, dmfs ignores it
    assert dict((await client("Update", request)).info.labels) == {"k": "v"}
    assert (await client.code("Prepare", api.PrepareSnapshotRequest(key="")))[0] is \
        Code.INVALID_ARGUMENT
    assert (await client.code("Prepare", api.PrepareSnapshotRequest(
        key="b", parent="a")))[0] is Code.INVALID_ARGUMENT  # parent not committed


async def test_concurrent_requests_run_at_once(client: Client, engine: FakeEngine) -> None:
    """Requests are trio tasks side by side: ten prepares wait inside the engine
    together, and one gate releases them all (a serialising bridge would hang)."""
    engine.gate = trio.Event()
    results: dict[int, Any] = {}

    async def prepare(number: int) -> None:
        results[number] = await client("Prepare", api.PrepareSnapshotRequest(key=f"k{number}"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for number in range(10):
                nursery.start_soon(prepare, number)
            while len([c for c in engine.calls if c[0] == "prepare"]) < 10:
                await trio.sleep(0.01)  # the calls arrive from other threads
            engine.gate.set()
    assert sorted(engine.snapshots) == sorted(f"k{n}" for n in range(10))


async def test_the_socket_is_private(socket_path: Path, engine: FakeEngine) -> None:
    async with snapshots_api(engine, socket_path, os.getgid()):  # type: ignore[arg-type]
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        directory = socket_path.parent.stat()
        assert stat.S_IMODE(directory.st_mode) == 0o750
        assert (directory.st_uid, directory.st_gid) == (os.geteuid(), os.getgid())
    assert not socket_path.exists()  # removed at stop
    assert socket_path.parent.exists()


async def test_a_stale_socket_is_replaced(socket_path: Path, engine: FakeEngine) -> None:
    socket_path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(socket_path))
    stale.close()  # bound, never listening: what a killed daemon leaves
    address.check_socket_path(socket_path)
    async with snapshots_api(engine, socket_path, None):  # type: ignore[arg-type]
        client = Client(socket_path)
        assert (await client("Prepare", api.PrepareSnapshotRequest(key="a"))).mounts
        client.channel.close()
        with pytest.raises(address.SocketProblem, match="another process serves"):
            address.check_socket_path(socket_path)


@pytest.mark.parametrize(("setup", "problem"), [
    (lambda path: (path.parent.mkdir(mode=0o755), path.parent.chmod(0o755)),
     "open to every user"),
    (lambda path: (path.parent.mkdir(mode=0o700), path.write_text("mine")),
     "is not a socket"),
    (lambda path: path.parent.write_text("a file"), "is not a directory"),
])
def test_socket_paths_dmfs_will_not_use(socket_path: Path, setup: Callable[[Path], object],
                                        problem: str) -> None:
    setup(socket_path)
    with pytest.raises(address.SocketProblem, match=problem):
        address.check_socket_path(socket_path)


@pytest.mark.parametrize(("text", "problem"), [
    ("relative.sock", "not an absolute path"), ("/run/dmfs/", "names a directory"),
    ("/" + "x" * 107, "at most 107"), ("/run/dmfs/pool0/grpc/snapshots.sock", None)])
def test_grpc_address_checks(text: str, problem: str | None) -> None:
    found = socket_path_problem(text)
    assert (found is None) if problem is None else (problem in (found or ""))
