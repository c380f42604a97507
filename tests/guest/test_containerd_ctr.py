"""containerd drives dmfs: the real containerd daemon and ctr (Debian's 1.6),
dmfs as its proxy snapshotter ``dmfs``, each result checked in the tree.

One pool, one dmfs daemon and one containerd serve the whole module (each costs
seconds to start in the guest); the tests use names of their own and leave the
pool as they found it.  containerd's own ``native`` snapshotter, in the same
daemon, is the reference where the two should print the same.

What containerd does that the checks rely on (see the README's "With
containerd"): its metadata layer keeps its own database and hands dmfs keys
``<namespace>/<sequence>/<name>``; it passes on only the labels under
``containerd.io/snapshot/`` (and ``containerd.io/snapshot.ref``); its Remove
drops its record at once and leaves dmfs's Remove to its garbage collector,
which runs right after, so a removal shows in the tree a moment later.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.containerd import (
    DMFS_SNAPSHOTTER,
    NAMESPACE,
    NATIVE_SNAPSHOTTER,
    Stack,
    collect_garbage,
    scratch_containerd_stack,
)
from tests.support.snapshots_client import GC_ROOT, SnapshotsClient
from tests.support.torture import (
    assert_daemon_healthy,
    check,
    faulty_snapshots,
    node_path,
    read_snapshots,
    tree_matches_snapshots,
)
from tests.support.tree import wait_until

#: labels containerd's metadata layer passes on to a snapshotter
INHERITED = re.compile(r"containerd\.io/snapshot/.*|containerd\.io/snapshot\.ref")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with scratch_containerd_stack("dmfs-ctd-", layers=3) as stack:
        yield stack


@pytest.fixture
def healthy(stack: Stack) -> Iterator[Stack]:
    """The stack, and after the test: the daemon alive without tracebacks or
    Faulty devices, the tree matching snapshots.json."""
    since = len(stack.tree.log())
    yield stack
    assert_daemon_healthy(stack.tree, since, "after the test")
    assert not faulty_snapshots(stack.tree)
    assert not tree_matches_snapshots(stack.tree)


# ---------------------------------------------------------------------- the tree
def keys_named(stack: Stack, name: str) -> list[str]:
    """The pool's keys containerd made for ``name`` in the default namespace."""
    pattern = re.compile(re.escape(NAMESPACE) + r"/\d+/" + re.escape(name))
    return [s["name"] for s in read_snapshots(stack.tree) if pattern.fullmatch(s["name"])]


def key_of(stack: Stack, name: str) -> str:
    keys = keys_named(stack, name)
    assert len(keys) == 1, f"{name}: keys {keys}"
    return keys[0]


def node_of(stack: Stack, name: str) -> Path:
    """The node of containerd's snapshot ``name``, found from snapshots.json; its
    .dmfs/containerd link must lead to the same node."""
    snapshots = read_snapshots(stack.tree)
    node = stack.tree.path(*node_path(snapshots, key_of(stack, name)))
    link = stack.tree.path(".dmfs", "containerd", NAMESPACE, name.replace("/", "%2F"))
    assert os.path.samefile(link, node), f"{link} does not lead to {node}"
    return node


def gone_from_tree(stack: Stack, name: str) -> None:
    """containerd removed ``name``: its collector removes it from dmfs soon after."""
    try:
        wait_until(lambda: not keys_named(stack, name), 5, f"{name} to leave the tree")
    except AssertionError:  # removed while a collection ran: containerd skipped it
        collect_garbage(stack, lambda: not keys_named(stack, name), f"{name} to leave the tree")
    link = stack.tree.path(".dmfs", "containerd", NAMESPACE, name)
    assert not os.path.lexists(link)


def tree_labels(node: Path) -> dict[str, str]:
    prefix = "user.label."
    return {name[len(prefix):]: os.getxattr(node, name).decode()
            for name in os.listxattr(node) if name.startswith(prefix)}


def info_of(stack: Stack, snapshotter: str, name: str) -> dict[str, object]:
    return json.loads(stack.containerd.snapshots(snapshotter, "info", name).stdout)


def inherited(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if INHERITED.fullmatch(k)}


