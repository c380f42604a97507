"""Benchmark: the tree against native access and against the engine (issue 12).

Run in the test guest with room for the file data, e.g.::

    contrib/guest/run --mem 6144 -- .venv/bin/python bench/tree_ops.py

Prints, from one run:

- data path, on one thin device (an active snapshot's ext4) mounted by dmfs
  and mounted again directly (the same filesystem: only the path differs):
  sequential write (with fsync) and cold read of a big file, and 10,000 small
  files created, stat'ed, read and unlinked, natively, through
  ``M/<node>/fs/...`` paths, from a cwd inside ``M/<node>/fs``, and through an
  ordinary symlink to where ``fs`` points (what the longer walk alone costs).
  Once with the kernel caching fs links (pyfuse3 from contrib/pyfuse3) and
  once as with stock pyfuse3 (``tests.support.stock_pyfuse3``), with the
  READLINKs that reached the daemon;
- mkdir / mv / rmdir through the mount against the engine's prepare / commit
  / remove on a second pool, sample by sample in turn (other load on the
  machine hits both alike);
- listing a node with 10,000 children (first, again, ``ls -l``) against
  ``ls -l`` of an ext4 directory with 10,000 subdirectories.

Ratios are against native (1.00 = as fast); targets from issue 12: every
path figure >= 0.95x native, ls -l <= 2x the plain directory, rmdir <= 1.2x
the engine's remove.
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

from dmfs.config import load_config
from dmfs.fuse import linkcache
from dmfs.pool import fs
from dmfs.pool.snapshotter import Snapshotter
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, write_config

CHUNK = 2**20
#: the data path runs: how dmfs is started for each (its module) and what it shows
MODES = {"cached": ("dmfs", "fs links cached by the kernel"),
         "stock": ("tests.support.stock_pyfuse3", "as with stock pyfuse3 (links not cached)")}


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


PHASES = ("create", "stat", "read", "unlink")


def small_file_phase(phase: str, names: list[Path], data: bytes) -> None:
    """One phase over 1 KiB files: create, stat, read or unlink them all."""
    for name in names:
        if phase == "create":
            with open(name, "wb") as f:
                f.write(data)
        elif phase == "stat":
            os.stat(name)
        elif phase == "read":
            with open(name, "rb") as f:
                f.read()
        else:
            os.unlink(name)


def small_files_in_turn(roots: dict[str, tuple[Path, bool]], count: int,
                        turn: int) -> dict[str, dict[str, float]]:
    """Each phase for every way of reaching the files, one right after the other
    (the order rotates with ``turn``), so that load from elsewhere hits all
    alike.  ``roots``: label -> (directory, whether to work from a cwd in it)."""
    data = os.urandom(1024)
    labels = list(roots)
    labels = labels[turn % len(labels):] + labels[:turn % len(labels)]
    times: dict[str, dict[str, float]] = {label: {} for label in labels}
    for phase in PHASES:
        for label in labels:
            root, from_inside = roots[label]
            names = [(Path(".") if from_inside else root) / f"f{i:05d}" for i in range(count)]
            if phase == "read":
                drop_caches()
            previous = os.getcwd()
            if from_inside:
                os.chdir(root)
            try:
                times[label][phase] = timed(
                    lambda p=phase, n=names: small_file_phase(p, n, data))
            finally:
                os.chdir(previous)
    return times


def data_path(args: argparse.Namespace, tree: MountedTree, node: str, direct: Path,
              mode: str) -> list[str]:
    """Native and through-the-tree runs alternate (small files: phase by phase);
    each figure is the median of ``args.repeat`` turns."""
    through = tree.mountpoint / node / "fs"
    size = args.size_mib * CHUNK
    rows = []
    big: dict[str, dict[str, list[float]]] = {"native": {"write": [], "read": []},
                                              "dmfs": {"write": [], "read": []}}
    small: dict[str, dict[str, list[float]]] = {}
    # The control for path walks: an ordinary symlink (on tmpfs) to the same target.
    symlink = direct.parent / f"{node}-symlink"
    symlink.symlink_to(os.readlink(through))
    readlinks_before = tree.requests().get("readlink", 0)
    for turn in range(args.repeat):
        for label, root in (("native", direct), ("dmfs", through)):
            if not size:
                break
            drop_caches()
            big[label]["write"].append(timed(lambda r=root: write_file(r / "big", size)))
            drop_caches()
            big[label]["read"].append(timed(lambda r=root: read_file(r / "big")))
            os.unlink(root / "big")
            # ext4 writes the next file elsewhere: give the blocks back to the pool.
            subprocess.run(["fstrim", str(direct)], check=True)
        roots = {"native": (direct / "native", False), "path": (through / "path", False),
                 "cwd": (through / "cwd", True), "symlink": (symlink / "symlink", False)}
        for root, _ in roots.values():
            root.mkdir(exist_ok=True)
        for label, phases in small_files_in_turn(roots, args.files, turn).items():
            for phase, seconds in phases.items():
                small.setdefault(label, {}).setdefault(phase, []).append(seconds)
    readlinks = tree.requests().get("readlink", 0) - readlinks_before
    symlink.unlink()
    mib = args.size_mib
    for op in ("write", "read") if size else ():
        native = statistics.median(big["native"][op])
        dmfs = statistics.median(big["dmfs"][op])
        rows.append(f"  sequential {op:5} {mib} MiB  native {mib / native:7.1f} MiB/s   "
                    f"path {mib / dmfs:7.1f} MiB/s ({native / dmfs:4.2f}x)")
    for phase in PHASES:
        native = statistics.median(small["native"][phase])
        line = f"  {args.files} files {phase:6}  native {args.files / native:7.0f}/s"
        for label in ("path", "cwd", "symlink"):
            seconds = statistics.median(small[label][phase])
            line += f"  {label} {args.files / seconds:6.0f}/s ({native / seconds:4.2f}x)"
        rows.append(line)
    walks = 4 * args.files * args.repeat
    rows.append(f"  READLINKs that reached the daemon: {readlinks} (the path runs walked "
                f"through fs {walks} times)")
    return [f"data path, {MODES[mode][1]}:", *rows]


async def tree_against_engine(tree: MountedTree, engine_config: Path,
                              iterations: int) -> dict[str, list[float]]:
    """mkdir / mv / rmdir through the mount and prepare / commit / remove of the
    engine on another pool, one sample of each in turn."""
    samples: dict[str, list[float]] = {op: [] for op in (
        "mkdir", "mv", "rmdir", "prepare", "commit", "remove", "round trip")}
    m = tree.mountpoint

    async def in_thread(op: str, call: Callable[[], object]) -> None:
        samples[op].append(await trio.to_thread.run_sync(timed, call))

    async def in_engine(op: str, call: Callable[[], object]) -> None:
        start = time.perf_counter()
        await call()  # type: ignore[misc]
        samples[op].append(time.perf_counter() - start)

    async with Snapshotter.open(load_config(engine_config)) as engine:
        for i in range(iterations):
            await in_thread("mkdir", lambda i=i: os.mkdir(m / f"op{i}"))
            await in_engine("prepare", lambda i=i: engine.prepare(f"e{i}"))
            await in_thread("mv", lambda i=i: os.rename(m / f"op{i}", m / f"op{i}-c"))
            await in_engine("commit", lambda i=i: engine.commit(f"e{i}-c", f"e{i}"))
            await in_thread("round trip", lambda i=i: os.getxattr(m / f"op{i}-c",
                                                                  "user.dmfs.kind"))
            await in_thread("rmdir", lambda i=i: os.rmdir(m / f"op{i}-c"))
            await in_engine("remove", lambda i=i: engine.remove(f"e{i}-c"))
    return samples


async def make_children(config_path: Path, count: int) -> None:
    async with Snapshotter.open(load_config(config_path)) as engine:
        await engine.prepare("parent")
        await engine.commit("parent-c", "parent")
        for i in range(count):
            await engine.view(f"child{i:05d}", "parent-c")


def ms(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def listings(tree: MountedTree, plain: Path, children: int) -> list[str]:
    parent = tree.mountpoint / "parent-c"

    def ls_l(path: Path) -> float:
        return timed(lambda: subprocess.run(["ls", "-l", str(path)], check=True,
                                            capture_output=True))

    drop_caches()
    first = timed(lambda: os.listdir(parent))
    again = timed(lambda: os.listdir(parent))
    drop_caches()
    node_first = ls_l(parent)
    node_again = ls_l(parent)
    drop_caches()
    plain_first = ls_l(plain)
    plain_again = ls_l(plain)
    return [
        f"listing a node with {children} children: first {first * 1000:.0f} ms, "
        f"again {again * 1000:.0f} ms",
        f"ls -l of that node: first {node_first * 1000:.0f} ms, again {node_again * 1000:.0f}"
        f" ms | ext4 directory with {children} subdirectories: first "
        f"{plain_first * 1000:.0f} ms, again {plain_again * 1000:.0f} ms | ratio first "
        f"{node_first / plain_first:4.2f}x, again {node_again / plain_again:4.2f}x"]


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="dmfs-bench-", dir="/dev/shm"))
    work.chmod(0o755)
    rows = [f"driver: {args.driver}; installed pyfuse3: {linkcache.installed().why}"]
    data_mib = max(1024, 2 * args.size_mib + 512)
    modes = [mode for mode in MODES if mode in args.modes]
    with loop_pool(work, data_mib=data_mib, metadata_mib=128) as pool, \
            loop_pool(work, metadata_mib=32) as engine_pool:
        (work / "tree").mkdir()
        (work / "engine").mkdir()
        base_image_size = f"{args.size_mib + 1024}MiB"  # alike: mount and unmount costs grow
        config = write_config(work / "tree", pool.name, driver=args.driver,
                              base_image_size=base_image_size)
        engine_config = write_config(work / "engine", engine_pool.name, driver=args.driver,
                                     base_image_size=base_image_size)
        tree = MountedTree(config, work / "mnt", work / "tree" / "run")
        direct = work / "direct"
        direct.mkdir()
        try:
            if args.iterations:
                tree.mount()
                samples = trio.run(tree_against_engine, tree, engine_config, args.iterations)
                tree.unmount()
                rows.append(f"mkdir / mv / rmdir through the mount against the engine on a "
                            f"second pool, {args.iterations} each, in turn:")
                for tree_op, engine_op in (("mkdir", "prepare"), ("mv", "commit"),
                                           ("rmdir", "remove")):
                    t, e = samples[tree_op], samples[engine_op]
                    rows.append(
                        f"  {tree_op:6} p50 {ms(t, .5):6.2f} ms p95 {ms(t, .95):6.2f} | engine "
                        f"{engine_op:7} p50 {ms(e, .5):6.2f} ms p95 {ms(e, .95):6.2f} | "
                        f"ratio p50 {statistics.median(t) / statistics.median(e):4.2f}x")
                trip = samples["round trip"]
                rows.append(f"  a bare FUSE round trip (getxattr user.dmfs.kind) p50 "
                            f"{ms(trip, .5):6.2f} ms p95 {ms(trip, .95):6.2f}")
            for mode in modes:
                tree.mount(module=MODES[mode][0])
                node = f"bench-{mode}"
                (tree.mountpoint / node).mkdir()
                device = Path(os.readlink(tree.mountpoint / node / "fs"))
                source = next(e.source for e in fs.mountinfo() if e.mountpoint == device)
                fs.mount(source, direct, "ext4")  # the same filesystem, mounted again
                try:
                    rows += data_path(args, tree, node, direct, mode)
                finally:
                    fs.umount(direct)
                (tree.mountpoint / node).rmdir()  # gives its blocks back to the pool
                tree.unmount()
            if args.children:
                trio.run(make_children, config, args.children)
                tree.mount()
                (tree.mountpoint / "plain").mkdir()
                plain = Path(os.readlink(tree.mountpoint / "plain" / "fs")) / "dirs"
                plain.mkdir()
                for i in range(args.children):
                    (plain / f"d{i:05d}").mkdir()
                rows += listings(tree, plain, args.children)
                tree.unmount()
        finally:
            tree.cleanup()
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="big file for the sequential rows (0: no such rows)")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--driver", default="ioctl", choices=("ioctl", "dmsetup"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating native/path/cwd runs of the data path (median)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="data path runs (default: both)")
    main(parser.parse_args())
