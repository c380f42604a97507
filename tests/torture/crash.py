"""A seeded random crash test of the daemon, through the mount only.

    python -m tests.torture.crash --seed N --budget SECONDS   (as root, with dm-thin:
    contrib/guest/run -- .venv/bin/python -m tests.torture.crash --seed N --budget 300)

Rounds until the budget is spent.  Each round runs random operations (mkdir,
view = mkdir -m 0555, write + fsync, commit = mv of an active node, rename =
mv of a committed one, label, unlabel, rmdir) kept in a model of what the tree
must hold, then kills the daemon with SIGKILL, in one of three ways:

- idle: between operations;
- in flight: while an operation runs in another thread, after a random delay
  scaled to how long that kind of operation takes;
- at a failpoint: the daemon restarts with ``DMFS_FAILPOINT=<name>`` (a name
  drawn from :data:`dmfs.pool.failpoints.FAILPOINTS`, read at run time, so new
  names are covered) and runs operations that reach it; a point in the
  start-up reconciliation fires during that restart, and the test restarts
  again without it.  ``base:*`` rounds change ``base_image_size`` so that the
  restart makes a new base device.

After each kill: the stale FUSE mount is detached (``umount -l``), ``dmfs
check`` must report (exit 0 or 1, with its JSON), ``dmfs mount`` must start,
and then: every snapshot the model holds is there with identical files and
labels; the operation in flight took effect entirely or not at all (either is
right, unless it had answered success: then it must have taken effect);
``dmfs check`` is clean while the daemon serves (no thin device unaccounted
for); nothing is Faulty; the log has no traceback; an operation that was
rolled back can be done again with the same names; and a second restart
(SIGKILL again, idle) changes neither snapshots.json nor ``dmfs check --json``.

The seed decides every choice; a run replays from it as long as the kills
land the same way (a kill in flight depends on timing, so its outcome may
differ, and the choices after it with it).  Each run prints the seed, the
number of kill points exercised, and which failpoints fired.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmfs.pool.failpoints import FAILPOINTS
from tests.support.loop_pool import loop_pool
from tests.support.torture import (
    CheckResult,
    check,
    clear_dead_mount,
    daemon_problems,
    errno_name,
    faulty_snapshots,
    read_snapshots,
    start,
    tree_matches_snapshots,
)
from tests.support.tree import MountedTree, errno_of, write_config

BASE_SIZES = ("64MiB", "72MiB")  # base:* rounds switch between them
MAX_NODES = 10
OPERATION_TIMEOUT = 120.0
FAILPOINT_OPERATIONS = 6  # operations tried to reach an armed failpoint
FIRED = re.compile(r"failpoint (\S+): killing the process")
#: which operations reach the failpoints of each prefix (others: any operation)
REACHED_BY = {
    "prepare": ("mkdir",), "commit": ("commit",), "remove": ("rmdir",),
    "fs:mount": ("mkdir", "readlink"), "fs:umount": ("commit", "rmdir"),
    "dm:suspend": ("commit",), "journal:fsync": ("mkdir", "label", "commit", "rmdir"),
}


class CrashTestFailure(AssertionError):
    """The daemon broke a promise; the message says which, with the seed."""


# ---- the model ---------------------------------------------------------------------
@dataclass
class Snapshot:
    kind: str  # active, view, committed
    parent: str | None
    labels: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


Model = dict[str, Snapshot]


def path_of(model: Model, name: str) -> tuple[str, ...]:
    names: list[str] = []
    current: str | None = name
    while current is not None:
        names.append(current)
        current = model[current].parent
    return tuple(reversed(names))


@dataclass
class Operation:
    """One thing a user does; ``apply`` is its effect on the model."""

    kind: str
    name: str  # the snapshot it works on (new name for mkdir/view)
    parent: str | None = None  # mkdir/view
    target: str | None = None  # commit/rename: the new name
    key: str | None = None  # label/unlabel; write: the file
    data: bytes = b""  # label value or file content

    def __str__(self) -> str:
        if self.kind in ("mkdir", "view"):
            extra = f" under {self.parent}"
        elif self.kind in ("commit", "rename"):
            extra = f" -> {self.target}"
        elif self.kind == "label":
            extra = f" {self.key}={self.data.decode()}"
        elif self.kind == "unlabel":
            extra = f" {self.key}"
        elif self.kind == "write":
            extra = f" {self.key} ({len(self.data)} bytes)"
        else:
            extra = ""
        return f"{self.kind} {self.name}{extra}"

    def apply(self, model: Model) -> Model:
        after = copy.deepcopy(model)
        if self.kind in ("mkdir", "view"):
            files = dict(after[self.parent].files) if self.parent else {}
            after[self.name] = Snapshot("active" if self.kind == "mkdir" else "view",
                                        self.parent, files=files)
        elif self.kind == "write":
            assert self.key is not None
            after[self.name].files[self.key] = self.data
        elif self.kind in ("commit", "rename"):
            assert self.target is not None
            snapshot = after.pop(self.name)
            snapshot.kind = "committed"
            after[self.target] = snapshot
            for child in after.values():
                if child.parent == self.name:
                    child.parent = self.target
        elif self.kind == "label":
            assert self.key is not None
            after[self.name].labels[self.key] = self.data.decode()
        elif self.kind == "unlabel":
            assert self.key is not None
            del after[self.name].labels[self.key]
        elif self.kind == "rmdir":
            del after[self.name]
        elif self.kind != "readlink":
            raise ValueError(self.kind)
        return after

    def perform(self, tree: MountedTree, model: Model) -> None:
        """Do it through the mount (raises OSError as the tree answers)."""
        if self.kind in ("mkdir", "view"):
            where = tree.path(*path_of(model, self.parent)) if self.parent else tree.mountpoint
            os.mkdir(where / self.name, 0o755 if self.kind == "mkdir" else 0o555)
            return
        node = tree.path(*path_of(model, self.name))
        if self.kind == "write":
            assert self.key is not None
            fd = os.open(node / "fs" / self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, self.data)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif self.kind in ("commit", "rename"):
            assert self.target is not None
            os.rename(node, node.parent / self.target)
        elif self.kind == "label":
            os.setxattr(node, f"user.label.{self.key}", self.data)
        elif self.kind == "unlabel":
            os.removexattr(node, f"user.label.{self.key}")
        elif self.kind == "rmdir":
            os.rmdir(node)
        elif self.kind == "readlink":
            os.listdir(node / "fs")


# ---- what the tree holds -----------------------------------------------------------
def files_of(fs: Path) -> dict[str, bytes]:
    found = {}
    for directory, subdirectories, files in os.walk(fs):
        if Path(directory) == fs:
            subdirectories[:] = [d for d in subdirectories if d != "lost+found"]
        for name in files:
            path = Path(directory, name)
            found[str(path.relative_to(fs))] = path.read_bytes()
    return found


def observe(tree: MountedTree) -> Model:
    """The tree as the daemon shows it: snapshots.json and every node's files."""
    seen: Model = {}
    snapshots = read_snapshots(tree)
    parents = {s["name"]: s["parent"] for s in snapshots}
    for s in snapshots:
        names, current = [], s["name"]
        while current is not None:
            names.append(current)
            current = parents[current]
        seen[s["name"]] = Snapshot(s["kind"], s["parent"], dict(s["labels"]),
                                   files_of(tree.path(*reversed(names), "fs")))
    return seen


