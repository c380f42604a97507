"""Faults the engine must survive: a failed mount, a failed suspend, EBUSY from
umount, EIO from the journal's fsync (DMFS_FAILPOINT raise points, each once).

Each operation that meets the fault gets a clear errno (EIO, or EBUSY where
files in use are what umount's EBUSY means) and changes nothing: the node is
as it was in the tree, its xattrs and snapshots.json, the daemon goes on, the
next operation works, and after the daemon stops no thin device is left live
and ``dmfs check`` finds journal and pool in agreement.  A fault in the
journal must not come back after a crash either: what the daemon showed before
SIGKILL is what it shows after the restart.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support.loop_pool import LoopPool
from tests.support.torture import (
    assert_daemon_healthy,
    check,
    errno_name,
    faulty_snapshots,
    kill_daemon,
    live_thin_devices,
    read_snapshots,
    start,
    tree_matches_snapshots,
)
from tests.support.tree import MountedTree, errno_of


def started(tree: MountedTree, failpoints: str | None = None) -> None:
    result = start(tree, failpoints)
    assert result.returncode == 0, (
        f"dmfs mount with DMFS_FAILPOINT={failpoints} failed (did the fault fire while "
        f"starting?):\n{result.stderr}")


def refused_with(tree: MountedTree, code: int, call, point: str, what: str) -> None:  # type: ignore[no-untyped-def]
    answer = errno_of(call)
    assert f"failpoint {point}: raising" in tree.log(), f"{what}: the fault at {point} " \
        "was never injected (the operation no longer reaches that call?)"
    assert answer == code, f"{what} with a fault at {point}: {errno_name(answer)}, " \
        f"expected {errno_name(code)}"
    assert_daemon_healthy(tree, what=f"after {what} met the fault at {point}")


def visible_state(tree: MountedTree) -> dict[str, tuple]:
    """What a restart must keep: every snapshot's kind, parent and labels."""
    return {s["name"]: (s["kind"], s["parent"], s["labels"]) for s in read_snapshots(tree)}


def consistent(tree: MountedTree) -> None:
    assert not tree_matches_snapshots(tree), tree_matches_snapshots(tree)
    assert not faulty_snapshots(tree)


def stopped_cleanly(tree: MountedTree, pool: LoopPool) -> None:
    """Unmount; nothing of the pool stays live; dmfs check is clean."""
    tree.unmount()
    assert live_thin_devices(pool.name) == [], "thin devices left live after the daemon stopped"
    result = check(tree.config)
    assert result.clean, result.describe()


def committed(tree: MountedTree, name: str, content: str) -> Path:
    work = tree.path(f"{name}.w")
    work.mkdir()
    (work / "fs" / "f").write_text(content)
    work.rename(tree.path(name))
    return tree.path(name)


def is_mounted_read_write(node: Path) -> bool:
    target = os.readlink(node / "fs")
    return os.path.ismount(target) and not os.statvfs(target).f_flag & os.ST_RDONLY


