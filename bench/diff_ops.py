"""Benchmark: ``dmfs diff`` against ``diff -rq`` on two snapshots of a 10,000-file tree.

Run in the test guest with room for the pool (~1 GiB of tmpfs), e.g.::

    contrib/guest/run --mem 6144 --timeout 1800 -- .venv/bin/python bench/diff_ops.py

A dmfs tree serves a pool; snapshot ``A`` holds 10,000 files in 200
directories, their sizes drawn like this machine's /usr (log-normal, median
2 KiB, mean ~40 KiB); its child ``B`` rewrote 1% of them in place with the
same size and mtime (the hard case: only the contents differ); its child
``C`` changed the mode of every file (every inode differs, no content).
Each run starts with cold caches (``echo 3 > /proc/sys/vm/drop_caches``) and
is timed as a whole command, interpreter start included; bytes read are the
sectors read from the two snapshots' devices (/sys/dev/block/M:m/stat).
``diff -rq`` runs on the snapshots' mounts directly (not through M/<node>/fs,
which would add a FUSE round trip per path).  Prints the medians of
``--runs`` runs and each command's ratio to ``diff -rq``.

The children are made once ``RACY_MARGIN_NS`` has passed since A's last write
(``--racy``: right away; then ~1,000 of A's newest inodes are racily clean and
their contents compared, with a thin delta, ~0.3 s more).  ``dmfs diff`` runs
in this environment; where PYTHONDONTWRITEBYTECODE is set (the sessions on
this machine) and the checkout has no ``__pycache__``, that compiles dmfs's
sources in every run, which an installed dmfs (pip compiles at install) never
does: ``bytecode cached`` is that case.  ``--compare-with CHECKOUT`` adds the
``dmfs diff`` of another checkout, e.g. the commit before a change.  The two
``program warm`` rows drop the caches, run the program once on nothing the
snapshots hold (``diff --version``, ``dmfs diff --help``), then time it: the
snapshots cold, the programs' own files cached, as on a machine in use.

What made the command fast in this guest is memory: a page of memory that the
program touches for the first time costs ~60 us (a page fault handled by the
UML kernel; a page the kernel fills, as a read does, costs almost nothing),
and ``dmfs diff`` of the 10,000 files touched ~4,400 new pages after its
imports (0.5 s of its 0.9 s), where the same comparison in a process that had
done it before took 0.2 s.  Reading contents in 64 KiB instead of 1 MiB
chunks (961 -> 5 faults for B's 100 file pairs), pairing entries directory by
directory instead of recording every entry with its path on both sides (~1,400
faults), tuples for entries, and no shutil or dm module at the start took it
from 1.01 s to 0.58-0.67 s.

A run on 2026-12-01 (a quiet machine: ``python -c pass`` 0.21 s), 5 cold runs,
medians, of this code and of main before it (``--compare-with``):

=================================  =============  =============
                                   A -> B         A -> C
=================================  =============  =============
``diff -rq``                       8.17 s         8.49 s
dmfs diff                          0.65 s (12.6x) 1.56 s (5.4x)
dmfs diff, bytecode cached         0.58 s (14.0x) 1.59 s (5.3x)
dmfs diff, installed               0.67 s (12.2x) 1.53 s (5.6x)
dmfs diff of main before           1.01 s (8.1x)  1.69 s (5.0x)
dmfs diff, programs warm           0.62 s (13.3x) 1.63 s (5.2x)
dmfs diff, in-process              0.17 s         0.76 s
``python -m dmfs --help``          0.44 s         0.47 s
``python -c pass``                 0.21 s         0.23 s
=================================  =============  =============

Bytes read: B 11.3 MiB, C 8.2 MiB, against ``diff -rq``'s 858 MiB.  A -> C
changes the mode of all 10,000 files: each is a change to compare and report,
in Python.  Earlier the same day, before these changes and on a loaded
machine, A -> B ran at 8.7x-11.5x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmfs.cli import main as main_command
from dmfs.diff.lineage import RACY_MARGIN_NS
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, write_config

CHECKOUT = Path(__file__).resolve().parents[1]
FILES = 10_000
#: the rows timed with the program's own files in the page cache (the snapshots' cold)
WARM_DIFF = "diff -rq, program warm"
WARM_DMFS = "dmfs diff, program warm"
DIRECTORIES = 200
CHANGED_SHARE = 0.01
SIZE_MEDIAN_LOG, SIZE_SIGMA, SIZE_CAP = 7.63, 2.5, 8 << 20  # median e^7.63 = 2 KiB


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sectors_read(mount: Path) -> int:
    st = os.stat(mount)
    fields = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat").read_text()
    return int(fields.split()[2])


def build(root: Path, rng: random.Random) -> list[str]:
    """The tree: 200 directories up to four deep, 10,000 files; returns the file paths."""
    directories = [root]
    for number in range(DIRECTORIES):
        directory = rng.choice(directories[-50:] if rng.random() < 0.5 else directories)
        directory = directory / f"d{number}"
        directory.mkdir()
        directories.append(directory)
    data = rng.randbytes(SIZE_CAP + (1 << 20))
    files = []
    for number in range(FILES):
        size = min(int(rng.lognormvariate(SIZE_MEDIAN_LOG, SIZE_SIGMA)), SIZE_CAP)
        path = rng.choice(directories) / f"f{number}"
        offset = rng.randrange(1 << 20)
        path.write_bytes(data[offset:offset + size])
        files.append(str(path.relative_to(root)))
    return files


def rewrite_in_place(root: Path, paths: list[str]) -> None:
    for rel in paths:
        path = root / rel
        st = path.stat()
        with open(path, "r+b") as f:
            head = f.read(1)
            f.seek(0)
            f.write(bytes([head[0] ^ 0xFF]) if head else b"")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def timed_cold(command: Callable[[], object], mounts: list[Path],
               warm: Callable[[], object] | None = None) -> tuple[float, int, object]:
    """``command`` timed with cold caches; ``warm``, if given, runs untimed after
    the caches are dropped (the program's own files read, not the snapshots')."""
    drop_caches()
    if warm is not None:
        warm()
    before = sum(sectors_read(m) for m in mounts)
    start = time.perf_counter()
    answer = command()
    elapsed = time.perf_counter() - start
    return elapsed, (sum(sectors_read(m) for m in mounts) - before) * 512, answer


def in_process(*args: str) -> int:
    """``dmfs diff`` without the interpreter's start and imports (this process has
    them already)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return main_command(["diff", *args])


