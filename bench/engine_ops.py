"""Benchmark: engine prepare / commit / remove latency against the raw floor.

Run in the test guest (it needs dm-thin), e.g.::

    contrib/guest/run -- .venv/bin/python bench/engine_ops.py

On a fresh loop-backed pool it measures, with 10 and with 1,000 existing
snapshots, p50 and p95 of the engine's prepare (parentless and child), commit
and remove, and beside them the floor: the same device-mapper operations and
mount(2) calls issued directly through the same driver in a minimal loop
(no journal, no checks, no events).  Each driver gets a pool of its own in
the same run; with both, a summary compares the ioctl engine with the raw
ioctl floor and the dmsetup engine with the ioctl engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmfs.config import Config
from dmfs.pool import fs
from dmfs.pool.dm import DeviceMapper, Target
from dmfs.pool.drivers import open_driver
from dmfs.pool.snapshotter import Snapshotter
from tests.support.loop_pool import loop_pool

BASE_SIZE = 256 * 2**20
SECTORS = BASE_SIZE // 512


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Timings:
    def __init__(self) -> None:
        self.samples: dict[tuple[str, str, int, str], list[float]] = {}

    def add(self, op: str, kind: str, existing: int, who: str, seconds: float) -> None:
        self.samples.setdefault((op, kind, existing, who), []).append(seconds * 1000)

    def p50_p95(self, op: str, kind: str, existing: int, who: str) -> tuple[float, float]:
        samples = self.samples[(op, kind, existing, who)]
        return statistics.median(samples), percentile(samples, 0.95)


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


class Floor:
    """The same dm operations and mounts as the engine, issued directly."""

    def __init__(self, dm: DeviceMapper, pool: str, base_id: int, parent_id: int,
                 mount_dir: Path) -> None:
        self.dm, self.pool, self.base_id, self.parent_id = dm, pool, base_id, parent_id
        self.mount_dir = mount_dir
        self.next_id = 900_000

    def _run(self, function: Callable[[], object]) -> Awaitable[object]:
        return trio.to_thread.run_sync(function)

    async def cycle(self, timings: Timings, kind: str, existing: int, who: str) -> None:
        origin = self.base_id if kind == "parentless" else self.parent_id
        device_id, self.next_id = self.next_id, self.next_id + 1
        name = f"floor-{device_id}"
        path = self.mount_dir / name
        path.mkdir()
        table = [Target(0, SECTORS, "thin", f"/dev/mapper/{self.pool} {device_id}")]

        def prepare() -> None:
            self.dm.message(self.pool, f"create_snap {device_id} {origin}")
            self.dm.create(name, table)
            fs.mount(self.dm.device_path(name), path, "ext4")

        def commit() -> None:
            fs.syncfs(path)
            fs.umount(path)
            self.dm.suspend(name)
            self.dm.resume(name)
            self.dm.remove(name)

        def remove() -> None:
            self.dm.message(self.pool, f"delete {device_id}")

        for op, function in (("prepare", prepare), ("commit", commit), ("remove", remove)):
            timings.add(op, kind, existing, who, await timed(lambda f=function: self._run(f)))
        path.rmdir()


async def engine_cycle(engine: Snapshotter, timings: Timings, kind: str, existing: int,
                       n: int, who: str) -> None:
    key = f"bench-{kind}-{existing}-{n}"
    parent = None if kind == "parentless" else "parent"
    timings.add("prepare", kind, existing, who,
                await timed(lambda: engine.prepare(key, parent)))
    timings.add("commit", kind, existing, who,
                await timed(lambda: engine.commit(key + "-c", key)))
    timings.add("remove", kind, existing, who,
                await timed(lambda: engine.remove(key + "-c")))


async def measure(driver: str, args: argparse.Namespace, timings: Timings) -> None:
    """Engine and floor through one driver, on a pool of their own."""
    work = Path(tempfile.mkdtemp(prefix="dmfs-bench-", dir="/dev/shm"))
    with loop_pool(work, data_mib=4096, metadata_mib=64) as pool:
        config = Config(pool_name=pool.name, base_image_size=BASE_SIZE,
                        root_path=work / "state", runtime_path=work / "run",
                        driver=driver, idle_timeout=3600)
        dm = open_driver(driver)
        floor_dir = work / "floor"
        floor_dir.mkdir()
        async with Snapshotter.open(config, dm) as engine:
            await engine.prepare("p")
            parent = await engine.commit("parent", "p")
            assert engine.meta.base_id is not None
            floor = Floor(dm, pool.name, engine.meta.base_id, parent.device_id, floor_dir)
            made = 0
            for existing in args.existing:
                while made < existing:
                    await engine.view(f"existing-{made}", "parent")
                    made += 1
                for n in range(args.iterations):
                    for kind in ("parentless", "child"):
                        # Interleave engine and floor so drift hits both alike.
                        await floor.cycle(timings, kind, existing, f"floor-{driver}")
                        await engine_cycle(engine, timings, kind, existing, n,
                                           f"engine-{driver}")
            for made_key in range(made):
                await engine.remove(f"existing-{made_key}")
        dm.close()


async def main(args: argparse.Namespace) -> None:
    timings = Timings()
    for driver in args.drivers:
        await measure(driver, args, timings)
    print(f"{args.iterations} iterations per row; p50/p95 in ms")
    for driver in args.drivers:
        print(f"\nengine with the {driver} driver against the same operations issued "
              f"directly through {driver} (the floor)")
        print(f"{'op':8} {'kind':11} {'exist':>6} {'eng p50':>9} {'eng p95':>9} "
              f"{'floor p50':>9} {'floor p95':>9} {'ratio':>7}")
        for existing in args.existing:
            for kind in ("parentless", "child"):
                for op in ("prepare", "commit", "remove"):
                    e50, e95 = timings.p50_p95(op, kind, existing, f"engine-{driver}")
                    f50, f95 = timings.p50_p95(op, kind, existing, f"floor-{driver}")
                    print(f"{op:8} {kind:11} {existing:>6} {e50:9.2f} {e95:9.2f} "
                          f"{f50:9.2f} {f95:9.2f} {e50 / f50:6.2f}x")
    if set(args.drivers) == {"ioctl", "dmsetup"}:
        print("\nsummary: engine(ioctl) / raw ioctl floor, and engine(dmsetup) / engine(ioctl)")
        print(f"{'op':8} {'kind':11} {'exist':>6} {'ioctl/floor':>12} {'dmsetup/ioctl':>14}")
        for existing in args.existing:
            for kind in ("parentless", "child"):
                for op in ("prepare", "commit", "remove"):
                    ioctl = timings.p50_p95(op, kind, existing, "engine-ioctl")[0]
                    floor = timings.p50_p95(op, kind, existing, "floor-ioctl")[0]
                    dmsetup = timings.p50_p95(op, kind, existing, "engine-dmsetup")[0]
                    print(f"{op:8} {kind:11} {existing:>6} {ioctl / floor:11.2f}x "
                          f"{dmsetup / ioctl:13.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", type=lambda text: text.split(","),
                        default=["ioctl", "dmsetup"],
                        help="comma-separated drivers to measure (default ioctl,dmsetup)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--existing", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10, 1000], help="existing snapshot counts (default 10,1000)")
    trio.run(main, parser.parse_args())