# ---------------------------------------------------------------------- ctr snapshots
def comparable(command: str, output: str) -> str:
    """ctr's output without what differs between snapshotters by nature: times,
    ctr's gc.root stamps, the order of a label list."""
    if command.startswith("info"):
        info = json.loads(output)
        info.pop("Created"), info.pop("Updated")
        labels = info.get("Labels", {})
        if "containerd.io/gc.root" in labels:
            labels["containerd.io/gc.root"] = "<time>"
        return json.dumps(info, sort_keys=True)
    if command.startswith("label"):
        labels = sorted(re.sub(r"(containerd\.io/gc\.root=).*", r"\1<time>", label)
                        for label in output.strip().split(","))
        return ",".join(labels)
    return output


def snapshot_session(stack: Stack, snapshotter: str,
                     checkpoint: Callable[[str], None] = lambda step: None) -> dict[str, str]:
    """The ctr snapshots commands of issue 13 in order, on one snapshotter: what
    each printed (errors: what they printed on stderr), comparable across
    snapshotters.  ``checkpoint(step)`` runs after each step."""
    printed: dict[str, str] = {}

    def ctr(step: str, *args: str, fails: bool = False) -> None:
        result = stack.containerd.snapshots(snapshotter, *args, check=not fails)
        if fails:
            assert result.returncode != 0, f"{step} succeeded"
            printed[step] = result.stderr.strip()
        else:
            printed[step] = comparable(step, result.stdout)
        checkpoint(step)

    ctr("prepare", "prepare", "s-work")
    ctr("label", "label", "s-work", "containerd.io/snapshot/team=db", "plain=kept-by-containerd")
    ctr("info active", "info", "s-work")
    ctr("commit", "commit", "s-base", "s-work")
    ctr("view", "view", "s-look", "s-base")
    ctr("prepare child", "prepare", "s-child", "s-base")
    ctr("ls", "ls")
    ctr("tree", "tree")
    ctr("info committed", "info", "s-base")
    ctr("info view", "info", "s-look")
    ctr("prepare existing", "prepare", "s-base", fails=True)
    ctr("commit onto existing", "commit", "s-look", "s-child", fails=True)
    ctr("rm with children", "rm", "s-base", fails=True)
    ctr("rm missing", "rm", "s-missing", fails=True)
    ctr("info missing", "info", "s-missing", fails=True)
    ctr("rm", "rm", "s-look", "s-child")
    ctr("rm parent", "rm", "s-base")
    ctr("ls after", "ls")
    return printed


@pytest.mark.no_udev_only
def test_ctr_snapshot_commands_agree_with_native_and_the_tree(healthy: Stack) -> None:
    stack = healthy

    def in_the_tree(step: str) -> None:
        if step == "prepare":
            node = node_of(stack, "s-work")
            assert os.getxattr(node, "user.dmfs.kind") == b"active"
            assert os.path.isdir(node / "fs" / "lost+found")
        elif step == "label":
            node = node_of(stack, "s-work")
            # only what containerd passes on reaches dmfs; containerd keeps the rest
            assert tree_labels(node) == {"containerd.io/snapshot/team": "db"}
            shown = info_of(stack, DMFS_SNAPSHOTTER, "s-work")["Labels"]
            assert shown["plain"] == "kept-by-containerd"  # type: ignore[index]
        elif step == "commit":
            node = node_of(stack, "s-base")
            assert os.getxattr(node, "user.dmfs.kind") == b"committed"
            assert not keys_named(stack, "s-work")
            labels = info_of(stack, DMFS_SNAPSHOTTER, "s-base")["Labels"]
            assert tree_labels(node) == inherited(labels)  # type: ignore[arg-type]
        elif step in ("view", "prepare child"):
            name, kind = ("s-look", b"view") if step == "view" else ("s-child", b"active")
            node = node_of(stack, name)
            assert node.parent == node_of(stack, "s-base")  # nested under its parent
            assert os.getxattr(node, "user.dmfs.kind") == kind
        elif step == "rm":
            gone_from_tree(stack, "s-look")
            gone_from_tree(stack, "s-child")
        elif step == "rm parent":
            gone_from_tree(stack, "s-base")

    on_dmfs = snapshot_session(stack, DMFS_SNAPSHOTTER, in_the_tree)
    on_native = snapshot_session(stack, NATIVE_SNAPSHOTTER)
    assert on_dmfs == on_native
    assert "s-base" in on_dmfs["tree"] and "\\_ s-child" in on_dmfs["tree"]


