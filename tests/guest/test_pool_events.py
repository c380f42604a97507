"""Pool-space events: crossing the low-water mark and running out of space reach
the engine (DM_DEV_ARM_POLL with the ioctl driver, status polling with dmsetup),
its log, and .dmfs/pool."""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import pytest
import trio

from dmfs.config import Config
from dmfs.pool import poolwatch
from dmfs.pool.snapshotter import Snapshotter
from tests.guest.conftest import BASE_IMAGE_SIZE
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, wait_until, write_config

BLOCK = 64 * 1024
DATA_MIB = 48


def write_direct(path: Path, mib: int) -> int:
    """Write ``mib`` MiB with O_DIRECT; the errno that stopped it (0 = all written)."""
    buffer = mmap.mmap(-1, 2**20)
    buffer.write(os.urandom(2**20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, buffer)
    except OSError as error:
        return error.errno or -1
    finally:
        os.close(fd)
    return 0


async def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(30):  # a hang guard
        while not condition():
            await trio.sleep(0.05)


async def test_engine_sees_low_water_and_out_of_space(scratch_dir: Path, driver: str,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The dmsetup driver has no pollable events: it reads the status every
    # POLL_SECONDS; a shorter period only makes the test wait less.
    monkeypatch.setattr(poolwatch, "POLL_SECONDS", 0.5)
    low_water = (DATA_MIB * 2**20 // BLOCK) // 2  # half the pool
    with loop_pool(scratch_dir, data_mib=DATA_MIB, low_water_blocks=low_water) as pool:
        config = Config(pool_name=pool.name, base_image_size=BASE_IMAGE_SIZE,
                        root_path=scratch_dir / "state", runtime_path=scratch_dir / "run",
                        driver=driver)
        caplog.set_level(logging.INFO, logger="dmfs")
        async with Snapshotter.open(config) as engine:
            watch = engine.pool_watch
            assert not watch.low_water_reached and watch.events == 0
            active = await engine.prepare("filler")
            assert active.mountpoint is not None
            target = active.mountpoint / "data"
            assert await trio.to_thread.run_sync(write_direct, target, DATA_MIB // 2 + 2) == 0
            await wait_for(lambda: watch.low_water_reached, "the low-water event")
            assert "is at its low-water mark" in caplog.text
            assert (await engine.pool_info())["low_water"] == "reached"
            err = await trio.to_thread.run_sync(write_direct, active.mountpoint / "more",
                                                DATA_MIB)
            assert err == errno.ENOSPC
            await wait_for(lambda: watch.status is not None
                           and watch.status.mode == "out_of_data_space", "out of space")
            assert "is out of data space" in caplog.text
            await engine.remove("filler")
            await wait_for(lambda: not watch.low_water_reached
                           and watch.status is not None and watch.status.mode == "rw",
                           "the pool's recovery")
            assert "writable again" in caplog.text
            assert watch.events >= 4


def test_low_water_shows_in_the_tree(scratch_dir: Path) -> None:
    low_water = (DATA_MIB * 2**20 // BLOCK) // 2
    with loop_pool(scratch_dir, data_mib=DATA_MIB, low_water_blocks=low_water) as pool:
        tree = MountedTree(write_config(scratch_dir, pool.name), scratch_dir / "mnt",
                           scratch_dir / "run")
        try:
            tree.mount()
            status = tree.path(".dmfs", "pool")
            assert "low_water: ok" in status.read_text()
            assert f"low_water_blocks: {low_water}" in status.read_text()
            (tree.mountpoint / "filler").mkdir()
            assert write_direct(tree.path("filler", "fs", "data"), DATA_MIB // 2 + 2) == 0
            wait_until(lambda: "low_water: reached" in status.read_text(),
                       what="low_water: reached in .dmfs/pool")
            assert "is at its low-water mark" in tree.log()
            tree.unmount()
        finally:
            tree.cleanup()
