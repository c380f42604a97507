"""Crash safety: SIGKILL at every step of prepare, commit, remove and base creation.

Each case runs one operation in a child process with ``DMFS_FAILPOINT`` set,
so the child dies at that step (tests/support/engine_op.py); then the engine
restarts twice.  After the first restart: no committed snapshot is lost, the
pool holds exactly the thin devices the journal knows, live devices and
mounts are exactly those of the snapshots that should have them, and the key
can be used again.  The second restart must find nothing to change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.drivers import DRIVERS as DRIVER_NAMES
from dmfs.pool.failpoints import FAILPOINTS
from dmfs.pool.metadata import Kind
from dmfs.pool.snapshotter import Snapshotter
from tests.guest.conftest import DRIVERS
from tests.support.engine_op import config_to_json

pytestmark = pytest.mark.udev_default_driver_only

ENGINE_OP = Path(__file__).resolve().parents[1] / "support" / "engine_op.py"


def run_op_until_failpoint(config: Config, failpoint: str, *op: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ENGINE_OP), config_to_json(config), *op],
        env=dict(os.environ, DMFS_FAILPOINT=failpoint), capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, (
        f"failpoint {failpoint} was not reached (exit {result.returncode}):\n{result.stderr}")


async def observe(engine: Snapshotter) -> dict:
    """Everything a restart could change, in comparable form."""
    pool_ids = set(await trio.to_thread.run_sync(engine.pool.thin_usage))
    live = {name for name in await trio.to_thread.run_sync(engine.pool.live_devices)
            if name.startswith(engine.config.pool_name + "-")}
    mounts = {entry.mountpoint.name for entry in fs.mounts_under(engine.mount_dir).values()}
    return {"meta": engine.meta.dump(), "pool_ids": pool_ids, "live": live, "mounts": mounts}


def check_consistent(engine: Snapshotter, seen: dict) -> None:
    meta = engine.meta
    assert seen["pool_ids"] == set(meta.devices), "pool and journal disagree on thin ids"
    in_use = {meta.base_id} | {s.device_id for s in meta.snapshots.values()}
    assert set(meta.devices) == in_use, "the journal keeps devices no snapshot uses"
    for snapshot in meta.snapshots.values():
        device = meta.devices[snapshot.device_id]
        assert snapshot.pending is None
        if snapshot.kind is Kind.ACTIVE:
            assert device.name in seen["live"], f"active {snapshot.key} is not live"
            assert str(device.id) in seen["mounts"], f"active {snapshot.key} is not mounted"
    allowed_live = {meta.devices[s.device_id].name for s in meta.snapshots.values()
                    if s.kind is Kind.ACTIVE}
    assert seen["live"] <= allowed_live, f"unexpected live devices {seen['live']}"


async def restart_twice(config: Config) -> None:
    async with Snapshotter.open(config) as engine:
        first = await observe(engine)
        check_consistent(engine, first)
    async with Snapshotter.open(config) as engine:
        assert await observe(engine) == first, "the second restart changed something"


async def file_in(engine: Snapshotter, key: str, name: str) -> str:
    return (await engine.mountpoint(key) / name).read_text()


async def setup_layers(config: Config) -> None:
    """A committed layer ``l1`` and an active ``work`` on it, each with a file."""
    async with Snapshotter.open(config) as engine:
        layer = await engine.prepare("tmp")
        assert layer.mountpoint is not None
        (layer.mountpoint / "f1").write_text("layer one")
        await engine.commit("l1", "tmp")
        work = await engine.prepare("work", "l1")
        assert work.mountpoint is not None
        (work.mountpoint / "f2").write_text("work in progress")


def failpoints(prefix: str) -> list[str]:
    return [name for name in FAILPOINTS if name.startswith(prefix)]


#: The cases that also run on xfs (default driver only): per operation, the step where
#: a filesystem has just been mounted, unmounted or made when the process dies.
XFS_FAILPOINTS = ("prepare:after-mount", "commit:after-unmount", "remove:after-unmount",
                  "base:after-mkfs")


def cases(prefix: str) -> list:  # type: ignore[type-arg]
    """(failpoint, fs_type, driver): every failpoint on ext4 with the default driver,
    every other one with the dmsetup driver as well, and the basic ones of
    XFS_FAILPOINTS on xfs.

    Where the process dies is the engine's; the driver only carries out the dm
    calls before it and the restart's, so half of the failpoints (alternating,
    each operation's first step included) show the dmsetup driver's side: its
    turn of all of them was 140 s of the guest tier, the longer of the two."""
    names = failpoints(prefix)
    return ([pytest.param(name, "ext4", driver, id=f"{driver}-{name}")
             for index, name in enumerate(names) for driver in DRIVERS
             if driver == DEFAULT_DRIVER or index % 2 == 0]
            + [pytest.param(name, "xfs", DEFAULT_DRIVER, id=f"xfs-{name}")
               for name in names if name in XFS_FAILPOINTS])


CASE_NAMES = ("failpoint", "fs_type", "driver")
DEFAULT_DRIVER = DRIVER_NAMES[0]


@pytest.mark.parametrize(CASE_NAMES, cases("prepare:"))
async def test_killed_during_prepare(engine_config: Config, failpoint: str) -> None:
    await setup_layers(engine_config)
    run_op_until_failpoint(engine_config, failpoint, "prepare", "new", "l1")
    await restart_twice(engine_config)
    async with Snapshotter.open(engine_config) as engine:
        assert await file_in(engine, "l1", "f1") == "layer one"
        assert await file_in(engine, "work", "f2") == "work in progress"
        if engine.get("new") is None:
            await engine.prepare("new", "l1")
        assert await file_in(engine, "new", "f1") == "layer one"
        assert (await engine.stat("new")).kind is Kind.ACTIVE


@pytest.mark.parametrize(CASE_NAMES, cases("commit:"))
async def test_killed_during_commit(engine_config: Config, failpoint: str) -> None:
    await setup_layers(engine_config)
    run_op_until_failpoint(engine_config, failpoint, "commit", "l2", "work")
    await restart_twice(engine_config)
    async with Snapshotter.open(engine_config) as engine:
        assert await file_in(engine, "l1", "f1") == "layer one"
        committed = engine.get("l2")
        if committed is None:  # rolled back: still active, and committing again works
            assert (await engine.stat("work")).kind is Kind.ACTIVE
            assert await file_in(engine, "work", "f2") == "work in progress"
            await engine.commit("l2", "work")
        else:
            assert engine.get("work") is None
        assert (await engine.stat("l2")).kind is Kind.COMMITTED
        assert await file_in(engine, "l2", "f2") == "work in progress"


@pytest.mark.parametrize(CASE_NAMES, cases("remove:"))
async def test_killed_during_remove(engine_config: Config, failpoint: str) -> None:
    await setup_layers(engine_config)
    run_op_until_failpoint(engine_config, failpoint, "remove", "work")
    await restart_twice(engine_config)
    async with Snapshotter.open(engine_config) as engine:
        assert await file_in(engine, "l1", "f1") == "layer one"
        if engine.get("work") is not None:  # killed before the remove was recorded
            assert await file_in(engine, "work", "f2") == "work in progress"
            await engine.remove("work")
        await engine.prepare("work", "l1")
        assert await file_in(engine, "work", "f1") == "layer one"
        assert not (await engine.mountpoint("work") / "f2").exists()


@pytest.mark.parametrize(CASE_NAMES, cases("base:"))
async def test_killed_while_making_the_base_device(engine_config: Config,
                                                   failpoint: str) -> None:
    run_op_until_failpoint(engine_config, failpoint, "open")
    await restart_twice(engine_config)
    async with Snapshotter.open(engine_config) as engine:
        info = await engine.prepare("first")
        assert info.mountpoint is not None
        made_by_mkfs = {"ext4": ["lost+found"], "xfs": []}[engine_config.fs_type]
        assert sorted(os.listdir(info.mountpoint)) == made_by_mkfs
