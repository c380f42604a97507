"""Starting and stopping the daemon: signals, umount, kill -9, mount(8), fstab,
and read-only snapshots that unmount themselves when idle."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmfs.pool import fs
from tests.support.loop_pool import LoopPool, run
from tests.support.tree import MountedTree, dmfs, wait_until


def snapshot_mounts(tree: MountedTree) -> list[Path]:
    return [e.mountpoint for e in fs.mountinfo()
            if e.mountpoint.parent == tree.runtime_dir / "snapshots"]


def thin_devices(pool: LoopPool) -> list[str]:
    names = run("dmsetup", "ls").stdout.split()[::2]
    return sorted(n for n in names if n.startswith(pool.name + "-") and n != pool.data_linear)


def build(tree: MountedTree) -> dict:
    m = tree.mountpoint
    (m / "work").mkdir()
    (m / "work" / "fs" / "f").write_text("committed data")
    (m / "work").rename(m / "base")
    (m / "base" / "active").mkdir()
    (m / "base" / "active" / "fs" / "g").write_text("active data")
    os.mkdir(m / "base" / "view", 0o555)
    os.listdir(m / "base" / "fs")  # mounts the committed snapshot read-only
    os.setxattr(m / "base", "user.label.k", b"v")
    return tree_state(tree)


def tree_state(tree: MountedTree) -> dict:
    snapshots = json.loads(tree.path(".dmfs", "snapshots.json").read_text())["snapshots"]
    return {s["name"]: (s["kind"], s["parent"], s["labels"]) for s in snapshots}


def check_content(tree: MountedTree) -> None:
    m = tree.mountpoint
    assert (m / "base" / "fs" / "f").read_text() == "committed data"
    assert (m / "base" / "active" / "fs" / "g").read_text() == "active data"
    assert (m / "base" / "view" / "fs" / "f").read_text() == "committed data"


def check_stopped_cleanly(tree: MountedTree, pool: LoopPool) -> None:
    assert not tree.is_mounted()
    assert snapshot_mounts(tree) == []
    assert thin_devices(pool) == []  # every snapshot device deactivated


@pytest.mark.parametrize("how", ["umount", "SIGTERM", "SIGINT"])
def test_stop_unmounts_everything_and_the_next_mount_shows_the_same_tree(
        tree: MountedTree, thin_pool: LoopPool, how: str) -> None:
    before = build(tree)
    assert snapshot_mounts(tree)
    if how == "umount":
        tree.unmount()
    else:
        tree.signal(getattr(signal, how))
    check_stopped_cleanly(tree, thin_pool)
    tree.mount()
    assert tree_state(tree) == before
    check_content(tree)


def test_after_kill_9_the_next_mount_recovers(tree: MountedTree, thin_pool: LoopPool) -> None:
    before = build(tree)
    assert tree.pid is not None
    os.kill(tree.pid, signal.SIGKILL)
    tree.wait_stopped()
    with pytest.raises(OSError) as error:
        os.listdir(tree.mountpoint)
    assert error.value.errno == errno.ENOTCONN
    assert snapshot_mounts(tree)  # left behind, to be adopted
    assert "clearing the mount of a dmfs that died" in tree.mount().stderr
    assert tree_state(tree) == before
    check_content(tree)
    tree.unmount()
    check_stopped_cleanly(tree, thin_pool)


@pytest.fixture
def idle_in_a_second(unmounted_tree: MountedTree) -> MountedTree:
    """The tree mounted with ``idle_timeout = "1s"``."""
    unmounted_tree.config.write_text(
        unmounted_tree.config.read_text().replace('idle_timeout = "1h"', 'idle_timeout = "1s"'))
    unmounted_tree.mount()
    return unmounted_tree


def test_committed_snapshots_unmount_when_idle_but_not_while_used(
        idle_in_a_second: MountedTree) -> None:
    tree = idle_in_a_second
    m = tree.mountpoint
    for name in ("free", "held"):
        (m / f"{name}.w").mkdir()
        (m / f"{name}.w").rename(m / name)
    # Held is used first, so it is idle before free: when free expires, the
    # idle timer has looked at held too and must have found it busy.
    held_path = Path(os.readlink(m / "held" / "fs"))
    held = os.open(held_path, os.O_RDONLY)  # like a shell whose cwd is inside
    free = Path(os.readlink(m / "free" / "fs"))
    try:
        assert {free, held_path} <= set(snapshot_mounts(tree))
        wait_until(lambda: os.getxattr(m / "free", "user.dmfs.state") == b"Deactivated",
                   what="the idle unmount and deactivation")
        assert free not in snapshot_mounts(tree)
        assert held_path in snapshot_mounts(tree)
        assert os.getxattr(m / "held", "user.dmfs.state") == b"Activated"
    finally:
        os.close(held)
    wait_until(lambda: held_path not in snapshot_mounts(tree), what="the second idle unmount")
    assert os.listdir(m / "held" / "fs") == ["lost+found"]  # back on demand


def test_mounts_adopted_after_kill_9_still_unmount_when_idle(
        idle_in_a_second: MountedTree) -> None:
    tree = idle_in_a_second
    m = tree.mountpoint
    (m / "layer.w").mkdir()
    (m / "layer.w").rename(m / "layer")
    committed = Path(os.readlink(m / "layer" / "fs"))  # mounted read-only now
    held = os.open(committed, os.O_RDONLY)  # so the idle timer cannot take it first
    try:
        assert tree.pid is not None
        os.kill(tree.pid, signal.SIGKILL)
        tree.wait_stopped()
    finally:
        os.close(held)
    assert committed in snapshot_mounts(tree)  # left behind
    tree.mount()  # adopts it
    wait_until(lambda: os.getxattr(m / "layer", "user.dmfs.state") == b"Deactivated",
               what="the idle unmount and deactivation of the adopted mount")
    assert committed not in snapshot_mounts(tree)


@pytest.fixture
def mount_helper() -> Iterator[None]:
    """/sbin/mount.fuse.dmfs, the helper mount(8) runs for type fuse.dmfs, as the
    README's installation makes it (the guest's /sbin is thrown away after)."""
    helper = Path("/sbin/mount.fuse.dmfs")
    helper.symlink_to(Path(sys.executable).parent / "dmfs")
    try:
        yield
    finally:
        helper.unlink()


@pytest.mark.usefixtures("mount_helper")
def test_mount_t_fuse_dmfs(unmounted_tree: MountedTree, thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    tree.mountpoint.mkdir()
    subprocess.run(["mount", "-t", "fuse.dmfs", str(tree.config), str(tree.mountpoint),
                    "-o", "nodev,nosuid,idle_timeout=30s"], check=True, capture_output=True)
    tree.pid = int((tree.runtime_dir / "dmfs.pid").read_text())
    entry = next(e for e in fs.mountinfo() if e.mountpoint == tree.mountpoint)
    assert entry.fs_type == "fuse.dmfs" and entry.source == str(tree.config)
    (tree.mountpoint / "x").mkdir()
    tree.unmount()
    check_stopped_cleanly(tree, thin_pool)


@pytest.mark.usefixtures("mount_helper")
def test_fstab_line(unmounted_tree: MountedTree, thin_pool: LoopPool) -> None:
    tree = unmounted_tree
    tree.mountpoint.mkdir()
    line = f"{tree.config} {tree.mountpoint} fuse.dmfs nodev,nosuid,nofail 0 0\n"
    original = Path("/etc/fstab").read_text() if Path("/etc/fstab").exists() else ""
    Path("/etc/fstab").write_text(original + line)  # the guest's overlay: thrown away
    try:
        subprocess.run(["mount", str(tree.mountpoint)], check=True, capture_output=True)
        tree.pid = int((tree.runtime_dir / "dmfs.pid").read_text())
        assert tree.is_mounted()
        tree.unmount()
    finally:
        Path("/etc/fstab").write_text(original)
    check_stopped_cleanly(tree, thin_pool)


def test_mount_refuses_bad_options_and_busy_mountpoints(tree: MountedTree,
                                                        scratch_dir: Path) -> None:
    result = dmfs("mount", str(tree.config), str(scratch_dir / "other"), "-o", "ro",
                  check=False)
    assert result.returncode == 2 and "read-only" in result.stderr
    result = dmfs("mount", str(tree.config), str(tree.mountpoint), check=False)
    assert result.returncode == 3 and "already" in result.stderr.lower()
    # A second daemon on the same pool is refused by the journal lock.
    (scratch_dir / "second").mkdir()
    result = dmfs("mount", str(tree.config), str(scratch_dir / "second"), check=False)
    assert result.returncode != 0 and "in use by another dmfs" in result.stderr
    assert not any(e.mountpoint == scratch_dir / "second" for e in fs.mountinfo())