def mount_as_containerd_would(ctr_output: str) -> list[str]:
    """The mount(8) command for what ``ctr snapshots mounts TARGET KEY`` printed
    (``mount -t TYPE SOURCE TARGET -o OPTIONS``, the options possibly empty)."""
    words = ctr_output.split()
    assert words[:2] == ["mount", "-t"] and words[5] == "-o", ctr_output
    return words[:5] + (["-o", words[6]] if len(words) > 6 else [])


@pytest.mark.no_udev_only
def test_usage_is_the_trees_and_mounts_are_the_device(healthy: Stack, tmp_path: Path) -> None:
    """Usage in bytes is the tree's user.dmfs.usage; Mounts give the snapshot's
    device, which a client mounts beside dmfs's own mount of it (one superblock)."""
    stack = healthy
    snapshots = stack.containerd
    snapshots.snapshots(DMFS_SNAPSHOTTER, "prepare", "u-work")
    work = node_of(stack, "u-work")
    (work / "fs" / "data").write_bytes(os.urandom(2 * 2**20))
    os.sync()
    usage = snapshots.snapshots(DMFS_SNAPSHOTTER, "usage", "-b", "u-work").stdout.splitlines()
    size = int(usage[1].split()[1])
    assert size == int(os.getxattr(work, "user.dmfs.usage")) and size >= 2 * 2**20

    device_id = os.getxattr(work, "user.dmfs.id").decode()
    device = f"/dev/mapper/{stack.pool.name}-snap-{device_id}"
    target = tmp_path / "client"
    target.mkdir()
    command = snapshots.snapshots(DMFS_SNAPSHOTTER, "mounts", str(target), "u-work").stdout
    assert command.split()[:5] == ["mount", "-t", "ext4", device, str(target)]
    subprocess.run(mount_as_containerd_would(command), check=True)
    try:
        (work / "fs" / "from-tree").write_text("one filesystem")
        assert (target / "from-tree").read_text() == "one filesystem"
        (target / "from-client").write_text("both ways")
        assert (work / "fs" / "from-client").read_text() == "both ways"
    finally:
        subprocess.run(["umount", str(target)], check=True)

    snapshots.snapshots(DMFS_SNAPSHOTTER, "commit", "u-base", "u-work")
    snapshots.snapshots(DMFS_SNAPSHOTTER, "view", "u-look", "u-base")
    command = snapshots.snapshots(DMFS_SNAPSHOTTER, "mounts", str(target), "u-look").stdout
    assert command.split()[:3] == ["mount", "-t", "ext4"]
    assert "ro" in command.split()[-1].split(","), command  # views are read-only
    subprocess.run(mount_as_containerd_would(command), check=True)
    try:
        assert (target / "from-client").read_text() == "both ways"
        assert (node_of(stack, "u-look") / "fs" / "from-tree").exists()
    finally:
        subprocess.run(["umount", str(target)], check=True)
    snapshots.snapshots(DMFS_SNAPSHOTTER, "rm", "u-look")
    snapshots.snapshots(DMFS_SNAPSHOTTER, "rm", "u-base")
    gone_from_tree(stack, "u-base")