def test_failed_mount_during_mkdir(unmounted_tree: MountedTree, thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    started(tree, "fs:mount=EIO*1")
    refused_with(tree, errno.EIO, tree.path("x").mkdir, "fs:mount", "mkdir x")
    assert not tree.path("x").exists()
    assert "x" not in visible_state(tree)
    consistent(tree)
    tree.path("x").mkdir()  # the name is free again
    (tree.path("x") / "fs" / "f").write_text("works")
    assert visible_state(tree)["x"][0] == "active"
    stopped_cleanly(tree, thin_pool)


def test_failed_mount_at_the_first_readlink_of_a_committed_node(
        unmounted_tree: MountedTree, thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    started(tree)
    committed(tree, "a", "in a")
    committed(tree, "b", "in b")
    tree.unmount()  # no snapshot mounted when the next daemon starts
    started(tree, "fs:mount=EIO*1")
    refused_with(tree, errno.EIO, lambda: os.listdir(tree.path("a", "fs")), "fs:mount",
                 "listing a/fs")
    assert os.getxattr(tree.path("a"), "user.dmfs.kind") == b"committed"
    consistent(tree)
    assert tree.path("b", "fs", "f").read_text() == "in b"  # the next one works
    stopped_cleanly(tree, thin_pool)  # a's device, activated for the mount, is not left live
    started(tree)
    assert tree.path("a", "fs", "f").read_text() == "in a"


@pytest.mark.parametrize(("point", "code"), [("dm:suspend", errno.EIO),
                                             ("fs:umount", errno.EBUSY)],
                         ids=["failed suspend", "busy umount"])
def test_a_failed_step_of_a_commit_leaves_the_snapshot_active_and_writable(
        unmounted_tree: MountedTree, thin_pool: LoopPool, point: str, code: int) -> None:
    tree = unmounted_tree
    started(tree, f"{point}={errno.errorcode[code]}*1")
    work = tree.path("work")
    work.mkdir()
    (work / "fs" / "f").write_text("data")
    refused_with(tree, code, lambda: work.rename(tree.path("done")), point,
                 "mv work done (commit)")
    assert not tree.path("done").exists()
    assert visible_state(tree)["work"][0] == "active"
    assert is_mounted_read_write(work), "the snapshot is no longer mounted read-write"
    (work / "fs" / "g").write_text("still writable")
    assert (work / "fs" / "f").read_text() == "data"
    consistent(tree)
    work.rename(tree.path("done"))  # the commit works now
    assert os.getxattr(tree.path("done"), "user.dmfs.kind") == b"committed"
    assert tree.path("done", "fs", "g").read_text() == "still writable"
    stopped_cleanly(tree, thin_pool)


def test_busy_umount_during_rmdir(unmounted_tree: MountedTree, thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    started(tree, "fs:umount=EBUSY*1")
    node = tree.path("node")
    node.mkdir()
    (node / "fs" / "f").write_text("kept")
    refused_with(tree, errno.EBUSY, node.rmdir, "fs:umount", "rmdir node")
    assert visible_state(tree)["node"][0] == "active"
    assert is_mounted_read_write(node) and (node / "fs" / "f").read_text() == "kept"
    consistent(tree)
    node.rmdir()
    assert "node" not in visible_state(tree)
    stopped_cleanly(tree, thin_pool)


def crash_and_restart_keeps(tree: MountedTree) -> None:
    """SIGKILL, restart: the tree shows what it showed before."""
    before = visible_state(tree)
    kill_daemon(tree)
    started(tree)
    assert visible_state(tree) == before, "after a crash the journal says something else"
    consistent(tree)


@pytest.mark.no_udev_only  # the fault is in the journal; the devices are incidental
def test_failed_journal_fsync_during_mkdir(unmounted_tree: MountedTree,
                                           thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    started(tree)  # the first start writes the journal; the fault is for the mkdir
    committed(tree, "base", "in base")
    tree.unmount()
    started(tree, "journal:fsync=EIO*1")
    child = tree.path("base", "child")
    refused_with(tree, errno.EIO, child.mkdir, "journal:fsync", "mkdir base/child")
    assert not child.exists() and "child" not in visible_state(tree)
    consistent(tree)
    crash_and_restart_keeps(tree)
    child.mkdir()
    assert (child / "fs" / "f").read_text() == "in base"
    stopped_cleanly(tree, thin_pool)


@pytest.mark.no_udev_only
def test_failed_journal_fsync_during_a_label_change(unmounted_tree: MountedTree,
                                                    thin_pool: LoopPool) -> None:
    """The refused label must not come back after a crash either, even though no
    later record of that node's labels follows it in the journal."""
    tree = unmounted_tree
    started(tree)
    node = committed(tree, "node", "x")
    other = committed(tree, "other", "y")
    os.setxattr(node, "user.label.kept", b"1")
    tree.unmount()
    started(tree, "journal:fsync=EIO*1")
    refused_with(tree, errno.EIO, lambda: os.setxattr(node, "user.label.lost", b"2"),
                 "journal:fsync", "setfattr user.label.lost")
    assert errno_of(lambda: os.getxattr(node, "user.label.lost")) == errno.ENODATA
    assert visible_state(tree)["node"][2] == {"kept": "1"}
    consistent(tree)
    os.setxattr(other, "user.label.next", b"3")  # the next change works
    crash_and_restart_keeps(tree)
    assert visible_state(tree)["node"][2] == {"kept": "1"}
    assert visible_state(tree)["other"][2] == {"next": "3"}
    stopped_cleanly(tree, thin_pool)
