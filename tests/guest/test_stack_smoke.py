"""Smoke test of every real part dmfs stands on, in the guest.

dm-thin (create_thin, create_snap with the origin suspended, delete, status),
ext4 on thin devices with copy-on-write both ways, a pyfuse3 + trio mount, and
device events through pyudev in a trio loop.  Runs with and without udevd.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from dmfs.pool.status import parse_pool_status, parse_thin_status
from dmfs.pool.udev import DmEventMonitor, udevd_running
from tests.support.loop_pool import LoopPool, run
from tests.support.tree import hellofs_mounted

THIN_SECTORS = 128 * 2**20 // 512  # 128 MiB virtual size


def activate(pool: LoopPool, name: str, device_id: int) -> str:
    run("dmsetup", "create", name, "--table", f"0 {THIN_SECTORS} thin {pool.device} {device_id}")
    return f"/dev/mapper/{name}"


def thin_status(name: str):
    _start, _length, target, params = run("dmsetup", "status", name).stdout.split(maxsplit=3)
    assert target == "thin"
    return parse_thin_status(params)


def test_thin_snapshot_copy_on_write_both_ways(thin_pool: LoopPool, scratch_dir: Path) -> None:
    thin_pool.message("create_thin 0")
    origin = activate(thin_pool, "smoke-origin", 0)
    assert thin_status("smoke-origin").mapped_sectors == 0
    run("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1", origin)
    origin_mnt = scratch_dir / "origin"
    origin_mnt.mkdir()
    run("mount", origin, str(origin_mnt))
    (origin_mnt / "shared.txt").write_text("before the snapshot\n")
    run("sync", "-f", str(origin_mnt))

    # The kernel requires an active origin to be suspended around create_snap.
    run("dmsetup", "suspend", "smoke-origin")
    try:
        thin_pool.message("create_snap 1 0")
    finally:
        run("dmsetup", "resume", "smoke-origin")

    snap = activate(thin_pool, "smoke-snap", 1)
    snap_mnt = scratch_dir / "snap"
    snap_mnt.mkdir()
    run("mount", snap, str(snap_mnt))
    assert (snap_mnt / "shared.txt").read_text() == "before the snapshot\n"

    (origin_mnt / "shared.txt").write_text("changed in the origin\n")
    (snap_mnt / "only-in-snap.txt").write_text("written in the snapshot\n")
    (snap_mnt / "shared.txt").unlink()
    run("sync")
    assert (origin_mnt / "shared.txt").read_text() == "changed in the origin\n"
    assert not (origin_mnt / "only-in-snap.txt").exists()
    assert not (snap_mnt / "shared.txt").exists()
    assert (snap_mnt / "only-in-snap.txt").read_text() == "written in the snapshot\n"
    assert thin_status("smoke-snap").mapped_sectors > 0

    run("umount", str(snap_mnt))
    run("dmsetup", "remove", "smoke-snap")
    # Unmounted, the origin cannot allocate blocks behind the test's back
    # (ext4lazyinit zeroes inode tables in the background while mounted).
    run("umount", str(origin_mnt))
    used_before = parse_pool_status(thin_pool.status_params()).used_data_blocks
    thin_pool.message("delete 1")
    used_after = parse_pool_status(thin_pool.status_params()).used_data_blocks
    assert used_after < used_before, "deleting the snapshot freed no data blocks"
    # A deleted id is really gone: creating a thin on it again works.
    thin_pool.message("create_thin 1")


def test_pool_status_line_parses(thin_pool: LoopPool) -> None:
    status = parse_pool_status(thin_pool.status_params())
    assert status.mode == "rw"
    assert status.error_if_no_space
    assert not status.needs_check
    assert status.total_data_blocks == thin_pool.total_data_blocks
    assert status.used_data_blocks == 0
    assert 0 < status.used_metadata_blocks < status.total_metadata_blocks

    thin_pool.message("set_transaction_id 0 7")
    thin_pool.message("create_thin 3")
    status = parse_pool_status(thin_pool.status_params())
    assert status.transaction_id == 7
    run("dmsetup", "create", "smoke-fill", "--table",
        f"0 {THIN_SECTORS} thin {thin_pool.device} 3")
    run("dd", "if=/dev/zero", "of=/dev/mapper/smoke-fill", "bs=1M", "count=4", "oflag=direct")
    assert parse_pool_status(thin_pool.status_params()).used_data_blocks == (
        4 * 2**20 // (thin_pool.block_sectors * 512))


def test_pyfuse3_trio_filesystem_mounts_and_reads(scratch_dir: Path) -> None:
    mountpoint = scratch_dir / "hello"
    with hellofs_mounted(mountpoint) as fs:
        assert os.listdir(mountpoint) == ["hello"]
        assert (mountpoint / "hello").read_text() == (
            "hello from a pyfuse3 + trio filesystem\n")
        run("umount", str(mountpoint))
        assert fs.wait(timeout=30) == 0


async def test_dm_device_events_reach_trio_through_pyudev(thin_pool: LoopPool) -> None:
    thin_pool.message("create_thin 5")
    expected_source = "udev" if udevd_running() else "kernel"
    assert udevd_running() == (os.environ.get("DMFS_GUEST_UDEV", "0") == "1")

    with DmEventMonitor() as monitor, trio.fail_after(30):
        assert monitor.source == expected_source
        events = monitor.events()
        await trio.to_thread.run_sync(activate, thin_pool, "smoke-events", 5)
        st = os.stat("/dev/mapper/smoke-events")
        devnum = (os.major(st.st_rdev), os.minor(st.st_rdev))
        async for event in events:
            if event.devnum == devnum and event.action == "add":
                assert event.name == "smoke-events"
                break
        await trio.to_thread.run_sync(run, "dmsetup", "remove", "smoke-events")
        async for event in events:
            if event.devnum == devnum and event.action == "remove":
                assert event.name == "smoke-events"
                break
