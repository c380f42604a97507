"""``dmfs diff`` against a model, through a real tree: pool, FUSE mount, ext4 snapshots.

Random layers (seeded; the seed is printed, DMFS_DIFF_SEED repeats a run) are
applied to snapshots made with mkdir and committed with mv, and to a model
that knows every inode; each comparison must print exactly the model's
changes, in each of the ways dmfs diff can find them: lstat (--walk), the ext4
inode tables, and those with the thin delta proving contents equal, with the
real racy margin (where most inodes of a freshly built layer need a closer
look) and a small one (where the inode tables answer on their own).  The
command runs in this process (its startup costs ~1 s in the guest).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmfs.cli import main
from dmfs.diff import evidence, ext4, lineage
from dmfs.pool import blockdev, fs, thinpool
from tests.support.diffmodel import (
    FsModel,
    describe,
    expected_changes,
    model_view,
    random_layer,
)
from tests.support.loop_pool import LoopPool, loop_pool, run
from tests.support.tree import MountedTree, write_config

pytestmark = pytest.mark.no_udev_only

SEED = int(os.environ.get("DMFS_DIFF_SEED", random.randrange(2**32)))
OPERATIONS_PER_LAYER = int(os.environ.get("DMFS_DIFF_OPERATIONS", "60"))  # more: a longer run

DEFAULT_DELTA_COST_S = evidence.DELTA_COST_S
DEFAULT_RACY_MARGIN_NS = lineage.RACY_MARGIN_NS

#: the ways of comparing: command-line options, cost of a thin delta, racy margin
WAYS = {
    "walk": (["--walk"], None, None),
    "ext4": ([], None, None),
    "ext4+delta": ([], 0.0, None),
    "walk, small margin": (["--walk"], None, 30_000_000),
    "ext4+delta, small margin": ([], 0.0, 30_000_000),
}


class Diff:
    """Runs ``dmfs diff`` in this process and returns its output."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                 ) -> None:
        self.capsys, self.monkeypatch = capsys, monkeypatch
        self.options: list[str] = []

    def way(self, name: str) -> None:
        options, delta_cost, margin = WAYS[name]
        self.options = options
        self.monkeypatch.setattr(evidence, "DELTA_COST_S",
                                 DEFAULT_DELTA_COST_S if delta_cost is None else delta_cost)
        self.monkeypatch.setattr(lineage, "RACY_MARGIN_NS",
                                 DEFAULT_RACY_MARGIN_NS if margin is None else margin)

    def __call__(self, *args: str | Path, code: int = 0) -> tuple[list[str], str]:
        self.capsys.readouterr()
        status = main(["diff", "-F", *self.options, *map(str, args)])
        captured = self.capsys.readouterr()
        assert status == code, captured.err
        return captured.out.splitlines(), captured.err

    def lines(self, *args: str | Path) -> list[str]:
        """The change lines, without the summary."""
        out, _ = self(*args)
        return out[:-1]

    def json(self, *args: str | Path) -> dict:
        out, _ = self("--json", *args)
        return json.loads("\n".join(out))


@pytest.fixture
def diff(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Diff:
    return Diff(capsys, monkeypatch)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[LoopPool, MountedTree]]:
    """One pool and tree for the tests that only add snapshots of their own names
    (a pool and a mount cost ~4 s in the guest)."""
    scratch = Path(tempfile.mkdtemp(prefix="dmfs-test-", dir="/dev/shm"))
    scratch.chmod(0o755)
    try:
        with loop_pool(scratch) as pool:
            tree = MountedTree(write_config(scratch, pool.name), scratch / "mnt",
                               scratch / "run")
            try:
                tree.mount()
                yield pool, tree
            finally:
                tree.cleanup()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_names = itertools.count()


def files_of(node: Path) -> Path:
    return Path(os.path.realpath(node / "fs"))


def layer(node: Path, model: FsModel, rng: random.Random) -> None:
    """Random changes to an active node's files and to its model; the model must
    then describe the files exactly."""
    root = files_of(node)
    random_layer(model, root, rng, OPERATIONS_PER_LAYER)
    assert describe(root) == model_view(model)