def run(argv: list[str], env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=env, cwd=cwd)


def dmfs(*args: str, env: dict[str, str] | None = None,
         checkout: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dmfs diff ARGS``, of ``checkout`` (default: the installed dmfs)."""
    if checkout is not None:  # -m puts the working directory first on sys.path
        env = {**(env or os.environ), "PYTHONPATH": str(checkout)}
    return run([sys.executable, "-m", "dmfs", "diff", *args], env=env, cwd=checkout)


def bytecode_environment(cache: Path) -> dict[str, str]:
    """The environment of an installed dmfs: its modules' bytecode compiled once
    (pip does that when it installs) and read from then on, here from a cache of
    its own under ``cache`` so that the checkout is not written."""
    env = {name: value for name, value in os.environ.items()
           if name != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(cache)}


def installed_dmfs(scratch: Path) -> Path:
    """The ``dmfs`` command of dmfs installed as a user installs it: a wheel of this
    checkout in a virtual environment of its own, with its bytecode compiled at
    install.  Without its dependencies: ``dmfs diff`` imports none of them
    (tests/unit/test_cli_imports.py).  This checkout's own environment imports
    dmfs through setuptools' editable-install finder instead."""
    source, wheels, venv = scratch / "source", scratch / "wheels", scratch / "installed"
    # built from a copy (setuptools writes build/ and dmfs.egg-info/ where it builds),
    # as contrib/install-system does
    shutil.copytree(CHECKOUT / "dmfs", source / "dmfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)

    def step(*argv: str) -> None:
        done = run(list(argv))
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)}: {done.stderr.strip()}")

    step(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "-w", str(wheels), str(source))
    step(sys.executable, "-m", "venv", "--without-pip", str(venv))
    step(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", *map(str, wheels.glob("dmfs-*.whl")))
    return venv / "bin" / "dmfs"


def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="dmfs-bench-", dir="/dev/shm"))
    scratch.chmod(0o755)
    with loop_pool(scratch, data_mib=2048, metadata_mib=64) as pool:
        config = write_config(scratch, pool.name, base_image_size="2GiB")
        tree = MountedTree(config, scratch / "mnt", scratch / "run")
        try:
            tree.mount()
            m = tree.mountpoint
            (m / "a").mkdir()
            started = time.perf_counter()
            files = build(Path(os.path.realpath(m / "a/fs")), rng)
            last_write = time.time()
            print(f"built {len(files)} files in {time.perf_counter() - started:.1f} s "
                  f"(seed {args.seed})", flush=True)
            (m / "a").rename(m / "A")
            # A child made within RACY_MARGIN_NS of A's last write finds A's newest
            # inodes racily clean (dmfs.diff.lineage) and compares their contents: how
            # many depended on how long the commit took (0 to 1,100 in test runs), so
            # the children are made once the margin has passed; --racy measures that case.
            if not args.racy:
                time.sleep(max(0.0, last_write + RACY_MARGIN_NS / 1e9 - time.time()))
            (m / "A/b").mkdir()
            changed = sorted(rng.sample(files, int(len(files) * CHANGED_SHARE)))
            rewrite_in_place(Path(os.path.realpath(m / "A/b/fs")), changed)
            (m / "A/b").rename(m / "A/B")
            (m / "A/c").mkdir()
            c_root = Path(os.path.realpath(m / "A/c/fs"))
            for rel in files:
                os.chmod(c_root / rel, 0o600)
            (m / "A/c").rename(m / "A/C")
            mounts = {name: Path(os.path.realpath(m / path / "fs"))
                      for name, path in (("A", "A"), ("B", "A/B"), ("C", "A/C"))}
            size = run(["du", "-sb", str(mounts["A"])]).stdout.split()[0]
            print(f"A: {int(size) / 2**20:.0f} MiB; B: {len(changed)} files rewritten in "
                  f"place (same size and mtime); C: chmod of every file", flush=True)

            compiled = bytecode_environment(scratch / "pycache")
            installed = installed_dmfs(scratch)
            dmfs(str(m / "A"), str(m / "A/B"), env=compiled)  # compiles what it imports
            print("dmfs diff runs with this environment's PYTHONDONTWRITEBYTECODE="
                  f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}: when it is set, "
                  "a checkout without __pycache__ compiles dmfs's sources in every run; "
                  "'bytecode cached' runs as an installed dmfs does", flush=True)

            for child in ("B", "C"):
                pair = [mounts["A"], mounts[child]]
                nodes = [str(m / "A"), str(m / "A" / child)]
                commands: dict[str, Callable[[], object]] = {
                    "diff -rq": lambda pair=pair: run(["diff", "-rq", *map(str, pair)]),
                    "dmfs diff": lambda nodes=nodes: dmfs(*nodes),
                    "dmfs diff, bytecode cached": lambda nodes=nodes: dmfs(*nodes, env=compiled),
                    "dmfs diff, installed": lambda nodes=nodes: run([str(installed), "diff",
                                                                     *nodes]),
                    **({f"dmfs diff of {args.compare_with.name}": lambda nodes=nodes: dmfs(
                        *nodes, checkout=args.compare_with)} if args.compare_with else {}),
                    "python -m dmfs --help": lambda: run([sys.executable, "-m", "dmfs",
                                                          "--help"]),
                    "dmfs diff --walk": lambda nodes=nodes: dmfs("--walk", *nodes),
                    "dmfs diff, in-process": lambda nodes=nodes: in_process(*nodes),
                    "python -c pass": lambda: run([sys.executable, "-c", "pass"]),
                    WARM_DIFF: lambda pair=pair: run(["diff", "-rq", *map(str, pair)]),
                    WARM_DMFS: lambda nodes=nodes: dmfs(*nodes, env=compiled),
                }
                # the programs' own files in the page cache, as on a machine in use:
                # each program run once on nothing the snapshots hold
                warmers: dict[str, Callable[[], object]] = {
                    WARM_DIFF: lambda: run(["diff", "--version"]),
                    WARM_DMFS: lambda: dmfs("--help", env=compiled),
                }
                results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
                answers: dict[str, object] = {}
                for _ in range(args.runs):
                    for name, command in commands.items():
                        elapsed, read, answer = timed_cold(command, pair, warmers.get(name))
                        results[name].append((elapsed, read))
                        answers[name] = answer
                report(child, pair, results, answers, changed if child == "B" else [])
                facts = json.loads(dmfs("--json", *nodes).stdout)["method"]
                print(f"  how dmfs diff found it: {json.dumps(facts, sort_keys=True)}",
                      flush=True)
        finally:
            tree.cleanup()


