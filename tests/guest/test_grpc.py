"""containerd's snapshots API served by `dmfs mount`, against a real pool and the
tree at once: every method through the socket, every error code, the client's
own mounts beside dmfs's (Remove, Commit, idle expiry and a restart while the
client holds a device), the socket's permissions, and concurrent requests.

The client here is Python's grpc with dmfs's modules (tests/support/snapshots_client.py);
tests/guest/test_containerd*.py drive the same socket with containerd and ctr.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dmfs.grpc.proto import snapshots_pb2 as api
from tests.support.loop_pool import LoopPool, loop_pool
from tests.support.snapshots_client import SnapshotsClient, mounted
from tests.support.tree import MountedTree, as_user, dmfs, wait_until, write_config

Code = grpc.StatusCode
#: the admin group of these trees (a number: no group need exist)
ADMIN_GID = 4242
NOBODY = 65534


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[MountedTree, LoopPool, Path]]:
    """One pool and one daemon for the module (a mount costs seconds in the guest):
    the tree, its pool and the socket's path.  Each test starts with an empty pool
    (the ``client`` fixture empties it after each); at the end, ``dmfs check`` of
    everything the tests did must find no problem."""
    scratch = Path(tempfile.mkdtemp(prefix="dmfs-test-", dir="/dev/shm"))
    scratch.chmod(0o755)  # tests act as other users under it
    try:
        with loop_pool(scratch) as pool:
            socket_path = scratch / "run" / "grpc" / "snapshots.sock"
            config = write_config(scratch, pool.name, grpc_address=str(socket_path),
                                  admin_group=ADMIN_GID, idle_timeout="1s")
            tree = MountedTree(config, scratch / "mnt", scratch / "run")
            try:
                tree.mount()
                yield tree, pool, socket_path
                tree.unmount()
                assert not socket_path.exists()  # removed at exit
                check = dmfs("check", str(config)).stdout
                assert "problem" not in check.lower(), check
            finally:
                tree.cleanup()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def tree(shared: tuple[MountedTree, LoopPool, Path]) -> MountedTree:
    """The module's tree, mounted (a test before may have stopped it)."""
    if not shared[0].is_mounted():
        shared[0].mount()
    return shared[0]


@pytest.fixture
def thin_pool(shared: tuple[MountedTree, LoopPool, Path]) -> LoopPool:
    return shared[1]


@pytest.fixture
def socket_path(shared: tuple[MountedTree, LoopPool, Path]) -> Path:
    return shared[2]


