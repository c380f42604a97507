"""Kernel-cached fs links and the round trips of `ls -l` (issue 12).

With contrib/pyfuse3's build the kernel caches each node's fs link: many path
walks make one READLINK, and every change of a snapshot's mount (commit, idle
expiry, remove) makes the kernel ask again.  The counts are the daemon's own
(``fuse_requests`` in .dmfs/pool), never timings.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from dmfs.fuse import linkcache
from dmfs.pool import fs
from dmfs.pool.snapshotter import Snapshotter
from tests.support.tree import MountedTree, dmfs, errno_of, wait_until

pytestmark = pytest.mark.no_udev_only  # nothing here depends on who makes device nodes

needs_link_cache = pytest.mark.skipif(
    not linkcache.PYFUSE3_CAN_ASK,
    reason="stock pyfuse3 cannot ask the kernel to cache symlinks (contrib/install builds "
           "the one in contrib/pyfuse3)")
WALKS = 200
STOCK = "tests.support.stock_pyfuse3"
SLOW_WARNING = "path lookups through M/<node>/fs are slow"


def readlinks(tree: MountedTree) -> int:
    return tree.requests().get("readlink", 0)


def snapshot_mounts(tree: MountedTree) -> set[Path]:
    return {e.mountpoint for e in fs.mountinfo()
            if e.mountpoint.parent == tree.runtime_dir / "snapshots"}


def fs_links_status(tree: MountedTree) -> dict:
    return json.loads(dmfs("status", str(tree.config), "--json").stdout)["fs_links"]


@needs_link_cache
def test_path_walks_through_fs_make_one_readlink(tree: MountedTree) -> None:
    m = tree.mountpoint
    (m / "a").mkdir()
    (m / "a" / "fs" / "f").write_text("x")
    link = m / "a" / "fs"
    assert os.lstat(link).st_size == len(os.readlink(link))  # older kernels cut it there
    before = readlinks(tree)
    for _ in range(WALKS):
        os.stat(m / "a" / "fs" / "f")
    assert readlinks(tree) - before <= 1
    assert tree.pool_lines()["fs_links"] == "cached by the kernel"
    assert fs_links_status(tree)["cached"] is True
    assert SLOW_WARNING not in tree.log()


def test_with_stock_pyfuse3_each_walk_is_a_readlink_and_dmfs_says_so(
        unmounted_tree: MountedTree) -> None:
    tree = unmounted_tree
    tree.mount(module=STOCK)
    m = tree.mountpoint
    (m / "a").mkdir()
    (m / "a" / "fs" / "f").write_text("x")
    before = readlinks(tree)
    for _ in range(WALKS):
        os.stat(m / "a" / "fs" / "f")
    assert readlinks(tree) - before >= WALKS  # what the cached case saves
    warnings = [line for line in tree.log().splitlines() if SLOW_WARNING in line]
    assert len(warnings) == 1 and "cannot ask the kernel to cache symlinks" in warnings[0]
    assert tree.pool_lines()["fs_links"].startswith("not cached by the kernel (pyfuse3 ")
    assert fs_links_status(tree)["cached"] is False
    assert "fs links    not cached by the kernel" in dmfs("status", str(tree.config)).stdout
    tree.unmount()
    assert not (tree.runtime_dir / linkcache.STATE_FILE).exists()
    assert fs_links_status(tree)["cached"] is None  # no daemon: what pyfuse3 could do


@needs_link_cache
def test_commit_and_idle_expiry_make_the_kernel_ask_again(unmounted_tree: MountedTree) -> None:
    tree = unmounted_tree
    tree.config.write_text(
        tree.config.read_text().replace('idle_timeout = "1h"', 'idle_timeout = "2s"'))
    tree.mount()
    m = tree.mountpoint
    (m / "w").mkdir()
    (m / "w" / "fs" / "f").write_text("data")  # the link is cached: the read-write mount
    target = Path(os.readlink(m / "w" / "fs"))
    (m / "w").rename(m / "c")  # commit unmounts it
    assert (m / "c" / "fs" / "f").read_text() == "data"  # mounted read-only on demand
    before = readlinks(tree)
    os.stat(m / "c" / "fs" / "f")
    assert readlinks(tree) == before  # cached again
    wait_until(lambda: target not in snapshot_mounts(tree), what="the idle unmount")
    assert not target.exists()  # a stale target would find nothing, not an empty directory
    assert sorted(os.listdir(m / "c" / "fs")) == ["f", "lost+found"]
    assert readlinks(tree) == before + 1  # expiry dropped the kernel's copy
    assert target in snapshot_mounts(tree)


def test_a_removed_and_recreated_name_shows_the_new_snapshots_files(tree: MountedTree) -> None:
    m = tree.mountpoint
    (m / "n").mkdir()
    (m / "n" / "fs" / "old").write_text("old")
    old_target = os.readlink(m / "n" / "fs")
    node = os.open(m / "n", os.O_RDONLY | os.O_DIRECTORY)  # like a shell whose cwd is there
    try:
        (m / "n").rmdir()
        (m / "n").mkdir()
        (m / "n" / "fs" / "new").write_text("new")
        # The device id was reused, so the target path is the same as before.
        assert os.readlink(m / "n" / "fs") == old_target
        assert sorted(os.listdir(m / "n" / "fs")) == ["lost+found", "new"]
        assert errno_of(lambda: os.stat("fs/new", dir_fd=node)) == errno.ENOENT
    finally:
        os.close(node)


def test_ls_l_of_a_node_makes_no_request_per_entry(tree: MountedTree) -> None:
    children = 40
    m = tree.mountpoint
    (m / "p.w").mkdir()
    (m / "p.w").rename(m / "p")
    for i in range(children):
        os.mkdir(m / "p" / f"v{i:02d}", 0o555)

    def ls_l() -> tuple[list[str], dict[str, int]]:
        before = tree.requests()
        out = subprocess.run(["ls", "-l", str(m / "p")], check=True, capture_output=True,
                             text=True).stdout.splitlines()
        after = tree.requests()
        return out, {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}

    baseline = tree.requests()  # reading .dmfs/pool costs requests of its own
    overhead = {k: v - baseline.get(k, 0) for k, v in tree.requests().items()}
    for _ in ("first", "again"):
        lines, made = ls_l()
        assert len(lines) == 2 + children  # "total", fs, the children
        assert lines[1].startswith("lrwxrwxrwx") and " fs -> " in lines[1]
        per_entry = {k: n - overhead.get(k, 0) for k, n in made.items()
                     if k not in ("readdir", "readlink")}
        # getxattr: security.selinux and one ACL name once each, then ls knows (ENOTSUP)
        assert sum(per_entry.values()) <= 6, made
    assert os.getxattr(m / "p", "user.dmfs.kind") == b"committed"  # user.* as documented
    assert errno_of(lambda: os.getxattr(m / "p", "security.selinux")) == errno.ENOTSUP
    assert errno_of(lambda: os.getxattr(m / "p", "user.label.none")) == errno.ENODATA


@pytest.mark.udev_default_driver_only
async def test_idle_unmount_awaits_the_front_ends_hook_and_yields_to_a_use(
        engine: Snapshotter) -> None:
    """The engine side of expiry: the hook runs first (a path walk during it
    is answered and keeps the mount); a walk during the unmount itself waits
    and finds the snapshot mounted again."""
    await engine.prepare("w")
    info = await engine.commit("c", "w")
    path = await engine.mountpoint("c")
    hooked: list[int] = []

    async def used_during_hook(device_id: int) -> None:
        hooked.append(device_id)
        assert await engine.mountpoint("c") == path  # answered at once, no deadlock

    engine.before_unmount = used_during_hook
    assert await engine.expire_idle() == 0
    assert path.is_mount() and hooked == [info.device_id]

    walked: list[Path] = []

    async def walk_during_unmount() -> None:
        with trio.fail_after(30):
            while not engine.mounts.get(info.device_id).unmounting:
                await trio.sleep(0)
            walked.append(await engine.mountpoint("c"))

    async def start_walk(device_id: int) -> None:
        nursery.start_soon(walk_during_unmount)

    async with trio.open_nursery() as nursery:
        engine.before_unmount = start_walk
        assert await engine.expire_idle() == 1
    assert walked == [path] and path.is_mount()  # mounted again after the unmount
