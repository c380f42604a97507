"""A full pool (error_if_no_space): writes fail with ENOSPC at once, the engine
stays up, and after a remove the pool is usable again."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import trio

from dmfs.config import Config
from dmfs.pool.errors import NoSpace
from dmfs.pool.snapshotter import Snapshotter
from tests.guest.conftest import BASE_IMAGE_SIZE
from tests.support.loop_pool import loop_pool

CHUNK = 2**20


def fill(path: Path, limit: int) -> int:
    """Write 1 MiB direct-I/O chunks until the pool refuses; return the errno."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(CHUNK))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for _ in range(limit):
            os.write(fd, buffer)
    except OSError as error:
        return error.errno or 0
    finally:
        os.close(fd)
    return 0


async def test_full_pool_fails_fast_and_recovers(scratch_dir: Path, driver: str) -> None:
    with loop_pool(scratch_dir, data_mib=40) as pool:
        config = Config(pool_name=pool.name, base_image_size=BASE_IMAGE_SIZE,
                        root_path=scratch_dir / "state", runtime_path=scratch_dir / "run",
                        driver=driver)
        async with Snapshotter.open(config) as engine:
            keep = await engine.prepare("keep")
            assert keep.mountpoint is not None
            (keep.mountpoint / "kept").write_text("still here")
            hog = await engine.prepare("hog")
            assert hog.mountpoint is not None
            with trio.fail_after(60):  # a hang guard, not a speed check
                err = await trio.to_thread.run_sync(fill, hog.mountpoint / "big", 200)
            assert err == errno.ENOSPC, f"expected ENOSPC, got {errno.errorcode.get(err, err)}"
            status = await engine.pool_status()
            assert status.mode == "out_of_data_space"
            assert status.free_data_blocks == 0
            # The engine is up: reads work, new snapshots are refused with NoSpace.
            assert (await engine.stat("keep")).mountpoint == keep.mountpoint
            with pytest.raises(NoSpace):
                await engine.prepare("refused")
            await engine.remove("hog")
            status = await engine.pool_status()
            assert status.mode == "rw" and status.free_data_blocks > 0
            fresh = await engine.prepare("fresh")
            assert fresh.mountpoint is not None
            assert await trio.to_thread.run_sync(fill, fresh.mountpoint / "ok", 4) == 0
            assert (keep.mountpoint / "kept").read_text() == "still here"