@pytest.fixture
def scratch_dir(shared: tuple[MountedTree, LoopPool, Path]) -> Iterator[Path]:
    """A directory of this test's own, for the client's mountpoints."""
    path = Path(tempfile.mkdtemp(prefix="test-", dir=shared[0].config.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client(tree: MountedTree, socket_path: Path) -> Iterator[SnapshotsClient]:
    """A client of the module's daemon; afterwards every snapshot is removed
    (children first), so that the next test starts from an empty pool."""
    snapshots = SnapshotsClient(socket_path)
    try:
        yield snapshots
    finally:
        snapshots.close()
        if not tree.is_mounted():
            tree.mount()
        with SnapshotsClient(socket_path) as cleaner:
            while left := cleaner.list():
                parents = {info.parent for info in left}
                for info in left:
                    if info.name not in parents:
                        remove_anyhow(tree, cleaner, info.name)
            cleaner.cleanup()


def remove_anyhow(tree: MountedTree, client: SnapshotsClient, key: str) -> None:
    """Remove ``key`` through the socket, or with rmdir if the tree made it."""
    try:
        client.remove(key)
    except grpc.RpcError as refusal:
        if "was made in the tree" not in (refusal.details() or ""):
            raise
        os.rmdir(os.path.realpath(tree.path(".dmfs", "by-name", encoded(key))))


def encoded(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def node(tree: MountedTree, *keys: str) -> Path:
    """A snapshot's node in the tree (keys percent-encoded as the tree shows them)."""
    return tree.path(*(encoded(key) for key in keys))


def snapshots_json(tree: MountedTree) -> dict[str, dict[str, object]]:
    document = json.loads(tree.path(".dmfs", "snapshots.json").read_text())
    return {entry["name"]: entry for entry in document["snapshots"]}


def journal_files(directory: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in directory.iterdir())


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_every_method_through_the_socket_as_the_tree_sees_it(
        tree: MountedTree, client: SnapshotsClient, thin_pool: LoopPool,
        scratch_dir: Path) -> None:
    key = "default/1/extract-1 sha256:aaa"
    ref = {"containerd.io/snapshot.ref": "sha256:aaa"}
    [mount] = client.prepare(key, labels={"containerd.io/snapshot/x": "1", "empty": ""})
    assert (mount.type, list(mount.options)) == ("ext4", [])
    assert mount.source.startswith(f"/dev/mapper/{thin_pool.name}-snap-")
    # in the tree at once: node, kind, label, snapshots.json
    assert xattr(node(tree, key), "user.dmfs.kind") == "active"
    assert xattr(node(tree, key), "user.label.containerd.io/snapshot/x") == "1"
    assert key in snapshots_json(tree)
    # the client mounts the device itself; dmfs's own mount shares its superblock
    with mounted([mount], scratch_dir / "client") as files:
        (files / "layer-file").write_text("from the client\n")
        os.sync()
        assert (node(tree, key) / "fs" / "layer-file").read_text() == "from the client\n"
    assert client.usage(key).size > 0
    by_name = tree.path(".dmfs", "by-name", node(tree, key).name)
    assert by_name.is_symlink() and stat.S_IMODE(node(tree, key).stat().st_mode) == 0o755
    client.commit("default/2/sha256:aaa", key, ref)
    # the kernel held the old name (entries are cached for minutes): the tree told it
    assert not os.path.lexists(node(tree, key)) and not os.path.lexists(by_name)
    committed = client.stat("default/2/sha256:aaa")
    assert (committed.kind, dict(committed.labels)) == (api.COMMITTED, ref)
    assert client.refused("Stat", api.StatSnapshotRequest(key=key))[0] is Code.NOT_FOUND
    base = node(tree, "default/2/sha256:aaa")
    assert stat.S_IMODE(base.stat().st_mode) == 0o555
    assert xattr(base, "user.label.containerd.io/snapshot.ref") == "sha256:aaa"

    [child_mount] = client.prepare("default/3/child", "default/2/sha256:aaa")
    assert list(child_mount.options) == []
    assert xattr(node(tree, "default/2/sha256:aaa", "default/3/child"),
                 "user.dmfs.parent") == "default/2/sha256:aaa"
    [view_mount] = client.view("default/4/look", "default/2/sha256:aaa")
    [committed_mount] = client.mounts("default/2/sha256:aaa")
    assert list(view_mount.options) == list(committed_mount.options) == ["ro"]
    with mounted([view_mount], scratch_dir / "view") as files:
        assert (files / "layer-file").read_text() == "from the client\n"
        with pytest.raises(OSError) as refused:
            (files / "new").write_text("x")
        assert refused.value.errno == errno.EROFS
    with mounted([committed_mount], scratch_dir / "committed") as files, \
            mounted([child_mount], scratch_dir / "child") as child_files:
        assert (files / "layer-file").read_text() == "from the client\n"
        assert (child_files / "layer-file").read_text() == "from the client\n"
    assert client.mounts("default/3/child") == [child_mount]

    # Update: one label, all labels; the tree's xattrs follow
    info = client.update("default/3/child", ["labels.team"], {"team": "db"})
    assert dict(info.labels) == {"team": "db"}
    assert xattr(node(tree, "default/2/sha256:aaa", "default/3/child"),
                 "user.label.team") == "db"
    info = client.update("default/3/child", ["labels"], {"color": "blue"})
    assert dict(info.labels) == {"color": "blue"}
    # List with containerd's filters
    assert [i.name for i in client.list()] == ["default/2/sha256:aaa", "default/3/child",
                                               "default/4/look"]
    assert [i.name for i in client.list(
        'labels."containerd.io/snapshot.ref"==sha256:aaa,parent==""')] == [
        "default/2/sha256:aaa"]
    assert [i.name for i in client.list("kind==view", "labels.color")] == [
        "default/3/child", "default/4/look"]

    # made with mkdir and setfattr: visible over Stat and List
    os.mkdir(node(tree, "default/2/sha256:aaa", "by-hand"))
    os.setxattr(node(tree, "default/2/sha256:aaa", "by-hand"), "user.label.who", b"shell")
    by_hand = client.stat("by-hand")
    assert (by_hand.kind, by_hand.parent, dict(by_hand.labels)) == (
        api.ACTIVE, "default/2/sha256:aaa", {"who": "shell"})
    assert "by-hand" in [i.name for i in client.list("labels.who==shell")]

    # ... and only rmdir removes it: containerd's collector must not
    code, why = client.refused("Remove", api.RemoveSnapshotRequest(key="by-hand"))
    assert code is Code.FAILED_PRECONDITION and "was made in the tree" in why
    os.rmdir(node(tree, "default/2/sha256:aaa", "by-hand"))
    for key in ("default/4/look", "default/3/child", "default/2/sha256:aaa"):
        client.remove(key)
    client.cleanup()
    assert client.list() == [] and snapshots_json(tree) == {}
    assert not os.path.lexists(base)  # looked up before: the removal reached the kernel
    assert sorted(os.listdir(tree.mountpoint)) == [".dmfs"]


@pytest.mark.no_udev_only
def test_errors_as_containerd_expects_them(tree: MountedTree, client: SnapshotsClient,
                                           scratch_dir: Path) -> None:
    client.prepare("a")
    client.commit("base", "a")
    client.prepare("work", "base")
    client.view("look", "base")
    cases = [
        (Code.NOT_FOUND, "Stat", api.StatSnapshotRequest(key="missing"), "does not exist"),
        (Code.NOT_FOUND, "Prepare", api.PrepareSnapshotRequest(key="x", parent="gone"), ""),
        (Code.ALREADY_EXISTS, "Prepare", api.PrepareSnapshotRequest(key="work"), ""),
        (Code.ALREADY_EXISTS, "Commit", api.CommitSnapshotRequest(name="base", key="work"),
         "already exists"),
        (Code.INVALID_ARGUMENT, "Prepare", api.PrepareSnapshotRequest(key="x", parent="work"),
         "not committed"),
        (Code.INVALID_ARGUMENT, "Prepare", api.PrepareSnapshotRequest(key=""), ""),
        (Code.INVALID_ARGUMENT, "Prepare",
         api.PrepareSnapshotRequest(key="x", labels={"big": "v" * 5000}), "4096"),
        (Code.INVALID_ARGUMENT, "List", api.ListSnapshotsRequest(filters=["kind=="]), ""),
        (Code.FAILED_PRECONDITION, "Remove", api.RemoveSnapshotRequest(key="base"),
         "child snapshot"),
        (Code.FAILED_PRECONDITION, "Commit", api.CommitSnapshotRequest(name="n", key="look"),
         "not active"),
    ]
    for code, method, request, words in cases:
        found, message = client.refused(method, request)
        assert found is code and words in message, (method, request, found, message)
    request = api.UpdateSnapshotRequest(info=api.Info(name="work", parent="other"))
    request.update_mask.paths.append("parent")
    assert client.refused("Update", request)[0] is Code.INVALID_ARGUMENT
    raw = client.channel.unary_unary("/containerd.services.snapshots.v1.Snapshots/Stat")
    with pytest.raises(grpc.RpcError) as garbage:
        raw(b"\x12\x02\xff\xfe", timeout=30)  # key: not UTF-8
    assert garbage.value.code() is Code.INVALID_ARGUMENT
    log = tree.log()
    assert "grpc Stat 'missing' refused (NOT_FOUND): snapshot 'missing' does not exist" in log
    assert "grpc Remove 'base' refused (FAILED_PRECONDITION)" in log
    assert "Traceback" not in log
    assert client.stat("work").kind == api.ACTIVE  # still serving, nothing changed


def test_a_device_the_client_holds(tree: MountedTree, client: SnapshotsClient,
                                   scratch_dir: Path, socket_path: Path) -> None:
    """Remove and Commit refuse and change nothing while the client has the device
    mounted or open; idle expiry (1 s here) unmounts dmfs's own mount only; a
    restart leaves the client's mount alone; nothing is ever Faulty."""
    client.prepare("layer")
    client.commit("base", "layer")
    [active] = client.prepare("work", "base")
    [view] = client.view("look", "base")
    journal = tree.config.parent / "state"
    with mounted([active], scratch_dir / "c-work"):
        before = journal_files(journal), snapshots_json(tree)
        for method, request in (
                ("Remove", api.RemoveSnapshotRequest(key="work")),
                ("Commit", api.CommitSnapshotRequest(name="work-c", key="work"))):
            code, message = client.refused(method, request)
            assert code is Code.FAILED_PRECONDITION, (method, message)
            assert "outside dmfs" in message
        assert (journal_files(journal), snapshots_json(tree)) == before
        # dmfs's own mount of it is still there and writable
        (node(tree, "base", "work") / "fs" / "still").write_text("rw\n")
    client.commit("work-c", "work")  # once the client let go

    with mounted([view], scratch_dir / "c-look") as files:
        # dmfs's mount of the same device beside the client's (one superblock)
        assert os.listdir(node(tree, "base", "look") / "fs") == os.listdir(files)
        own = tree.runtime_dir / "snapshots"
        wait_until(lambda: not any(p.is_mount() for p in own.iterdir()), 30,
                   "idle expiry of dmfs's own mounts")
        assert os.listdir(files) is not None and Path(view.source).exists()
        assert xattr(node(tree, "base", "look"), "user.dmfs.state") == "Activated"
        assert client.refused("Remove", api.RemoveSnapshotRequest(key="look"))[0] is \
            Code.FAILED_PRECONDITION
        # a stop and a start while the client holds it: left live, no problem
        tree.unmount()
        assert Path(view.source).exists() and not socket_path.exists()
        check = dmfs("check", str(tree.config)).stdout
        assert "problem" not in check.lower(), check
        tree.mount()
        assert os.listdir(files) is not None
    with SnapshotsClient(socket_path) as again:
        # held open by a process, not mounted: refused after the bounded wait
        holder = os.open(view.source, os.O_RDONLY)
        try:
            assert again.refused("Remove", api.RemoveSnapshotRequest(key="look"))[0] is \
                Code.FAILED_PRECONDITION
        finally:
            os.close(holder)
        again.remove("look")
    states = {name: entry["state"] for name, entry in snapshots_json(tree).items()}
    assert "Faulty" not in states.values(), states
    assert "Traceback" not in tree.log()


@pytest.mark.no_udev_only
def test_who_may_connect_and_a_killed_daemons_socket(tree: MountedTree,
                                                     client: SnapshotsClient,
                                                     socket_path: Path) -> None:
    info = socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (0, ADMIN_GID)
    directory = socket_path.parent.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o750
    assert (directory.st_uid, directory.st_gid) == (0, ADMIN_GID)

    def connect() -> None:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(os.fspath(socket_path))

    assert as_user(NOBODY, NOBODY, [], connect) == errno.EACCES
    assert as_user(NOBODY, NOBODY, [ADMIN_GID], connect) == 0
    assert client.prepare("a")  # root may

    # a killed daemon leaves its socket; the next start replaces it
    assert tree.pid is not None
    os.kill(tree.pid, signal.SIGKILL)
    tree.wait_stopped()
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)
    with pytest.MonkeyPatch.context() as patch:  # and its first mount of a snapshot fails
        patch.setenv("DMFS_FAILPOINT", "fs:mount=EIO*1")
        tree.mount()
    with SnapshotsClient(socket_path) as again:
        assert again.stat("a").kind == api.ACTIVE
        # a failing pool (here: the mount of the new snapshot) is UNAVAILABLE
        code, message = again.refused("Prepare", api.PrepareSnapshotRequest(key="b"))
        assert code is Code.UNAVAILABLE and "injected fault" in message
        assert again.prepare("b")  # the fault fired once; nothing was left behind


def test_remove_answers_before_the_device_is_deleted(client: SnapshotsClient,
                                                     scratch_dir: Path) -> None:
    """The thin device goes in the background (dmfs.grpc.service.REMOVE_IN_BACKGROUND):
    what containerd relies on holds as soon as Remove answers (NotFound, the key
    free again, even while the parent's own removal is in flight), and after
    Cleanup no device of the removed snapshots is left in the kernel."""
    client.prepare("layer")
    client.commit("base", "layer")
    [first] = client.prepare("work", "base")
    client.remove("work")
    client.remove("base")
    for key in ("work", "base"):
        assert client.refused("Stat", api.StatSnapshotRequest(key=key))[0] is Code.NOT_FOUND
    client.prepare("layer")
    client.commit("base", "layer")
    [again] = client.prepare("work", "base")
    with mounted([again], scratch_dir / "again") as files:
        (files / "new").write_text("a new device\n")
    client.remove("work")
    client.remove("base")
    client.cleanup()
    assert client.list() == []
    left = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True,
                          check=True).stdout
    for source in {first.source, again.source}:
        assert Path(source).name not in left, left


def test_concurrent_requests_and_mkdir(tree: MountedTree, client: SnapshotsClient,
                                       socket_path: Path) -> None:
    """Eight clients at once, and the shell: every answer is one the engine's
    contract allows, and the socket, the tree and snapshots.json agree after."""
    client.prepare("seed")
    client.commit("base", "seed")
    errors: list[BaseException] = []
    winners: list[int] = []

    def worker(number: int) -> None:
        own = SnapshotsClient(socket_path)
        try:
            for round_ in range(3):
                key = f"w{number}-{round_}"
                own.prepare(key, "base")
                own.commit(f"{key}-c", key)
                own.prepare(f"{key}-child", f"{key}-c")
                own.remove(f"{key}-child")
                own.remove(f"{key}-c")
            try:  # all race for one key: exactly one wins
                own.prepare("contested", "base")
                winners.append(number)
            except grpc.RpcError as refusal:
                assert refusal.code() is Code.ALREADY_EXISTS
        except BaseException as error:
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for number in range(5):  # the tree's front end at the same time
        os.mkdir(node(tree, "base", f"shell{number}"))
        os.rename(node(tree, "base", f"shell{number}"), node(tree, "base", f"shell{number}-c"))
        os.rmdir(node(tree, "base", f"shell{number}-c"))
    for thread in threads:
        thread.join()
    assert errors == [] and len(winners) == 1
    names = sorted(i.name for i in client.list())
    assert names == ["base", "contested"] == sorted(snapshots_json(tree))
    assert sorted(os.listdir(node(tree, "base"))) == ["contested", "fs"]
