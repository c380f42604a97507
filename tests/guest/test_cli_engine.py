"""dmfs status / tree / check / demo against real pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmfs.config import load_config
from dmfs.pool.snapshotter import Snapshotter
from tests.support.engine_op import config_to_json
from tests.support.loop_pool import LoopPool, loop_pool, run
from tests.support.tree import MountedTree, dmfs, write_config

ENGINE_OP = Path(__file__).resolve().parents[1] / "support" / "engine_op.py"


async def build_known_tree(config_path: Path) -> None:
    """base (committed, with data) -> {work (active), look (view)}; other (active)."""
    async with Snapshotter.open(load_config(config_path)) as engine:
        info = await engine.prepare("tmp")
        assert info.mountpoint is not None
        with open(info.mountpoint / "data", "wb") as f:
            f.write(os.urandom(2 * 2**20))
            os.fsync(f.fileno())
        await engine.commit("base", "tmp")
        await engine.prepare("work", "base", labels={"team": "web"})
        await engine.view("look", "base")
        await engine.prepare("other")


async def test_status_of_a_known_tree(tree_config: Path) -> None:
    await build_known_tree(tree_config)
    data = json.loads(dmfs("status", str(tree_config), "--json").stdout)
    assert data["snapshots"] == {"active": 2, "view": 1, "committed": 1}
    assert data["mode"] == "rw" and data["faulty_devices"] == [] and not data["served"]
    assert data["low_water"] == {"blocks": 0, "state": "ok"}
    assert 0 < data["data"]["used_bytes"] < data["data"]["total_bytes"]
    assert data["problems"] == []
    text = dmfs("status", str(tree_config)).stdout
    assert "snapshots   4: 2 active, 1 view, 1 committed" in text
    assert "daemon      not running" in text


async def test_status_while_served_and_low_water(scratch_dir: Path) -> None:
    with loop_pool(scratch_dir, data_mib=64, low_water_blocks=1000) as pool:
        tree = MountedTree(write_config(scratch_dir, pool.name), scratch_dir / "mnt",
                           scratch_dir / "run")
        try:
            tree.mount()
            data = json.loads(dmfs("status", str(tree.config), "--json").stdout)
            assert data["served"] and data["low_water"] == {"blocks": 1000, "state": "reached"}
            assert "low-water mark 1000 blocks: REACHED" in dmfs("status",
                                                                 str(tree.config)).stdout
        finally:
            tree.cleanup()


async def test_tree_text_json_and_dot(tree_config: Path) -> None:
    await build_known_tree(tree_config)
    lines = dmfs("tree", str(tree_config)).stdout.splitlines()
    assert [line.split("  (")[0] for line in lines] == [
        "base", "├── look", "└── work", "other"]
    assert lines[0].startswith("base  (committed, Deactivated, 2")
    nested = json.loads(dmfs("tree", str(tree_config), "--json").stdout)["snapshots"]
    base = nested[0]
    assert (base["name"], base["kind"]) == ("base", "committed")
    assert base["usage"] >= 2 * 2**20 and base["exclusive"] is not None
    assert [c["name"] for c in base["children"]] == ["look", "work"]
    assert base["children"][1]["labels"] == {"team": "web"}
    assert base["children"][1]["usage"] == 0
    dot = dmfs("tree", str(tree_config), "--dot").stdout
    assert dot.startswith("digraph") and '"base" -> "work";' in dot
    assert '"look" [label="look\\nview' in dot


async def test_check_reports_divergence_and_repairs_it(tree_config: Path,
                                                      thin_pool: LoopPool) -> None:
    await build_known_tree(tree_config)
    config = load_config(tree_config)
    assert dmfs("check", str(tree_config)).returncode == 0
    # An interrupted prepare (killed after create_snap), a stray device named
    # like dmfs's, and a thin device dmfs never made.
    subprocess.run([sys.executable, str(ENGINE_OP), config_to_json(config), "prepare", "cut"],
                   env={**os.environ, "DMFS_FAILPOINT": "prepare:after-create-snap"},
                   check=False, capture_output=True)
    thin_pool.message("create_thin 4242")
    run("dmsetup", "create", f"{thin_pool.name}-snap-4242", "--table",
        f"0 2048 thin {thin_pool.device} 4242")
    thin_pool.message("create_thin 4243")  # foreign, and not active
    result = dmfs("check", str(tree_config), "--json", check=False)
    assert result.returncode == 1
    findings = {f["kind"] for f in json.loads(result.stdout)["findings"]}
    assert {"interrupted", "stray-device", "foreign"} <= findings
    repaired = dmfs("check", str(tree_config), "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired  thin device" in repaired.stdout
    assert "journal and pool agree" in repaired.stdout
    after = json.loads(dmfs("check", str(tree_config), "--json").stdout)
    assert [f["kind"] for f in after["findings"]] == ["foreign"]  # left alone
    live = run("dmsetup", "ls").stdout
    assert f"{thin_pool.name}-snap-4242" not in live


async def test_check_marks_a_lost_device_faulty_and_it_can_be_removed(
        tree_config: Path, thin_pool: LoopPool) -> None:
    await build_known_tree(tree_config)
    config = load_config(tree_config)
    async with Snapshotter.open(config) as engine:
        lost = (await engine.stat("other")).device_id
    thin_pool.message(f"delete {lost}")  # behind dmfs's back
    result = dmfs("check", str(tree_config), check=False)
    assert result.returncode == 1 and f"thin device {lost} (snapshot 'other') is missing" in (
        result.stdout)
    dmfs("check", str(tree_config), "--repair", check=False)
    data = json.loads(dmfs("status", str(tree_config), "--json").stdout)
    assert data["faulty_devices"] == [lost]
    async with Snapshotter.open(config) as engine:
        await engine.remove("other")  # a Faulty snapshot can still be removed
    assert dmfs("check", str(tree_config)).returncode == 0


def test_check_repair_refuses_while_served(tree: MountedTree, thin_pool: LoopPool) -> None:
    (tree.mountpoint / "x").mkdir()
    assert dmfs("check", str(tree.config)).returncode == 0
    thin_pool.message("create_thin 4242")
    run("dmsetup", "create", f"{thin_pool.name}-snap-4242", "--table",
        f"0 2048 thin {thin_pool.device} 4242")
    result = dmfs("check", str(tree.config), "--repair", check=False)
    assert result.returncode == 1 and "a dmfs daemon serves this pool" in result.stderr
    assert f"{thin_pool.name}-snap-4242" in run("dmsetup", "ls").stdout
    run("dmsetup", "remove", f"{thin_pool.name}-snap-4242")


@pytest.mark.usefixtures("scratch_dir")
def test_demo_end_to_end() -> None:
    before_pools = run("dmsetup", "ls").stdout
    before_loops = run("losetup", "-a").stdout
    result = dmfs("demo", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in ("$ mkdir base", "$ mv base base-v1", "release 2",
                     "(refused, as it should be)", "user.label.owner=\"demo\"",
                     "base-v1  (committed", "The demo went as it should"):
        assert expected in out, expected
    assert run("dmsetup", "ls").stdout == before_pools
    assert run("losetup", "-a").stdout == before_loops
    assert not [e for e in Path("/proc/self/mountinfo").read_text().splitlines()
                if "dmfs-demo" in e]