def test_diff_equals_the_model_across_three_layers(tree: MountedTree, diff: Diff) -> None:
    print(f"seed {SEED} (DMFS_DIFF_SEED={SEED} repeats this run)")
    rng = random.Random(SEED)
    m = tree.mountpoint
    nodes = {"L1": m / "L1", "L2": m / "L1/L2", "L3": m / "L1/L2/L3", "S3": m / "L1/L2/S3",
             "top": m / "L1/L2/L3/top"}
    models: dict[str, FsModel] = {}
    parent_model = FsModel()
    for name, parent in (("L1", None), ("L2", "L1"), ("L3", "L2"), ("S3", "L2"),
                         ("top", "L3")):
        key = f"{name}-active" if name != "top" else name
        active = nodes[name].parent / key
        active.mkdir()
        model = (models[parent] if parent else parent_model).copy()
        layer(active, model, rng)
        models[name] = model
        if name != "top":
            active.rename(nodes[name])
    pairs = [("L1", "L2"), ("L2", "L3"), ("L1", "L3"), ("L3", "S3"), ("L1", "S3"),
             ("L3", "top")]
    for way in WAYS:
        diff.way(way)
        for old, new in pairs:
            for a, b in ((old, new), (new, old)):
                assert diff.lines(nodes[a], nodes[b]) == expected_changes(
                    models[a], models[b]), f"{a} -> {b}, {way}"
        assert diff.lines(nodes["L2"]) == expected_changes(models["L1"], models["L2"]), way
        assert diff.lines(nodes["L1"] / "fs") == expected_changes(None, models["L1"]), way
        assert diff.lines(m / ".dmfs/by-name/top") == expected_changes(
            models["L3"], models["top"]), way

    # How each way found the answer.
    for way, metadata in (("walk", "lstat"), ("ext4", "ext4 inode tables")):
        diff.way(way)
        method = diff.json(nodes["L1"], nodes["L3"])["method"]
        assert method["metadata"] == metadata and method["related"]
    # (Whether a thin delta pays off depends on the clock: the tests below check it.)

    # With no daemon, the command opens the pool itself and releases what it used.
    config = tree.config
    tree.unmount()
    diff.way("ext4+delta")
    assert diff.lines("--config", config, "L1", "L3") == expected_changes(
        models["L1"], models["L3"])
    assert diff.lines("--config", config, "L2") == expected_changes(models["L1"], models["L2"])
    _, err = diff("--config", config, "L1", "nosuch", code=2)
    assert "no snapshot 'nosuch'" in err
    assert not fs.mounts_under(tree.runtime_dir / "snapshots")
    live = run("dmsetup", "ls").stdout
    assert "-snap-" not in live, live


def test_changes_within_one_clock_tick_in_two_siblings(
        shared: tuple[LoopPool, MountedTree], diff: Diff) -> None:
    """Two children of one snapshot change a file to the same size, mtime and ctime
    (the same clock tick): equal inode records, different data.  Only the racy
    rule catches it; the records are checked to be equal, so it is exercised."""
    m = shared[1].mountpoint
    (m / "tick").mkdir()
    (files_of(m / "tick") / "f").write_bytes(os.urandom(8192))
    (m / "tick").rename(m / "ticks")
    (m / "ticks/one").mkdir()
    (m / "ticks/two").mkdir()
    paths = [files_of(m / "ticks" / name) / "f" for name in ("one", "two")]
    mtime = os.stat(paths[0]).st_mtime_ns
    fds = [os.open(path, os.O_RDWR) for path in paths]
    try:
        for _attempt in range(100):
            for fd, byte in zip(fds, (b"1", b"2"), strict=True):
                os.pwrite(fd, byte * 8192, 0)
                os.utime(fd, ns=(mtime, mtime))
            stats = [os.fstat(fd) for fd in fds]
            if stats[0].st_ctime_ns == stats[1].st_ctime_ns:
                break
        else:
            pytest.fail("no two writes in one clock tick in 100 attempts")
    finally:
        for fd in fds:
            os.close(fd)
    for name in ("one", "two"):
        (m / "ticks" / name).rename(m / "ticks" / f"{name}-c")
    one, two = m / "ticks/one-c", m / "ticks/two-c"
    devices = [blockdev.device_node(f"{os.major(d)}:{os.minor(d)}")
               for d in (os.stat(files_of(n)).st_dev for n in (one, two))]
    with ext4.Image(devices[0]) as a, ext4.Image(devices[1]) as b:
        ext4.load_pair(a, b)
        assert stats[0].st_ino not in ext4.changed_inodes(a, b)  # the records agree
    for way in WAYS:
        diff.way(way)
        assert diff.lines(one, two) == ["M\tF\t/f\t(content)"], way
        assert diff.lines(two, one) == ["M\tF\t/f\t(content)"], way
        assert diff.lines(m / "ticks", one) == ["M\tF\t/f\t(content)"], way


