#!/usr/bin/env python3
"""Micro benchmark: device-mapper operations through the dmsetup and the ioctl driver.

Needs root and dm-thin, so run it in the test guest, from the repository root:

    contrib/guest/run -- .venv/bin/python bench/dm_ops.py [--iterations N]

It makes a fresh loop-backed thin pool, then times, for each driver, N
iterations of: info and status of one thin device, create_thin + create
(activate), suspend + resume, and remove + delete; and prints p50/p95 in
milliseconds with the dmsetup/ioctl ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmfs.pool.dm import DeviceMapper, Target
from dmfs.pool.dmioctl import IoctlDriver
from dmfs.pool.dmsetup import DmsetupDriver
from dmfs.pool.udev import udevd_running
from tests.support.loop_pool import LoopPool, loop_pool

THIN_SECTORS = 2048
OPERATIONS = ("info", "status", "create_thin+create", "suspend+resume", "remove+delete")


def elapsed_ms(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def measure(driver: DeviceMapper, pool: LoopPool, iterations: int,
            first_id: int) -> dict[str, list[float]]:
    """Milliseconds per iteration of each operation, on devices ``first_id``..."""
    times: dict[str, list[float]] = {operation: [] for operation in OPERATIONS}

    def thin(device_id: int) -> list[Target]:
        return [Target(0, THIN_SECTORS, "thin", f"{pool.device} {device_id}")]

    steady = f"bench-{driver.name}"
    driver.message(pool.name, f"create_thin {first_id}")
    driver.create(steady, thin(first_id))
    driver.info(steady)  # warm up: imports, caches, first-call costs

    def suspend_resume() -> None:
        driver.suspend(steady)
        driver.resume(steady)

    names = []
    for i in range(iterations):
        times["info"].append(elapsed_ms(lambda: driver.info(steady)))
        times["status"].append(elapsed_ms(lambda: driver.status(steady)))
        times["suspend+resume"].append(elapsed_ms(suspend_resume))
        device_id, name = first_id + 1 + i, f"bench-{driver.name}-{i}"

        def activate(device_id: int = device_id, name: str = name) -> None:
            driver.message(pool.name, f"create_thin {device_id}")
            driver.create(name, thin(device_id))
        times["create_thin+create"].append(elapsed_ms(activate))
        names.append((device_id, name))
    for device_id, name in names:
        def deactivate(device_id: int = device_id, name: str = name) -> None:
            driver.remove(name)
            driver.message(pool.name, f"delete {device_id}")
        times["remove+delete"].append(elapsed_ms(deactivate))
    driver.remove(steady)
    driver.message(pool.name, f"delete {first_id}")
    return times


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95) of the samples."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94]


def report(results: dict[str, dict[str, list[float]]], iterations: int) -> str:
    lines = [
        f"dm operations, ms per iteration ({iterations} iterations each; "
        f"kernel {os.uname().release}, udevd {'running' if udevd_running() else 'not running'})",
        "",
        f"{'operation':<20} {'dmsetup p50':>11} {'p95':>8} {'ioctl p50':>10} {'p95':>8}"
        f" {'dmsetup/ioctl':>14}",
    ]
    for operation in OPERATIONS:
        dmsetup_p50, dmsetup_p95 = percentiles(results["dmsetup"][operation])
        ioctl_p50, ioctl_p95 = percentiles(results["ioctl"][operation])
        lines.append(f"{operation:<20} {dmsetup_p50:>11.2f} {dmsetup_p95:>8.2f} "
                     f"{ioctl_p50:>10.3f} {ioctl_p95:>8.3f} {dmsetup_p50 / ioctl_p50:>13.0f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50,
                        help="iterations of each operation (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be at least 2")
    workdir = Path(tempfile.mkdtemp(prefix="dmfs-bench-", dir="/dev/shm"))
    results = {}
    try:
        with loop_pool(workdir, name="dmfs-bench-pool") as pool, IoctlDriver() as ioctl:
            for offset, driver in enumerate((DmsetupDriver(), ioctl)):
                results[driver.name] = measure(driver, pool, args.iterations,
                                               first_id=offset * (args.iterations + 1))
    finally:
        workdir.rmdir()
    print(report(results, args.iterations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
