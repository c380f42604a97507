"""What the torture tests check after every ordeal, through the mount and the CLI only.

A daemon that behaves: it is alive (its pid exists and the mount answers), its
log has no traceback, ``.dmfs/snapshots.json`` always reads and parses,
nothing is Faulty, the tree and ``snapshots.json`` list the same nodes, and
``dmfs check`` finds journal and pool in agreement.  Also: seeds (printed,
replayable), processes that act in parallel (fork: threads would be
serialised by the GIL), and the errnos DESIGN.md §1 documents.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dmfs.fuse.names import encode_key
from tests.support.loop_pool import run
from tests.support.tree import MountedTree, dmfs

T = TypeVar("T")
SEED_VARIABLE = "DMFS_TORTURE_SEED"
TRACEBACK = "Traceback (most recent call last)"
FAULTY_LOG_LINE = "marking it Faulty"

#: every errno DESIGN.md §1 gives a meaning in the tree, with the kernel's own
#: answers for names and xattrs (ENOENT, ENODATA, ENOTSUP; E2BIG and ERANGE for
#: label sizes, as Linux filesystems answer).  EIO is not here: it is the last
#: resort for a failure nobody expected, or an injected fault.
DOCUMENTED_ERRNOS = frozenset({
    errno.EPERM, errno.EEXIST, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOSPC,
    errno.ENOTEMPTY, errno.EBUSY, errno.EROFS, errno.EACCES, errno.ENOENT, errno.ENODATA,
    errno.ENOTSUP, errno.E2BIG, errno.ERANGE})


def errno_name(code: int) -> str:
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


# ---- seeds -------------------------------------------------------------------------
def choose_seed() -> int:
    """The seed from DMFS_TORTURE_SEED, or a fresh one (printed by the caller)."""
    text = os.environ.get(SEED_VARIABLE)
    return int(text) if text else random.SystemRandom().randrange(2**32)


def scaled(steps: int) -> int:
    """Fewer steps of a churn under systemd-udevd: every device-mapper operation
    waits for udev there, and the same work takes five to six times as long."""
    from dmfs.pool.udev import udevd_running

    return max(1, steps // 3) if udevd_running() else steps


# ---- the daemon --------------------------------------------------------------------
def mount_answers(mountpoint: Path, timeout: float = 20.0) -> str | None:
    """None when the mount lists its root within ``timeout``; else what went wrong.

    The listing runs in another process, so a daemon that hangs fails the
    check instead of hanging the test."""
    try:
        result = subprocess.run(["ls", "-a", str(mountpoint)], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"listing {mountpoint} hung for {timeout} s"
    if result.returncode != 0:
        return f"listing {mountpoint} failed: {result.stderr.strip()}"
    if ".dmfs" not in result.stdout.split():
        return f"{mountpoint} is not a dmfs tree (no .dmfs): {result.stdout!r}"
    return None


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` in /proc (R, S, D, T (stopped), Z, ...),
    None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    except OSError:
        return None


def pid_alive(pid: int | None) -> bool:
    # A zombie has a pid too; a dead daemon is reaped by init in the guest.
    return pid is not None and process_state(pid) not in (None, "Z")


def pid_stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped by a signal (a ``=stop`` failpoint)."""
    return pid is not None and process_state(pid) == "T"


def daemon_problems(tree: MountedTree, since: int = 0) -> list[str]:
    """What is wrong with the daemon now: dead, mount not answering, tracebacks
    or Faulty markings in its log (from byte offset ``since``)."""
    problems = []
    if not pid_alive(tree.pid):
        problems.append(f"the daemon (pid {tree.pid}) is dead")
    else:
        answer = mount_answers(tree.mountpoint)
        if answer:
            problems.append(answer)
    log = tree.log()[since:]
    if TRACEBACK in log:
        problems.append("the daemon's log has a traceback:\n" + traceback_excerpt(log))
    if FAULTY_LOG_LINE in log:
        lines = [line for line in log.splitlines() if FAULTY_LOG_LINE in line]
        problems.append("the daemon marked devices Faulty:\n" + "\n".join(lines[:5]))
    return problems