@pytest.fixture
def small_build(shared: tuple[LoopPool, MountedTree]) -> dict[str, Path]:
    """A committed base and its committed child app that rewrote a file in place
    (same size and mtime) and added one, under names of their own."""
    m = shared[1].mountpoint
    number = next(_names)
    name, child, temporary = f"base{number}", f"app{number}", f"a{number}"
    (m / "b").mkdir()
    root = files_of(m / "b")
    (root / "same").write_bytes(os.urandom(100_000))
    (root / "changed").write_bytes(os.urandom(20_000))
    (m / "b").rename(m / name)
    (m / name / temporary).mkdir()
    root = files_of(m / name / temporary)
    st = os.stat(root / "changed")
    with open(root / "changed", "r+b") as f:
        f.write(os.urandom(20_000))
    os.utime(root / "changed", ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "added").write_text("new\n")
    (m / name / temporary).rename(m / name / child)
    return {"base": m / name, "app": m / name / child, "tree": m, "config": shared[1].config}


APP_CHANGES = ["M\tF\t/changed\t(content)", "+\tF\t/added"]


def test_defined_results(small_build: dict[str, Path], diff: Diff) -> None:
    m, base, app = small_build["tree"], small_build["base"], small_build["app"]
    diff.way("ext4")
    assert diff.lines(base, app) == sorted(APP_CHANGES, key=lambda line: line.split("\t")[2])
    # The same snapshot twice, by two names: nothing is read.
    out, _ = diff(base, m / ".dmfs/by-name" / base.name)
    assert out == [f"no differences: {base.name} -> {base.name}"]
    document = diff.json(app, app)
    assert document["changes"] == [] and document["summary"]["modified"] == 0
    # A view has its parent's files.
    (base / "look").mkdir(mode=0o555)
    assert diff.lines(base / "look") == []
    # An active snapshot being written: what was written before is exact; what is
    # written meanwhile may be listed or not.
    (app / "live").mkdir()
    live = files_of(app / "live")
    (live / "before").write_text("before\n")
    (live / "busy").mkdir()
    stop = threading.Event()

    def write() -> None:
        number = 0
        while not stop.is_set():
            (live / "busy" / f"f{number}").write_bytes(os.urandom(4096))
            number += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        out, err = diff(app, app / "live")
    finally:
        stop.set()
        writer.join()
    assert "live is active" in err
    settled = [line for line in out[:-1] if "/busy" not in line]
    assert settled == ["+\tF\t/before"]
    # Names instead of nodes: found through the tree that serves the pool.
    config = small_build["config"]
    assert diff.lines("--config", config, base.name, app.name) == diff.lines(base, app)
    _, err = diff("--config", config, "nosuch", code=2)
    assert "no snapshot 'nosuch'" in err
    # Bad arguments: usage errors, nothing touched.
    for arguments in ((base, app, app), (m / ".dmfs",), (m.parent,)):
        _, err = diff(*arguments, code=2)
        assert err.startswith("dmfs: error:")


def test_contents_proved_equal_by_shared_blocks(shared: tuple[LoopPool, MountedTree],
                                                diff: Diff) -> None:
    """chmod of a big file: its record changed, its blocks did not; the thin
    delta says so and nothing is read."""
    m = shared[1].mountpoint
    (m / "blk").mkdir()
    (files_of(m / "blk") / "big").write_bytes(os.urandom(4 << 20))
    (m / "blk").rename(m / "big")
    (m / "big/c").mkdir()
    (files_of(m / "big/c") / "big").chmod(0o600)
    (m / "big/c").rename(m / "big/chmod")
    diff.way("ext4+delta")
    document = diff.json(m / "big", m / "big/chmod")
    assert [(c["path"], c["attributes"]) for c in document["changes"]] == [("/big", ["mode"])]
    method = document["method"]
    assert method["thin_delta"] and method["contents_proved_equal_by_blocks"] == 1
    assert method["files_read"] == 0
    diff.way("ext4")
    diff.monkeypatch.setattr(evidence, "DELTA_COST_S", float("inf"))
    method = diff.json(m / "big", m / "big/chmod")["method"]
    assert not method["thin_delta"] and method["files_read"] == 2
    assert method["bytes_read"] == 2 * (4 << 20)


