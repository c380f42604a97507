"""dmfs killed (SIGKILL) while containerd unpacks an image into it.

containerd keeps its own database: what an interrupted unpack leaves in dmfs is
a snapshot containerd no longer names (the unpack removed its record when the
request failed, or never got the answer that would have made one).  containerd
removes such snapshots itself, with its garbage collector, the next time that
collector runs over dmfs, which a removal of any dmfs snapshot through
containerd triggers.  These tests kill dmfs at a fixed step (a failpoint that
kills) and from outside while a failpoint holds it stopped after the first
layer's commit is recorded (a crash between layers), restart it as its service
manager would, and check that containerd's next request succeeds once its
connection to dmfs is back (grpc-go reconnects with a backoff of at most 3 s;
until then containerd answers Unavailable) and that, after that collection,
nothing is left that containerd does not know.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.containerd import (
    CTR,
    DMFS_SNAPSHOTTER,
    NAMESPACE,
    Stack,
    collect_garbage,
    scratch_containerd_stack,
    socket_answers,
)
from tests.support.torture import (
    assert_daemon_healthy,
    check,
    clear_dead_mount,
    faulty_snapshots,
    pid_stopped,
    read_snapshots,
    start,
    tree_matches_snapshots,
)
from tests.support.tree import wait_until


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with scratch_containerd_stack("dmfs-ctd-crash-", layers=3) as stack:
        yield stack


def import_command(stack: Stack) -> list[str]:
    return [CTR, "--address", str(stack.containerd.address), "--namespace", NAMESPACE,
            "images", "import", "--snapshotter", DMFS_SNAPSHOTTER, str(stack.image.archive)]


def containerd_names(stack: Stack) -> set[str]:
    """The snapshots containerd's database names in the dmfs snapshotter."""
    lines = stack.containerd.snapshots(DMFS_SNAPSHOTTER, "ls").stdout.splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def orphans(stack: Stack) -> list[str]:
    """dmfs's snapshots that containerd does not name (its key's name part is
    not in containerd's list, or an older key of a name it has again)."""
    known = containerd_names(stack)
    newest: dict[str, int] = {}
    keys = [s["name"] for s in read_snapshots(stack.tree)]
    for key in keys:
        _, number, name = key.split("/", 2)
        newest[name] = max(newest.get(name, -1), int(number))
    return sorted(key for key in keys
                  if key.split("/", 2)[2] not in known
                  or int(key.split("/", 2)[1]) != newest[key.split("/", 2)[2]])


def containerd_reaches_dmfs(stack: Stack) -> bool:
    """Whether a request containerd passes on to dmfs (a Prepare) succeeds now."""
    probe = stack.containerd.snapshots(DMFS_SNAPSHOTTER, "prepare", "reconnect-probe",
                                       check=False)
    if probe.returncode != 0:
        assert "unavailable" in probe.stderr, probe.stderr  # nothing but the connection
        return False
    stack.containerd.snapshots(DMFS_SNAPSHOTTER, "rm", "reconnect-probe")
    return True


def after_the_crash(stack: Stack, interrupted: subprocess.CompletedProcess[str],
                    record: list[str]) -> None:
    """dmfs is dead: restart it, import again, collect, and check the pool."""
    assert interrupted.returncode != 0, "the import finished before dmfs died"
    clear_dead_mount(stack.tree)
    since = len(stack.tree.log())
    stack.restart_dmfs()
    restarted = time.monotonic()
    record.append(f"left by the interrupted import: {orphans(stack)}")
    # containerd's connection to the proxy backs off while dmfs is down (grpc-go,
    # at most 3 s for proxy plugins in containerd 1.6): until it reconnects, its
    # requests fail with Unavailable
    wait_until(lambda: containerd_reaches_dmfs(stack), 30, "containerd to reconnect")
    record.append(f"containerd reached dmfs again {time.monotonic() - restarted:.1f} s "
                  "after dmfs's socket answered")
    # containerd's next request: the same import, which must succeed
    again = subprocess.run(import_command(stack), capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr
    left = [key for key in orphans(stack) if not key.endswith("/reconnect-probe")]
    record.append(f"left after the restart and a new import: {left}")
    collect_garbage(stack)
    assert orphans(stack) == []
    # the image is whole: its layers are the only snapshots in the pool
    names = {s["name"].split("/", 2)[2] for s in read_snapshots(stack.tree)}
    assert names == set(stack.image.chain_ids)
    assert_daemon_healthy(stack.tree, since, "after the restart")
    assert not faulty_snapshots(stack.tree) and not tree_matches_snapshots(stack.tree)
    stack.containerd.ctr("images", "rm", "--sync", stack.image.name)
    wait_until(lambda: not read_snapshots(stack.tree), 30, "the image's layers to go")
    result = check(stack.tree.config)
    assert result.clean, result.describe()


def restart_with(stack: Stack, failpoints: str) -> None:
    """dmfs unmounted and started again with ``failpoints`` armed, its socket
    answering, and containerd's connection to it back: containerd may have
    connected to the dmfs that stopped, and then backs off before it reconnects
    (a request meanwhile is Unavailable, and would never reach the failpoint)."""
    stack.tree.unmount()
    started = start(stack.tree, failpoints)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: socket_answers(stack.socket), 30, "dmfs's socket")
    wait_until(lambda: containerd_reaches_dmfs(stack), 30, "containerd to reconnect")


def test_killed_at_the_first_commit_of_an_import(stack: Stack,
                                                 session_note: Callable[[str], None]) -> None:
    restart_with(stack, "commit:after-intent=kill")
    interrupted = subprocess.run(import_command(stack), capture_output=True, text=True,
                                 timeout=300, check=False)
    assert interrupted.returncode != 0, "the import finished without reaching the failpoint"
    stack.tree.wait_stopped()  # the failpoint killed it
    record: list[str] = []
    after_the_crash(stack, interrupted, record)
    session_note(f"kill at commit:after-intent during ctr images import: {'; '.join(record)}")


def test_killed_from_outside_between_layers(stack: Stack,
                                            session_note: Callable[[str], None]) -> None:
    # The image's layers are small: the whole import takes less time than a look at
    # the tree, so a kill timed by looking would land after the import.  dmfs stops
    # itself instead once it has recorded the first layer's commit, before it
    # answers, and the kill comes from outside, to a process the test holds there.
    restart_with(stack, "commit:after-record=stop*1")
    importing = subprocess.Popen(import_command(stack), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    wait_until(lambda: pid_stopped(stack.tree.pid), 60, "dmfs to stop after the first layer")
    assert stack.tree.pid is not None
    os.kill(stack.tree.pid, signal.SIGKILL)
    stack.tree.wait_stopped()
    stdout, stderr = importing.communicate(timeout=300)
    record: list[str] = []
    after_the_crash(stack, subprocess.CompletedProcess(importing.args, importing.returncode,
                                                       stdout, stderr), record)
    session_note(f"kill -9 from outside after the first layer's commit of ctr images import: "
                 f"{'; '.join(record)}")