def traceback_excerpt(log: str, keep: int = 30) -> str:
    """The log line before the first traceback and the traceback's last lines
    (where the exception is named), without exception groups' box drawing."""
    start = log.find(TRACEBACK)
    before = log[:start].splitlines()[-1:]
    block = []
    for line in log[start:].splitlines():
        if block and re.match(r"\d{4}-\d\d-\d\d ", line):
            break  # the next log record
        if not re.fullmatch(r"[\s|+-]*", line):
            block.append(line)
    if len(block) > keep:
        block = [block[0], f"  ... {len(block) - keep} lines ...", *block[-keep:]]
    return "\n".join(before + block)


def assert_daemon_healthy(tree: MountedTree, since: int = 0, what: str = "") -> None:
    problems = daemon_problems(tree, since)
    assert not problems, f"{what}: " + "\n".join(problems) if what else "\n".join(problems)


# ---- reading the tree --------------------------------------------------------------
def read_snapshots(tree: MountedTree) -> list[dict[str, Any]]:
    """``.dmfs/snapshots.json``'s snapshots; any error reading or parsing it fails."""
    path = tree.path(".dmfs", "snapshots.json")
    try:
        text = path.read_text()
    except OSError as error:
        raise AssertionError(f"reading {path} failed: {errno_name(error.errno or 0)} "
                             f"({error})") from None
    try:
        document = json.loads(text)
    except ValueError as error:
        raise AssertionError(f"{path} does not parse ({error}): {text[:200]!r}") from None
    return document["snapshots"]


def node_path(snapshots: list[dict[str, Any]], name: str) -> tuple[str, ...]:
    """The node's entry names from the root down, as seen in the tree."""
    parents = {s["name"]: s["parent"] for s in snapshots}
    names: list[str] = []
    current: str | None = name
    while current is not None:
        names.append(encode_key(current))
        current = parents[current]
    return tuple(reversed(names))


def walk_tree(mountpoint: Path) -> dict[tuple[bytes, ...], bytes]:
    """Every node in the tree (its path as entry names) -> user.dmfs.kind."""
    found: dict[tuple[bytes, ...], bytes] = {}

    def visit(directory: bytes, path: tuple[bytes, ...]) -> None:
        for name in os.listdir(directory):
            if (not path and name == b".dmfs") or (path and name == b"fs"):
                continue
            child = os.path.join(directory, name)
            found[(*path, name)] = os.getxattr(child, "user.dmfs.kind")
            visit(child, (*path, name))

    visit(os.fsencode(mountpoint), ())
    return found


def tree_matches_snapshots(tree: MountedTree) -> list[str]:
    """Differences between the directory tree and snapshots.json (empty: none)."""
    snapshots = read_snapshots(tree)
    from_json = {tuple(os.fsencode(n) for n in node_path(snapshots, s["name"])):
                 s["kind"].encode() for s in snapshots}
    seen = walk_tree(tree.mountpoint)
    problems = []
    for path in sorted(set(from_json) | set(seen)):
        shown = "/".join(os.fsdecode(p) for p in path)
        if path not in seen:
            problems.append(f"{shown}: in snapshots.json, not in the tree")
        elif path not in from_json:
            problems.append(f"{shown}: in the tree, not in snapshots.json")
        elif seen[path] != from_json[path]:
            problems.append(f"{shown}: kind {seen[path]!r} in the tree, "
                            f"{from_json[path]!r} in snapshots.json")
    return problems


def faulty_snapshots(tree: MountedTree) -> list[str]:
    """Snapshots and devices the daemon reports Faulty (snapshots.json, .dmfs/pool)."""
    found = [f"{s['name']} ({s['state']})" for s in read_snapshots(tree)
             if s["state"] == "Faulty"]
    pool = dict(line.split(": ", 1) for line in
                tree.path(".dmfs", "pool").read_text().splitlines() if ": " in line)
    if pool.get("faulty_devices", "none") != "none":
        found.append(f"faulty devices {pool['faulty_devices']}")
    return found


# ---- the CLI -----------------------------------------------------------------------
@dataclass
class CheckResult:
    """``dmfs check CONFIG --json``: exit status, the report, stderr."""

    returncode: int
    report: dict[str, Any] | None
    stderr: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and self.report is not None and self.report["ok"]

    def describe(self) -> str:
        if self.report is None:
            return f"dmfs check exited {self.returncode} without a report: {self.stderr}"
        problems = [f["message"] for f in self.report["findings"] if f["problem"]]
        return f"dmfs check exited {self.returncode}: " + ("; ".join(problems) or "no problems")