def test_a_held_metadata_snapshot_is_waited_for_then_reported(
        shared: tuple[LoopPool, MountedTree], small_build: dict[str, Path], diff: Diff,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another dmfs process holds the metadata snapshot (its lock and the
    reservation): the command waits for it, and says so if it waits too long.
    (A reservation without the lock was left by a process that died: it is
    released at once, see tests/guest for issue 10.)"""
    thin_pool = shared[0]
    base, app = small_build["base"], small_build["app"]
    diff.way("ext4+delta")
    holding, release = threading.Event(), threading.Event()

    def other_dmfs_process() -> None:
        with thinpool._metadata_snapshot_lock(thin_pool.name):
            thin_pool.message("reserve_metadata_snap")
            holding.set()
            release.wait()
            thin_pool.message("release_metadata_snap")

    holder = threading.Thread(target=other_dmfs_process)
    holder.start()
    try:
        assert holding.wait(10)
        monkeypatch.setattr(thinpool, "METADATA_SNAPSHOT_WAIT", 0.5)
        _, err = diff(base, app, code=1)
        assert "another dmfs process has held its metadata snapshot" in err
        # Held briefly (the daemon's thin_ls does that): the command waits.
        monkeypatch.setattr(thinpool, "METADATA_SNAPSHOT_WAIT", 10.0)
        threading.Timer(0.3, release.set).start()
        document = diff.json(base, app)
    finally:
        release.set()
        holder.join()
    assert document["method"]["thin_delta"]
    assert [c["path"] for c in document["changes"]] == ["/added", "/changed"]


def test_another_user_gets_the_same_answer_without_the_devices(
        small_build: dict[str, Path]) -> None:
    """Without root the devices cannot be read: lstat, same result."""
    from dmfs.diff import compare_trees

    roots = [Path(os.readlink(small_build[name] / "fs")) for name in ("base", "app")]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = compare_trees(roots[0], roots[1], racy_after_ns=2**62)
            answer = [[c.line() for c in result.changes], result.facts]
        except BaseException as error:
            answer = [[f"failed: {error!r}"], {}]
        finally:
            os.write(write_end, json.dumps(answer).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines, facts = json.loads(pipe.read())
    os.waitpid(pid, 0)
    print(lines, facts)
    assert facts["metadata"] == "lstat" and "devices" in facts
    # lost+found (0700 root) is left out, and said so.
    assert facts["not_compared"] == ["/lost+found"]
    assert lines == ["+\t/added", "M\t/changed\t(content)"]


def test_snapshots_of_two_pools_are_compared_path_by_path(
        shared: tuple[LoopPool, MountedTree], scratch_dir: Path, diff: Diff) -> None:
    tree = shared[1]
    other_dir = scratch_dir / "other"
    other_dir.mkdir()
    with loop_pool(other_dir, data_mib=256) as other_pool:
        config = write_config(other_dir, other_pool.name)
        other = MountedTree(config, other_dir / "mnt", other_dir / "run")
        try:
            other.mount()
            (tree.mountpoint / "one").mkdir()  # a root snapshot of the shared pool
            (other.mountpoint / "two").mkdir()
            first, second = (files_of(tree.mountpoint / "one"),
                             files_of(other.mountpoint / "two"))
            (first / "d").mkdir()
            (first / "d/moved").write_text("moving\n")
            (first / "kept").write_bytes(b"k" * 5000)
            (first / "changed").write_bytes(b"a" * 5000)
            subprocess.run(["cp", "-a", f"{first}/.", f"{second}/"], check=True)
            os.rename(second / "d/moved", second / "moved-here")
            with open(second / "changed", "r+b") as f:
                f.write(b"b")
            st = os.stat(first / "changed")
            os.utime(second / "changed", ns=(st.st_atime_ns, st.st_mtime_ns))
            diff.way("ext4+delta")
            document = diff.json(tree.mountpoint / "one", other.mountpoint / "two")
            assert not document["method"]["related"]
            assert [(c["change"], c["path"], c["attributes"]) for c in document["changes"]] == [
                ("modified", "/changed", ["content"]),
                ("removed", "/d/moved", []),
                ("added", "/moved-here", []),
            ]
        finally:
            other.cleanup()
