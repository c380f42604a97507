"""The environment checks against the real kernel: what passes, and the mountpoint errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmfs.cli.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_fuse,
    require_mountpoint,
    require_thin_pool,
)
from dmfs.pool.dmsetup import DmsetupDriver
from tests.support.loop_pool import LoopPool, run
from tests.support.tree import hellofs_mounted

pytestmark = pytest.mark.no_udev_only


def test_a_ready_kernel_passes_without_loading_anything() -> None:
    def refuse(module: str) -> bool:
        raise AssertionError(f"modprobe {module} was tried although dm-thin is there")

    require_device_mapper(load_module=refuse)
    require_fuse()
    assert isinstance(open_device_mapper("dmsetup"), DmsetupDriver)


def test_require_thin_pool_accepts_a_real_pool(thin_pool: LoopPool) -> None:
    target = require_thin_pool(DmsetupDriver(), thin_pool.name)
    assert target.target_type == "thin-pool"
    assert target.length == thin_pool.data_sectors


def test_mountpoint_with_something_mounted_is_busy(scratch_dir: Path) -> None:
    mountpoint = scratch_dir / "busy"
    mountpoint.mkdir()
    run("mount", "-t", "tmpfs", "dmfs-test-tmpfs", str(mountpoint))
    try:
        with pytest.raises(EnvironmentProblem, match=rf"^mountpoint {mountpoint} is busy: "
                                                     rf"dmfs-test-tmpfs \(tmpfs\) is already "
                                                     rf"mounted there"):
            require_mountpoint(mountpoint)
    finally:
        run("umount", str(mountpoint))
    assert require_mountpoint(mountpoint) == mountpoint


def test_stale_fuse_mount_says_how_to_clear_it(scratch_dir: Path) -> None:
    mountpoint = scratch_dir / "stale"
    with hellofs_mounted(mountpoint) as fs:
        fs.kill()
        fs.wait()
        with pytest.raises(EnvironmentProblem,
                           match=rf"^mountpoint {mountpoint} is a stale FUSE mount whose daemon "
                                 rf"is gone: clear it with `umount -l {mountpoint}`$"):
            require_mountpoint(mountpoint)