def check(config: Path, *extra: str, env: dict[str, str] | None = None) -> CheckResult:
    """``dmfs check CONFIG --json``.  In this process (the command's own ``main``,
    without its 2-3 s of Python start-up in the guest), or with ``env`` as a
    command of its own (e.g. with DMFS_FAILPOINT set)."""
    if env is not None:
        result = dmfs("check", str(config), "--json", *extra, check=False, env=env)
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        from dmfs.cli import main

        out, err = io.StringIO(), io.StringIO()
        logger = logging.getLogger("dmfs")
        saved = (list(logger.handlers), logger.level)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                returncode = main(["check", str(config), "--json", *extra])
        finally:
            logger.handlers[:], level = saved
            logger.setLevel(level)
        stdout, stderr = out.getvalue(), err.getvalue()
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    return CheckResult(returncode, report, stderr)


def environment_without_failpoints() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DMFS_FAILPOINT"}


def start(tree: MountedTree, failpoints: str | None = None) -> subprocess.CompletedProcess[str]:
    """``dmfs mount`` with DMFS_FAILPOINT set (or unset) for it and its daemon; the
    tree's pid is set when it mounted.  Never raises for a failed mount."""
    with contextlib.suppress(FileExistsError):
        tree.mountpoint.mkdir()
    env = environment_without_failpoints()
    if failpoints:
        env["DMFS_FAILPOINT"] = failpoints
    result = subprocess.run(
        [*dmfs_command(), "mount", str(tree.config), str(tree.mountpoint)],
        capture_output=True, text=True, timeout=300, check=False, env=env)
    tree.pid = (int((tree.runtime_dir / "dmfs.pid").read_text())
                if result.returncode == 0 else None)
    return result


def dmfs_command() -> list[str]:
    return [sys.executable, "-m", "dmfs"]


def kill_daemon(tree: MountedTree) -> None:
    """SIGKILL the daemon, wait for it to go, detach its dead mount (umount -l)."""
    if tree.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tree.pid, signal.SIGKILL)
        tree.wait_stopped()
    clear_dead_mount(tree)


def clear_dead_mount(tree: MountedTree) -> None:
    if tree.is_mounted():
        run("umount", "-l", str(tree.mountpoint))


def pool_held_metadata_root(pool_name: str) -> str:
    """The held metadata root field of the pool's status ('-' when none is held)."""
    fields = run("dmsetup", "status", pool_name).stdout.split()
    return fields[6]  # start length thin-pool <transaction> <meta> <data> <held root>


def live_thin_devices(pool_name: str) -> list[str]:
    names = run("dmsetup", "ls").stdout.split()[::2]
    return sorted(n for n in names if n.startswith(pool_name + "-") and n != pool_name)


# ---- processes in parallel ---------------------------------------------------------
def in_processes(count: int, work: Callable[[int], T], timeout: float = 300.0) -> list[T]:
    """Run ``work(index)`` in ``count`` forked processes at once; their results
    (JSON-serialisable), in index order.  A worker that raises fails the caller
    with its traceback."""
    children: list[tuple[int, int]] = []
    for index in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            status = 1
            try:
                payload = {"result": work(index)}
                status = 0
            except BaseException:
                payload = {"error": traceback.format_exc()}
            try:
                with os.fdopen(write_end, "w") as pipe:
                    json.dump(payload, pipe)
            finally:
                os._exit(status)
        os.close(write_end)
        children.append((pid, read_end))
    results: list[T] = []
    errors = []
    deadline = time.monotonic() + timeout
    for index, (pid, read_end) in enumerate(children):
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            for other, _ in children[index:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)
            raise AssertionError(f"worker {index} did not finish within {timeout} s")
        with os.fdopen(read_end) as pipe:
            text = pipe.read()
        os.waitpid(pid, 0)
        payload = json.loads(text) if text else {"error": "the worker died without a word"}
        if "error" in payload:
            errors.append(f"worker {index}:\n{payload['error']}")
        results.append(payload.get("result"))
    assert not errors, "\n".join(errors)
    return results