@pytest.mark.no_udev_only
def test_what_containerd_changes_reaches_the_kernels_cache_at_once(healthy: Stack) -> None:
    """The kernel caches nodes for minutes; a commit or removal made through the
    socket must not leave it showing the old name, mode or link count."""
    stack = healthy
    snapshots = stack.containerd
    root_links = stack.tree.mountpoint.stat().st_nlink
    snapshots.snapshots(DMFS_SNAPSHOTTER, "prepare", "c-work")
    work = node_of(stack, "c-work")
    assert stat.S_IMODE(work.stat().st_mode) == 0o755  # now in the kernel's cache
    wait_until(lambda: stack.tree.mountpoint.stat().st_nlink == root_links + 1, 5,
               "the root's new link count")
    snapshots.snapshots(DMFS_SNAPSHOTTER, "commit", "c-base", "c-work")
    wait_until(lambda: not work.exists(), 5, "the old name to leave the kernel's cache")
    base = node_of(stack, "c-base")
    assert stat.S_IMODE(base.stat().st_mode) == 0o555
    snapshots.snapshots(DMFS_SNAPSHOTTER, "prepare", "c-child", "c-base")
    wait_until(lambda: base.stat().st_nlink == 3, 5, "the parent's new link count")
    child = node_of(stack, "c-child")
    assert child.stat().st_nlink == 2
    snapshots.snapshots(DMFS_SNAPSHOTTER, "rm", "c-child")
    snapshots.snapshots(DMFS_SNAPSHOTTER, "rm", "c-base")
    gone_from_tree(stack, "c-base")
    wait_until(lambda: not base.exists() and not child.exists(), 5,
               "the removed nodes to leave the kernel's cache")
    wait_until(lambda: stack.tree.mountpoint.stat().st_nlink == root_links, 5,
               "the root's link count")


# ---------------------------------------------------------------------- images
def test_import_unpacks_each_layer_into_a_nested_committed_node(healthy: Stack) -> None:
    stack = healthy
    image = stack.image
    stack.ctr("images", "import", "--snapshotter", DMFS_SNAPSHOTTER, str(image.archive))
    try:
        nodes = [node_of(stack, chain) for chain in image.chain_ids]
        for lower, upper in itertools.pairwise(nodes):
            assert upper.parent == lower  # the chain of layers is the nesting
        assert nodes[0].parent == stack.tree.mountpoint
        for node in nodes:
            assert os.getxattr(node, "user.dmfs.kind") == b"committed"
        bottom, top = nodes[0] / "fs", nodes[-1] / "fs"
        assert os.access(bottom / "bin" / "busybox", os.X_OK)
        assert os.readlink(bottom / "bin" / "sh") == "busybox"
        assert (bottom / "etc" / "removed-later").exists()
        assert not (nodes[1] / "fs" / "etc" / "removed-later").exists()  # the whiteout
        assert sorted(os.listdir(top / "layers")) == [str(n) for n in range(2, len(nodes) + 1)]
        # nothing of the unpack is left: every extract-... snapshot was committed
        assert not [s for s in read_snapshots(stack.tree) if "extract-" in s["name"]]
        on_dmfs = stack.containerd.snapshots(DMFS_SNAPSHOTTER, "tree").stdout
        assert on_dmfs.split() == [word for chain in image.chain_ids for word in ("\\_", chain)
                                   ][1:]
    finally:
        stack.ctr("images", "rm", "--sync", image.name)
    for chain in image.chain_ids:
        gone_from_tree(stack, chain)


def test_ctr_run_writes_into_an_active_snapshot_browsable_in_the_tree(healthy: Stack) -> None:
    stack = healthy
    image = stack.image
    stack.ctr("images", "import", "--snapshotter", DMFS_SNAPSHOTTER, str(image.archive))
    try:
        stack.ctr("run", "-d", "--snapshotter", DMFS_SNAPSHOTTER, image.name, "r-web",
                  "sh", "-c", "echo written by the container > /hello; exec sleep 600")
        try:
            rootfs = stack.tree.path(".dmfs", "containerd", NAMESPACE, "r-web", "fs")
            wait_until(lambda: (rootfs / "hello").exists(), 30, "the container's file")
            assert (rootfs / "hello").read_text() == "written by the container\n"
            node = node_of(stack, "r-web")
            assert os.getxattr(node, "user.dmfs.kind") == b"active"
            assert node.parent == node_of(stack, image.chain_ids[-1])
            assert os.access(rootfs / "bin" / "busybox", os.X_OK)  # the image's files
            # the container and the tree see one filesystem
            (rootfs / "from-tree").write_text("hi container")
            seen = stack.ctr("tasks", "exec", "--exec-id", "look", "r-web", "cat", "/from-tree")
            assert seen.stdout == "hi container"
        finally:
            stack.ctr("tasks", "kill", "-s", "SIGKILL", "r-web")
            wait_until(lambda: "STOPPED" in stack.ctr("tasks", "ls").stdout, 30,
                       "the task to stop")
            stack.ctr("tasks", "delete", "r-web")
            stack.ctr("containers", "delete", "r-web")
        gone_from_tree(stack, "r-web")
    finally:
        stack.ctr("images", "rm", "--sync", image.name)
    for chain in image.chain_ids:
        gone_from_tree(stack, chain)
    assert not faulty_snapshots(stack.tree)
    result = check(stack.tree.config)
    assert result.clean, result.describe()


