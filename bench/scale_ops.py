"""Benchmark: dmfs with 10,000 snapshots against dmfs with 10, in one run.

Run in the test guest (it needs dm-thin), e.g.::

    contrib/guest/run -- .venv/bin/python bench/scale_ops.py --snapshots 10000

On a fresh loop-backed pool it builds a committed ``base`` and, under it,
views (the cheapest kind: no activation) until the pool holds the requested
number of snapshots, through the engine API (building through the mount would
measure the build, not the result).  At 10 snapshots and again at the full
count it measures, through a real ``dmfs mount``:

- daemon start: ``dmfs mount`` until it returns (journal replay, the thin_ls of
  reconciliation, the FUSE mount), and the engine's own open alone;
- the daemon's resident memory (VmRSS) after start and after the listings;
- mkdir / mv (commit) / rmdir latency (p50 of a few cycles);
- ``cat .dmfs/snapshots.json``; readdir of ``base`` (its children) cold and warm.

The issue's targets are printed beside the figures: start <= 2 s, RSS <= 150 MB,
mkdir/mv/rmdir at the full count within 1.2x of the figures at 10,
snapshots.json <= 300 ms, a warm readdir of 10,000 children <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmfs.config import load_config
from dmfs.pool import Snapshotter
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, write_config

CYCLES = 9


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def grow(config_path: Path, total: int) -> float:
    """Add views under base until the pool holds ``total`` snapshots; the time
    the engine's open took (replay + reconcile + base check)."""
    config = load_config(config_path)
    start = time.perf_counter()
    async with Snapshotter.open(config) as engine:
        opened = time.perf_counter() - start
        if engine.get("base") is None:
            work = await engine.prepare("base.work")
            assert work.mountpoint is not None
            (work.mountpoint / "file").write_text("in base")
            await engine.commit("base", "base.work")
        count = len(engine.meta.snapshots)
        while count < total:
            await engine.view(f"v{count:05d}", "base")
            count += 1
    return opened


def time_call(call) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(tree: MountedTree, label: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    started = time.perf_counter()
    tree.mount()
    figures["start"] = time.perf_counter() - started
    assert tree.pid is not None
    figures["rss_start"] = rss_mb(tree.pid)
    m = tree.mountpoint
    mkdirs, mvs, rmdirs = [], [], []
    for i in range(CYCLES):
        work, done = m / f"bench{i}.w", m / f"bench{i}"
        mkdirs.append(time_call(work.mkdir))
        mvs.append(time_call(lambda w=work, d=done: w.rename(d)))
        rmdirs.append(time_call(done.rmdir))
    figures["mkdir"] = statistics.median(mkdirs)
    figures["mv"] = statistics.median(mvs)
    figures["rmdir"] = statistics.median(rmdirs)
    figures["snapshots_json"] = min(time_call(lambda: (m / ".dmfs" / "snapshots.json")
                                              .read_bytes()) for _ in range(3))
    figures["readdir_cold"] = time_call(lambda: os.listdir(m / "base"))
    figures["readdir_warm"] = min(time_call(lambda: os.listdir(m / "base")) for _ in range(3))
    figures["rss_end"] = rss_mb(tree.pid)
    tree.unmount()
    print(f"-- {label}")
    for key, value in figures.items():
        print(f"   {key:<15} {value:8.1f} MB" if key.startswith("rss")
              else f"   {key:<15} {ms(value)}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        with loop_pool(work, data_mib=2048, metadata_mib=512) as pool:
            config = write_config(work, pool.name)
            tree = MountedTree(config, work / "mnt", work / "run")
            try:
                small_open = trio.run(grow, config, 10)
                small = measure(tree, "10 snapshots")
                build = time.perf_counter()
                trio.run(grow, config, args.snapshots)
                print(f"-- built {args.snapshots} snapshots in "
                      f"{time.perf_counter() - build:.0f} s")
                big_open = trio.run(grow, config, args.snapshots)
                big = measure(tree, f"{args.snapshots} snapshots")
            finally:
                tree.cleanup()
            thin_ls = subprocess.run(["dmsetup", "status", pool.name], capture_output=True,
                                     text=True, check=False).stdout.strip()
    print(f"-- pool status at the end: {thin_ls}")
    print(f"-- summary ({args.snapshots} vs 10)")
    print(f"   engine open      {ms(big_open)}  (at 10: {ms(small_open).strip()})")
    print(f"   daemon start     {ms(big['start'])}  target <= 2000 ms")
    print(f"   RSS              {big['rss_end']:8.1f} MB  target <= 150 MB")
    for op in ("mkdir", "mv", "rmdir"):
        print(f"   {op:<16} {ms(big[op])}  {big[op] / small[op]:5.2f}x the figure at 10 "
              "(target <= 1.2x)")
    print(f"   snapshots.json   {ms(big['snapshots_json'])}  target <= 300 ms")
    print(f"   readdir warm     {ms(big['readdir_warm'])}  target <= 50 ms "
          f"(cold {ms(big['readdir_cold']).strip()})")


if __name__ == "__main__":
    main()