def report(child: str, pair: list[Path], results: dict[str, list[tuple[float, int]]],
           answers: dict[str, object], changed: list[str]) -> None:
    baseline = statistics.median(t for t, _ in results["diff -rq"])
    print(f"\nA -> {child} (median of {len(results['diff -rq'])} cold runs)")
    print(f"  {'':32} {'time':>9} {'read from devices':>18} {'vs diff -rq':>12}")
    for name, samples in results.items():
        elapsed = statistics.median(t for t, _ in samples)
        read = statistics.median(r for _, r in samples)
        print(f"  {name:32} {elapsed:8.2f}s {read / 2**20:14.1f} MiB {baseline / elapsed:11.1f}x")
    # The answers must agree (diff -rq compares contents only, not modes).
    prefix = f"Files {pair[0]}/"
    by_diff = sorted(line[len(prefix):line.index(" and ")]
                     for line in answers["diff -rq"].stdout.splitlines())  # type: ignore[attr-defined]
    dmfs_lines = answers["dmfs diff"].stdout.splitlines()[:-1]  # type: ignore[attr-defined]
    for name, answer in answers.items():
        if name.startswith("dmfs diff") and "--walk" not in name and "in-process" not in name:
            assert answer.stdout == answers["dmfs diff"].stdout, f"{name} answers otherwise"  # type: ignore[attr-defined]
    by_dmfs = sorted(line.split("\t")[1].lstrip("/") for line in dmfs_lines)
    if changed:
        assert by_diff == by_dmfs == changed, "dmfs diff and diff -rq disagree"
        assert all(line.endswith("(content)") for line in dmfs_lines)
    else:
        assert not by_diff and len(by_dmfs) == FILES
        assert all(line.endswith("(mode)") for line in dmfs_lines)
    warm = (statistics.median(t for t, _ in results[WARM_DIFF])
            / statistics.median(t for t, _ in results[WARM_DMFS]))
    print(f"  programs warm, snapshots cold: dmfs diff is {warm:.1f}x faster than diff -rq")
    print(f"  both list the same {len(by_diff)} files" if changed else
          f"  dmfs diff lists the mode of {len(by_dmfs)} files; diff -rq sees no difference")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold runs of each command")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--racy", action="store_true",
                        help="make the children right after A's last write (its newest inodes "
                             "are then racily clean: their contents are compared)")
    parser.add_argument("--compare-with", metavar="CHECKOUT", type=lambda p: Path(p).resolve(),
                        help="also time dmfs diff from another checkout of dmfs, e.g. "
                             "`git archive main | tar -x -C DIR` (before and after a change, "
                             "in the same run)")
    main(parser.parse_args())