# ---------------------------------------------------------------------- both front ends
def refused_to_containerd(stack: Stack, key: str) -> bool:
    """Whether dmfs has refused containerd's collector the removal of ``key``."""
    return f"grpc Remove {key!r} refused (FAILED_PRECONDITION): snapshot {key!r} was made " \
        "in the tree" in stack.tree.log()


def test_containerds_garbage_collector_leaves_the_trees_snapshots(healthy: Stack) -> None:
    """containerd tries to remove from its snapshotter every snapshot its database
    does not name, children first; those made in the tree are refused it
    (FailedPrecondition: containerd goes on), so they survive, and so does
    containerd's layer under one of them (README, "With containerd")."""
    stack = healthy
    image = stack.image
    stack.ctr("images", "import", "--snapshotter", DMFS_SNAPSHOTTER, str(image.archive))
    mine = stack.tree.path("g-mine")
    mine.mkdir()
    top = node_of(stack, image.chain_ids[-1])
    child = top / "g-child"
    child.mkdir()  # a tree snapshot on containerd's layer
    stack.ctr("images", "rm", image.name)  # containerd's layers are now garbage too
    collect_garbage(stack, lambda: refused_to_containerd(stack, "g-mine")
                    and refused_to_containerd(stack, "g-child"),
                    "the collector to try the tree's snapshots")
    assert mine.is_dir() and child.is_dir()
    assert keys_named(stack, image.chain_ids[-1])  # it has a child containerd cannot take
    child.rmdir()
    mine.rmdir()
    collect_garbage(stack, lambda: all(not keys_named(stack, chain)
                                       for chain in image.chain_ids),
                    "the collector to remove the image's layers")
    for chain in image.chain_ids:
        gone_from_tree(stack, chain)
    assert not faulty_snapshots(stack.tree)


