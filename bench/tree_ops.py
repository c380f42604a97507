"""Benchmark: the tree against native access and against the engine.

Run in the test guest with room for 1 GiB of file data, e.g.::

    contrib/guest/run --mem 6144 -- .venv/bin/python bench/tree_ops.py

On one thin device (an active snapshot's ext4), mounted by dmfs and mounted
again directly (the same filesystem, so the only difference is the path):

- sequential write (with fsync) and cold read of a 1 GiB file;
- 10,000 small files created, stat'ed, read and unlinked;

each through ``M/<node>/fs/...`` paths, from a shell whose cwd is inside
``M/<node>/fs``, and natively; then mkdir / mv / rmdir through the mount
against the engine's prepare / commit / remove called directly, and listing a
node with 10,000 children.  Prints numbers and ratios (native = 1.00).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmfs.pool import fs
from dmfs.pool.snapshotter import Snapshotter
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, write_config

CHUNK = 2**20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def write_file(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def small_files(root: Path, count: int) -> dict[str, float]:
    """create / stat / read / unlink ``count`` 1 KiB files under ``root``."""
    data = os.urandom(1024)
    names = [root / f"f{i:05d}" for i in range(count)]
    times = {}

    def create() -> None:
        for name in names:
            with open(name, "wb") as f:
                f.write(data)

    def stat_all() -> None:
        for name in names:
            os.stat(name)

    def read_all() -> None:
        for name in names:
            with open(name, "rb") as f:
                f.read()

    def unlink_all() -> None:
        for name in names:
            os.unlink(name)

    for phase, call in (("create", create), ("stat", stat_all), ("read", read_all),
                        ("unlink", unlink_all)):
        if phase == "read":
            drop_caches()
        times[phase] = timed(call)
    return times


def in_directory(path: Path, call: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    """Run ``call`` on relative paths with the cwd inside ``path``."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        return call(Path("."))
    finally:
        os.chdir(previous)


def data_path(args: argparse.Namespace, tree: MountedTree, direct: Path) -> list[str]:
    """Native and through-the-tree runs alternate; each figure is the median."""
    through = tree.mountpoint / "bench" / "fs"
    size = args.size_mib * CHUNK
    rows = []
    big: dict[str, dict[str, list[float]]] = {"native": {"write": [], "read": []},
                                              "dmfs": {"write": [], "read": []}}
    small: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeat):
        for label, root in (("native", direct), ("dmfs", through)):
            drop_caches()
            big[label]["write"].append(timed(lambda r=root: write_file(r / "big", size)))
            drop_caches()
            big[label]["read"].append(timed(lambda r=root: read_file(r / "big")))
            os.unlink(root / "big")
        for label, run_small in (
                ("native", lambda: small_files(direct, args.files)),
                ("dmfs path", lambda: small_files(through, args.files)),
                ("dmfs cwd", lambda: in_directory(through,
                                                  lambda r: small_files(r, args.files)))):
            for phase, seconds in run_small().items():
                small.setdefault(label, {}).setdefault(phase, []).append(seconds)
    mib = args.size_mib
    for op in ("write", "read"):
        native = statistics.median(big["native"][op])
        dmfs = statistics.median(big["dmfs"][op])
        rows.append(f"sequential {op:6} {mib} MiB   native {mib / native:8.1f} MiB/s   "
                    f"dmfs {mib / dmfs:8.1f} MiB/s   dmfs/native {native / dmfs:5.2f}x")
    for phase in ("create", "stat", "read", "unlink"):
        native = statistics.median(small["native"][phase])
        line = f"{args.files} files {phase:6}  native {args.files / native:9.0f}/s"
        for label in ("dmfs path", "dmfs cwd"):
            seconds = statistics.median(small[label][phase])
            line += f"   {label} {args.files / seconds:9.0f}/s ({native / seconds:4.2f}x)"
        rows.append(line)
    return rows


def tree_ops(tree: MountedTree, iterations: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"mkdir": [], "mv": [], "rmdir": []}
    m = tree.mountpoint
    for i in range(iterations):
        samples["mkdir"].append(timed(lambda i=i: os.mkdir(m / f"op{i}")))
        samples["mv"].append(timed(lambda i=i: os.rename(m / f"op{i}", m / f"op{i}-c")))
        samples["rmdir"].append(timed(lambda i=i: os.rmdir(m / f"op{i}-c")))
    return samples


async def engine_ops(config_path: Path, iterations: int, children: int) -> dict[str, list]:
    from dmfs.config import load_config

    config = load_config(config_path)
    samples: dict[str, list[float]] = {"prepare": [], "commit": [], "remove": []}
    async with Snapshotter.open(config) as engine:
        for i in range(iterations):
            for op, call in (("prepare", lambda i=i: engine.prepare(f"e{i}")),
                             ("commit", lambda i=i: engine.commit(f"e{i}-c", f"e{i}")),
                             ("remove", lambda i=i: engine.remove(f"e{i}-c"))):
                start = time.perf_counter()
                await call()
                samples[op].append(time.perf_counter() - start)
        await engine.prepare("parent")
        await engine.commit("parent-c", "parent")
        for i in range(children):
            await engine.view(f"child{i:05d}", "parent-c")
    return samples


def ms(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="dmfs-bench-", dir="/dev/shm"))
    work.chmod(0o755)
    rows = []
    data_mib = max(1024, 2 * args.size_mib + 512)
    with loop_pool(work, data_mib=data_mib, metadata_mib=128) as pool:
        config = write_config(work, pool.name, base_image_size=f"{args.size_mib + 1024}MiB",
                              driver=args.driver)
        tree = MountedTree(config, work / "mnt", work / "run")
        direct = work / "direct"
        direct.mkdir()
        try:
            tree.mount()
            (tree.mountpoint / "bench").mkdir()
            device = Path(os.readlink(tree.mountpoint / "bench" / "fs"))
            source = next(e.source for e in fs.mountinfo() if e.mountpoint == device)
            fs.mount(source, direct, "ext4")  # the same filesystem, mounted again
            try:
                rows += data_path(args, tree, direct)
            finally:
                fs.umount(direct)
            mount_samples = tree_ops(tree, args.iterations)
            tree.unmount()
            engine_samples = trio.run(engine_ops, config, args.iterations, args.children)
            for tree_op, engine_op in (("mkdir", "prepare"), ("mv", "commit"),
                                       ("rmdir", "remove")):
                t, e = mount_samples[tree_op], engine_samples[engine_op]
                rows.append(
                    f"{tree_op:6} through the mount p50 {ms(t, .5):7.2f} ms p95 {ms(t, .95):7.2f}"
                    f" | engine {engine_op:7} p50 {ms(e, .5):7.2f} ms p95 {ms(e, .95):7.2f}"
                    f" | ratio p50 {statistics.median(t) / statistics.median(e):4.2f}x")
            tree.mount()
            parent = tree.mountpoint / "parent-c"
            cold = timed(lambda: os.listdir(parent))
            warm = timed(lambda: os.listdir(parent))
            long_listing = timed(lambda: subprocess.run(["ls", "-l", str(parent)], check=True,
                                                        capture_output=True))
            rows.append(f"listing a node with {args.children} children: first {cold * 1000:.0f}"
                        f" ms, again {warm * 1000:.0f} ms, ls -l {long_listing * 1000:.0f} ms")
            tree.unmount()
        finally:
            tree.cleanup()
    print(f"driver: {args.driver}")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--driver", default="ioctl", choices=("ioctl", "dmsetup"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating native/dmfs runs of the data path (median)")
    main(parser.parse_args())
