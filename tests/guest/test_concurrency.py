"""Several processes using the tree at once, as scripts sharing a pool would.

Each process (a fork: threads would be serialised by the GIL) runs a seeded
mix of mkdir (and views), rmdir, commit and rename (mv), label changes,
listings and reads of ``.dmfs/pool`` and ``.dmfs/snapshots.json`` on names the
others use too, at the root and under committed parents (the kernel holds a
directory's lock across mkdir/rmdir/rename, so only work in different
directories reaches the daemon at the same time).  Every answer must be one a
race can explain (EEXIST, ENOENT, ...; never EIO), every read of ``.dmfs``
must succeed and parse; afterwards the tree equals snapshots.json, every
active snapshot is live and mounted, nothing is Faulty, the daemon is alive
with no traceback, and after it stops ``dmfs check`` is clean.
"""

from __future__ import annotations

import errno
import json
import os
import random

from tests.support.loop_pool import LoopPool
from tests.support.torture import (
    DOCUMENTED_ERRNOS,
    assert_daemon_healthy,
    check,
    errno_name,
    faulty_snapshots,
    in_processes,
    live_thin_devices,
    node_path,
    read_snapshots,
    tree_matches_snapshots,
)
from tests.support.tree import MountedTree, errno_of

PROCESSES = 6
STEPS = 40
PARENTS = ["P0", "P1"]  # committed, never removed: where the work happens besides the root
ACTIVE_NAMES = [f"n{i}" for i in range(5)]
COMMITTED_NAMES = [f"m{i}" for i in range(4)]

#: what a race between these operations can explain
ALLOWED = {
    "mkdir": {0, errno.EEXIST},
    "view": {0, errno.EEXIST},
    "rmdir": {0, errno.ENOENT, errno.EBUSY},
    "mv": {0, errno.ENOENT, errno.EEXIST, errno.EPERM, errno.EBUSY},
    "label": {0, errno.ENOENT, errno.ENOTSUP},
    "unlabel": {0, errno.ENOENT, errno.ENOTSUP, errno.ENODATA},
    "usage": {0, errno.ENOENT, errno.ENODATA},
    "list": {0, errno.ENOENT},
    "pool": {0},
    "snapshots": {0},
}
assert all(codes <= DOCUMENTED_ERRNOS | {0} for codes in ALLOWED.values())

#: how often each operation comes: creations, removals and snapshots.json renders
#: most, since they are what races
WEIGHTS = {"mkdir": 3, "view": 1, "rmdir": 3, "mv": 2, "label": 1, "unlabel": 1, "usage": 1,
           "list": 1, "pool": 1, "snapshots": 3}


def read_control(tree: MountedTree, name: str) -> None:
    text = tree.path(".dmfs", name).read_text()
    if name == "snapshots.json":
        json.loads(text)  # a ValueError fails the worker with its traceback
    elif "mode: " not in text:
        raise AssertionError(f".dmfs/pool without a mode line: {text!r}")


def operate(tree: MountedTree, operation: str, rng: random.Random, label: str) -> None:
    """One operation on names the other processes use too."""
    directory = tree.path(rng.choice(["", *PARENTS]))
    active = directory / rng.choice(ACTIVE_NAMES)
    node = directory / rng.choice(ACTIVE_NAMES + COMMITTED_NAMES)
    if operation == "mkdir":
        active.mkdir()
    elif operation == "view":
        os.mkdir(active, 0o555)
    elif operation == "rmdir":
        node.rmdir()
    elif operation == "mv":
        active.rename(directory / rng.choice(COMMITTED_NAMES))
    elif operation == "label":
        os.setxattr(node, f"user.label.{label}", label.encode())
    elif operation == "unlabel":
        os.removexattr(node, f"user.label.{label}")
    elif operation == "usage":
        os.getxattr(node, "user.dmfs.usage")
    elif operation == "list":
        os.listdir(directory)
    else:
        read_control(tree, "pool" if operation == "pool" else "snapshots.json")


def worker(tree: MountedTree, seed: int) -> dict[str, int]:
    """One process's operations; the answers counted by "operation errno"."""
    rng = random.Random(seed)
    answers: dict[str, int] = {}
    for _ in range(STEPS):
        operation = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        code = errno_of(lambda operation=operation: operate(tree, operation, rng, f"w{seed}"))
        key = f"{operation} {errno_name(code)}"
        answers[key] = answers.get(key, 0) + 1
    return answers


def test_processes_sharing_the_tree(tree: MountedTree, thin_pool: LoopPool,
                                    torture_seed: int) -> None:
    for parent in PARENTS:
        tree.path(f"{parent}.w").mkdir()
        tree.path(f"{parent}.w").rename(tree.path(parent))
    results = in_processes(PROCESSES, lambda index: worker(tree, torture_seed + index))
    assert_daemon_healthy(tree, what=f"after {PROCESSES} processes (seed {torture_seed})")
    allowed = {f"{operation} {errno_name(code)}" for operation, codes in ALLOWED.items()
               for code in codes}
    for index, answers in enumerate(results):
        odd = {key: count for key, count in answers.items() if key not in allowed}
        assert not odd, f"process {index} (seed {torture_seed + index}): {odd}"
    assert not tree_matches_snapshots(tree), tree_matches_snapshots(tree)
    snapshots = read_snapshots(tree)
    for snapshot in snapshots:
        node = tree.path(*node_path(snapshots, snapshot["name"]))
        labels = {name[len("user.label."):]: os.getxattr(node, name).decode()
                  for name in os.listxattr(node) if name.startswith("user.label.")}
        assert labels == snapshot["labels"], f"labels of {snapshot['name']}"
        if snapshot["kind"] == "active":
            assert snapshot["state"] == "Activated", f"{snapshot['name']}: {snapshot['state']}"
            assert os.path.ismount(os.readlink(node / "fs")), f"{snapshot['name']} not mounted"
    assert not faulty_snapshots(tree)
    tree.unmount()
    assert live_thin_devices(thin_pool.name) == []
    result = check(tree.config)
    assert result.clean, result.describe()