class FrontEnd:
    """One front end's own snapshots in the stress test: a model of what it made."""

    def __init__(self, prefix: str, rng: random.Random) -> None:
        self.prefix = prefix
        self.rng = rng
        self.active: dict[str, str | None] = {}  # name -> parent
        self.committed: dict[str, str | None] = {}
        self.counter = 0
        self.done: list[str] = []

    def new_name(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def leaves(self) -> list[str]:
        parents = set(self.active.values()) | set(self.committed.values())
        return sorted(n for n in [*self.active, *self.committed] if n not in parents)

    def step(self, ops: dict[str, Callable[..., None]]) -> None:
        """One seeded operation: prepare (root or child), commit, or remove a leaf."""
        choices = ["prepare"] * 3
        if self.committed:
            choices += ["child"] * 3
        if self.active:
            choices += ["commit"] * 3
        if self.leaves():
            choices += ["remove"] * 2
        what = self.rng.choice(choices)
        name = self.new_name()
        if what == "prepare":
            ops["prepare"](name, None)
            self.active[name] = None
        elif what == "child":
            parent = self.rng.choice(sorted(self.committed))
            ops["prepare"](name, parent)
            self.active[name] = parent
        elif what == "commit":
            key = self.rng.choice(sorted(self.active))
            ops["commit"](name, key, self.active[key])
            self.committed[name] = self.active.pop(key)
        else:
            victim = self.rng.choice(self.leaves())
            kind = "active" if victim in self.active else "committed"
            parent = self.active.pop(victim, None) if kind == "active" else (
                self.committed.pop(victim))
            ops["remove"](victim, parent)
            name = victim
        self.done.append(f"{what} {name}")


STRESS_STEPS = 30


@pytest.mark.no_udev_only
def test_containerd_and_the_shell_at_once_keep_the_contract(healthy: Stack, torture_seed: int
                                                            ) -> None:
    """containerd's prepare/commit/remove through its proxy and mkdir/mv/rmdir in
    the tree, at the same time, each on its own snapshots (seeded, bounded).

    containerd's collector, which its removals set off, tries to remove the
    shell's snapshots too and is refused (see the test above): every outcome is
    as without containerd."""
    stack = healthy
    tree = stack.tree
    through_containerd = FrontEnd("k", random.Random(torture_seed))
    in_the_shell = FrontEnd("t", random.Random(torture_seed + 1))
    paths: dict[str, Path] = {}
    errors: list[BaseException] = []

    def containerd_side() -> None:
        with SnapshotsClient(stack.containerd.address, DMFS_SNAPSHOTTER, NAMESPACE,
                             labels=GC_ROOT) as client:
            ops = {"prepare": lambda name, parent: client.prepare(name, parent or ""),
                   "commit": lambda name, key, parent: client.commit(name, key),
                   "remove": lambda name, parent: client.remove(name)}
            for _ in range(STRESS_STEPS):
                through_containerd.step(ops)

    def prepare_in_tree(name: str, parent: str | None) -> None:
        paths[name] = (paths[parent] if parent else tree.mountpoint) / name
        paths[name].mkdir()

    def commit_in_tree(name: str, key: str, parent: str | None) -> None:
        source = paths.pop(key)
        paths[name] = source.with_name(name)
        source.rename(paths[name])

    def remove_in_tree(name: str, parent: str | None) -> None:
        paths.pop(name).rmdir()

    def shell_side() -> None:
        ops = {"prepare": prepare_in_tree, "commit": commit_in_tree, "remove": remove_in_tree}
        for _ in range(STRESS_STEPS):
            in_the_shell.step(ops)

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as error:
                errors.append(error)
        return run

    workers = [threading.Thread(target=guarded(containerd_side)),
               threading.Thread(target=guarded(shell_side))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    assert not errors, (f"containerd: {through_containerd.done}\nshell: {in_the_shell.done}\n"
                        f"{errors[0]!r}")

    # containerd's removals reach dmfs through its collector; one that met a
    # snapshot the shell removed or committed meanwhile stopped there
    expected = {*through_containerd.active, *through_containerd.committed}
    collect_garbage(stack, lambda: {containerd_name_of(s["name"]) for s in read_snapshots(tree)
                                    if containerd_name_of(s["name"]).startswith("k")}
                    == expected, "containerd's snapshots to settle")
    for name, parent in {**through_containerd.active, **through_containerd.committed}.items():
        node = node_of(stack, name)
        assert (node.parent == node_of(stack, parent)) if parent else (
            node.parent == tree.mountpoint)
    for name in in_the_shell.active:
        assert os.getxattr(paths[name], "user.dmfs.kind") == b"active", name
    for name in in_the_shell.committed:
        assert os.getxattr(paths[name], "user.dmfs.kind") == b"committed", name
    shell_nodes = {s["name"] for s in read_snapshots(tree) if s["name"].startswith("t")}
    assert shell_nodes == set(paths)

    # leave the pool as it was: leaves first, the shell's before containerd's
    # removals set its collector off again
    for name in sorted(paths, key=lambda n: len(paths[n].parts), reverse=True):
        paths[name].rmdir()
    with SnapshotsClient(stack.containerd.address, DMFS_SNAPSHOTTER, NAMESPACE) as client:
        while through_containerd.leaves():
            for name in through_containerd.leaves():
                client.remove(name)
                through_containerd.active.pop(name, None)
                through_containerd.committed.pop(name, None)
    collect_garbage(stack, lambda: not [s for s in read_snapshots(tree)
                                         if containerd_name_of(s["name"]).startswith("k")],
                    "containerd's snapshots to go")
    result = check(tree.config)
    assert result.clean, result.describe()


def containerd_name_of(key: str) -> str:
    """The name containerd gives ``key`` in the default namespace ('' if none)."""
    prefix, _, rest = key.partition("/")
    number, _, name = rest.partition("/")
    return name if prefix == NAMESPACE and number.isdigit() else ""