def differences(expected: Model, seen: Model) -> list[str]:
    found = []
    for name in sorted(set(expected) | set(seen)):
        if name not in seen:
            found.append(f"{name}: missing")
        elif name not in expected:
            found.append(f"{name}: there, but the model does not have it ({seen[name].kind})")
        else:
            want, got = expected[name], seen[name]
            for what in ("kind", "parent", "labels"):
                if getattr(want, what) != getattr(got, what):
                    found.append(f"{name}: {what} {getattr(got, what)!r}, expected "
                                 f"{getattr(want, what)!r}")
            if want.files != got.files:
                wrong = sorted(k for k in set(want.files) | set(got.files)
                               if want.files.get(k) != got.files.get(k))
                found.append(f"{name}: files differ: {', '.join(wrong)}")
    return found


# ---- the run -----------------------------------------------------------------------
@dataclass
class Report:
    seed: int
    budget: float
    rounds: int = 0
    kills: Counter[str] = field(default_factory=Counter)  # by how
    fired: Counter[str] = field(default_factory=Counter)  # failpoints that killed
    not_reached: Counter[str] = field(default_factory=Counter)
    rolled_back: int = 0
    took_effect: int = 0
    operations: int = 0
    elapsed: float = 0.0

    @property
    def kill_points(self) -> int:
        return sum(self.kills.values())

    def summary(self) -> str:
        fired = ", ".join(f"{n} x{c}" for n, c in sorted(self.fired.items())) or "none"
        missed = ", ".join(sorted(self.not_reached)) or "none"
        return (f"crash test seed {self.seed}: {self.rounds} rounds in {self.elapsed:.0f} s, "
                f"{self.operations} operations, {self.kill_points} kill points exercised "
                f"({', '.join(f'{k} {v}' for k, v in sorted(self.kills.items()))}); "
                f"in-flight operations: {self.took_effect} took effect, {self.rolled_back} "
                f"rolled back; failpoints fired: {fired}; chosen but not reached: {missed}")


class CrashTest:
    """One run on one pool: a model, a daemon, and the rounds."""

    def __init__(self, tree: MountedTree, seed: int, budget: float,
                 say: Callable[[str], None] = print) -> None:
        self.tree = tree
        self.rng = random.Random(seed)
        self.report = Report(seed, budget)
        self.model: Model = {}
        self.counter = 0
        self.durations: dict[str, list[float]] = {}
        self.say = say
        self.history: list[str] = []  # this round, for failure messages
        self.log_mark = 0
        self.base_size = 0
        self.failpoint_order: list[str] = []

    def fail(self, why: str) -> None:
        log = self.tree.log()[self.log_mark:]
        raise CrashTestFailure(
            f"seed {self.report.seed}, round {self.report.rounds}: {why}\n"
            f"this round: {'; '.join(self.history)}\n"
            f"replay: python -m tests.torture.crash --seed {self.report.seed} "
            f"--budget {self.report.budget:.0f}\n"
            f"daemon log since the last start (last lines):\n"
            + "\n".join(log.splitlines()[-25:]))

    # -- operations ---------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def choose(self, kinds: tuple[str, ...] | None = None) -> Operation | None:
        """A random operation the model allows (of ``kinds``, when given)."""
        model, rng = self.model, self.rng
        by_kind = {kind: [n for n, s in model.items() if s.kind == kind]
                   for kind in ("active", "view", "committed")}
        leaves = [n for n in model if not any(s.parent == n for s in model.values())]
        labelled = [n for n, s in model.items() if s.labels]
        mounted_on_demand = by_kind["committed"] + by_kind["view"]
        weights = {"mkdir": 20, "view": 5, "write": 20, "commit": 15, "rename": 6,
                   "label": 12, "unlabel": 4, "rmdir": 10 if len(model) < MAX_NODES else 60,
                   "readlink": 3}
        possible = {
            "mkdir": len(model) < MAX_NODES + 2, "view": bool(by_kind["committed"]),
            "write": bool(by_kind["active"]), "commit": bool(by_kind["active"]),
            "rename": bool(by_kind["committed"]), "label": bool(model),
            "unlabel": bool(labelled), "rmdir": bool(leaves), "readlink": bool(mounted_on_demand)}
        choices = [k for k in (kinds or tuple(weights)) if possible[k]]
        if not choices:
            return None
        kind = rng.choices(choices, [weights[k] for k in choices])[0]
        if kind in ("mkdir", "view"):
            parents = by_kind["committed"] + ([None] if kind == "mkdir" else [])
            return Operation(kind, self.fresh("n" if kind == "mkdir" else "v"),
                             parent=rng.choice(parents))
        if kind == "write":
            return Operation(kind, rng.choice(by_kind["active"]), key=self.fresh("f"),
                             data=rng.randbytes(rng.choice([1, 100, 4096, 20000])))
        if kind in ("commit", "rename"):
            source = by_kind["active" if kind == "commit" else "committed"]
            return Operation(kind, rng.choice(source), target=self.fresh("c"))
        if kind == "label":
            return Operation(kind, rng.choice(list(model)), key=rng.choice(["a", "b", "c"]),
                             data=self.fresh("value-").encode())
        if kind == "unlabel":
            name = rng.choice(labelled)
            return Operation(kind, name, key=rng.choice(sorted(model[name].labels)))
        if kind == "rmdir":
            return Operation(kind, rng.choice(leaves))
        return Operation(kind, rng.choice(mounted_on_demand))

    def run_operation(self, operation: Operation, kill_after: float | None = None
                      ) -> tuple[int, bool]:
        """Do it in a thread; with ``kill_after``, SIGKILL the daemon that many
        seconds in.  Returns (errno, whether it had finished before the kill)."""
        outcome: dict[str, int] = {}
        finished = threading.Event()
        model = self.model

        def work() -> None:
            began = time.monotonic()
            outcome["code"] = errno_of(lambda: operation.perform(self.tree, model))
            if outcome["code"] == 0:
                self.durations.setdefault(operation.kind, []).append(time.monotonic() - began)
            finished.set()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        finished_first = True
        if kill_after is not None:
            finished.wait(kill_after)  # a random moment into the operation, not a state
            finished_first = finished.is_set()
            self.kill()
        if not finished.wait(OPERATION_TIMEOUT):
            self.fail(f"{operation} hung for {OPERATION_TIMEOUT} s")
        self.report.operations += 1
        return outcome["code"], finished_first

    def typical(self, kind: str) -> float:
        seen = self.durations.get(kind)
        return statistics.median(seen) if seen else 0.05

    def step(self, operation: Operation) -> None:
        """An operation with the daemon running normally: it must succeed."""
        self.history.append(str(operation))
        code, _ = self.run_operation(operation)
        if code:
            self.fail(f"{operation} failed with {errno_name(code)} (no kill involved)")
        self.model = operation.apply(self.model)

    # -- the daemon -----------------------------------------------------------------
    def kill(self) -> None:
        if self.tree.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.tree.pid, 9)

    def wait_dead(self) -> None:
        if self.tree.pid is not None:
            self.tree.wait_stopped()
        clear_dead_mount(self.tree)

    def start(self, failpoint: str | None = None) -> tuple[bool, str]:
        """dmfs mount; (mounted, the command's stderr)."""
        self.log_mark = len(self.tree.log())
        result = start(self.tree, f"{failpoint}=kill" if failpoint else None)
        return result.returncode == 0, result.stderr

    def start_or_fail(self) -> None:
        mounted, stderr = self.start()
        if not mounted:
            self.fail(f"dmfs mount failed after a kill:\n{stderr}")

    def check_report(self, *, served: bool) -> CheckResult:
        result = check(self.tree.config)
        if result.report is None or result.returncode not in (0, 1):
            self.fail(f"dmfs check could not report: {result.describe()}")
        if served and not result.clean:
            self.fail(f"after the restart: {result.describe()}")
        return result

    def set_base_size(self, size: str) -> None:
        config = self.tree.config
        text = re.sub(r'base_image_size = "[^"]*"', f'base_image_size = "{size}"',
                      config.read_text())
        config.write_text(text)

    # -- after a kill ---------------------------------------------------------------
    def recover(self, candidates: list[tuple[str, Model]], redo: Operation | None) -> None:
        """The checks after every kill; ``candidates`` are the states the tree may
        be in (named for messages)."""
        self.wait_dead()
        self.check_report(served=False)
        self.start_or_fail()
        self.verify(candidates, redo)
        self.second_restart_changes_nothing()

    def verify(self, candidates: list[tuple[str, Model]], redo: Operation | None) -> None:
        problems = daemon_problems(self.tree, self.log_mark)
        if problems:
            self.fail("after the restart: " + "; ".join(problems))
        seen = observe(self.tree)
        tried = []
        for label, expected in candidates:
            wrong = differences(expected, seen)
            if not wrong:
                self.model = expected
                if label == "rolled back":
                    self.report.rolled_back += 1
                    if redo is not None:  # the names it used are free again
                        self.step(redo)
                elif label == "took effect":
                    self.report.took_effect += 1
                break
            tried.append(f"{label}: " + "; ".join(wrong))
        else:
            self.fail("the tree matches no allowed outcome:\n  " + "\n  ".join(tried))
        mismatch = tree_matches_snapshots(self.tree)
        if mismatch:
            self.fail("the tree and snapshots.json disagree: " + "; ".join(mismatch))
        faulty = faulty_snapshots(self.tree)
        if faulty:
            self.fail(f"Faulty after the restart: {faulty}")
        self.check_report(served=True)

    def second_restart_changes_nothing(self) -> None:
        before = (read_snapshots(self.tree), self.check_report(served=True).report)
        self.kill()
        self.report.kills["idle (second restart)"] += 1
        self.wait_dead()
        self.start_or_fail()
        after = (read_snapshots(self.tree), self.check_report(served=True).report)
        if after != before:
            self.fail("a second restart changed something:\n"
                      f"before {json.dumps(before)[:1500]}\nafter  {json.dumps(after)[:1500]}")
        problems = daemon_problems(self.tree, self.log_mark)
        if problems:
            self.fail("after the second restart: " + "; ".join(problems))

    def outcomes(self, operation: Operation, code: int, finished_first: bool
                 ) -> list[tuple[str, Model]]:
        after = operation.apply(self.model)
        if code == 0:  # it answered success: it must have taken effect, crash or not
            return [("done", after)]
        if finished_first:  # refused before the kill: nothing may have changed
            return [("refused", self.model)]
        return [("rolled back", self.model), ("took effect", after)]

    def fired_points(self, stderr: str = "") -> list[str]:
        return FIRED.findall(stderr + self.tree.log()[self.log_mark:])

    # -- rounds ---------------------------------------------------------------------
    def warm_up(self, count: int) -> None:
        for _ in range(count):
            operation = self.choose()
            if operation is not None:
                self.step(operation)

    def round_idle(self) -> None:
        self.warm_up(self.rng.randint(1, 4))
        self.history.append("kill (idle)")
        self.kill()
        self.report.kills["idle"] += 1
        self.recover([("unchanged", self.model)], None)

    def round_in_flight(self) -> None:
        self.warm_up(self.rng.randint(0, 3))
        operation = self.choose()
        if operation is None:
            return
        delay = self.rng.uniform(0, 1.5 * self.typical(operation.kind))
        self.history.append(f"{operation} with a kill after {delay * 1000:.1f} ms")
        code, finished_first = self.run_operation(operation, kill_after=delay)
        self.history[-1] += f": {errno_name(code)}"
        self.report.kills["in flight"] += 1
        self.recover(self.outcomes(operation, code, finished_first), operation)

    def next_failpoint(self) -> str:
        if not self.failpoint_order:  # every name once, in a random order, then again
            self.failpoint_order = list(FAILPOINTS)
            self.rng.shuffle(self.failpoint_order)
        return self.failpoint_order.pop()

    def round_failpoint(self) -> None:
        point = self.next_failpoint()
        self.warm_up(self.rng.randint(0, 2))
        if point.startswith("base:"):
            self.base_size ^= 1
            self.set_base_size(BASE_SIZES[self.base_size])
        self.history.append(f"restart with DMFS_FAILPOINT={point}")
        self.kill()  # an idle kill, and a restart with the point armed
        self.wait_dead()
        mounted, stderr = self.start(point)
        if not mounted:
            fired = self.fired_points(stderr)
            if point not in fired:
                self.fail(f"dmfs mount with DMFS_FAILPOINT={point} failed, but the "
                          f"failpoint did not fire:\n{stderr}")
            self.report.fired[point] += 1
            self.report.kills["failpoint at start"] += 1
            self.history.append(f"{point} fired while starting")
            self.recover([("unchanged", self.model)], None)
            return
        kinds = next((v for k, v in REACHED_BY.items() if point.startswith(k)), None)
        for _ in range(FAILPOINT_OPERATIONS):
            operation = self.choose(kinds) or self.choose()
            if operation is None:
                break
            self.history.append(str(operation))
            code, _ = self.run_operation(operation)
            self.history[-1] += f": {errno_name(code)}"
            if self.fired_points():
                self.report.fired[point] += 1
                self.report.kills["failpoint"] += 1
                self.recover(self.outcomes(operation, code, finished_first=False), operation)
                return
            if code:
                self.fail(f"{operation} failed with {errno_name(code)}, and {point} did "
                          "not fire")
            self.model = operation.apply(self.model)
        self.report.not_reached[point] += 1
        self.history.append(f"{point} not reached: kill (idle)")
        self.kill()
        self.report.kills["idle"] += 1
        self.recover([("unchanged", self.model)], None)

    def run(self) -> Report:
        began = time.monotonic()
        self.say(f"crash test: seed {self.report.seed}, budget {self.report.budget:.0f} s "
                 f"(replay: python -m tests.torture.crash --seed {self.report.seed} "
                 f"--budget {self.report.budget:.0f})")
        self.start_or_fail()
        rounds = [self.round_idle, self.round_in_flight, self.round_in_flight,
                  self.round_failpoint, self.round_failpoint]
        while time.monotonic() - began < self.report.budget:
            self.report.rounds += 1
            self.history = []
            self.rng.choice(rounds)()
            self.report.elapsed = time.monotonic() - began
        self.report.elapsed = time.monotonic() - began
        self.say(self.report.summary())
        return self.report


def run_on_fresh_pool(seed: int, budget: float, say: Callable[[str], None] = print
                      ) -> Report:
    """A pool, a config and a mountpoint of its own, torn down afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="dmfs-crash-", dir="/dev/shm"))
    try:
        with loop_pool(scratch) as pool:
            config = write_config(scratch, pool.name, base_image_size=BASE_SIZES[0])
            tree = MountedTree(config, scratch / "mnt", scratch / "run")
            try:
                return CrashTest(tree, seed, budget, say).run()
            finally:
                tree.cleanup()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture.crash",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds of rounds (the last round finishes)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    try:
        run_on_fresh_pool(seed, args.budget)
    except CrashTestFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

