"""Using the tree the way people and scripts do: shell commands only.

A layered build checked against a plain directory at every node, what rm -r
and mv across parents do (and must not do), two mkdirs racing, and lookups
that keep working while another node's activation is stuck.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from dmfs.pool import fs
from tests.support.fsmodel import tree as describe
from tests.support.loop_pool import LoopPool, loop_pool, run
from tests.support.tree import MountedTree, errno_of, write_config


def sh(script: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                            check=False, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{script!r} exited {result.returncode}: {result.stderr}")
    return result


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_layered_build_matches_a_plain_directory_at_every_node(tree: MountedTree,
                                                              scratch_dir: Path,
                                                              fs_type: str) -> None:
    model = scratch_dir / "model"
    model.mkdir(mode=0o755)
    expected: dict[str, dict[str, tuple]] = {}
    m = tree.mountpoint

    def step(script: str, node: str) -> None:
        """Run the same script in the node's fs and in the model."""
        sh(script, cwd=m / node / "fs")
        sh(script, cwd=model)

    sh("mkdir base", cwd=m)
    mounts = {entry.mountpoint: entry for entry in fs.mountinfo()}
    assert mounts[Path(os.readlink(m / "base" / "fs"))].fs_type == fs_type
    step("mkdir -p etc usr/bin && echo root > etc/owner && printf 'x%.0s' $(seq 5000) > "
         "usr/bin/tool && chmod 755 usr/bin/tool && ln -s ../usr/bin/tool etc/tool", "base")
    sh("mv base base-c", cwd=m)
    expected["base-c"] = describe(model)
    parent = "base-c"
    layers = [
        "echo one > layer1 && echo changed > etc/owner && chmod 600 etc/owner",
        "rm etc/tool && mkdir -p var/log && cp etc/owner var/log/copy && ln var/log/copy hard",
        "rm -r var && mkdir var && echo again > var/new && mv layer1 layer-one",
    ]
    for number, script in enumerate(layers, start=1):
        sh(f"mkdir {parent}/l{number}", cwd=m)
        where = f"{parent}/l{number}"
        step(script, where)
        sh(f"mv {where} {parent}/l{number}-c", cwd=m)
        parent = f"{parent}/l{number}-c"
        expected[parent] = describe(model)
    sh(f"mkdir {parent}/top", cwd=m)
    step("echo top > top && chown 1000:1000 top", f"{parent}/top")
    expected[f"{parent}/top"] = describe(model)
    sh(f"mkdir -m 0555 {parent}/view", cwd=m)
    expected[f"{parent}/view"] = expected[parent]
    sh(f"mv {parent}/top {parent}/top-c", cwd=m)
    expected[f"{parent}/top-c"] = expected.pop(f"{parent}/top")

    # Browse it as a person would.
    listing = sh(f"ls {parent}", cwd=m).stdout.split()
    assert listing == ["fs", "top-c", "view"]
    assert sh(f"cat {parent}/top-c/fs/top", cwd=m).stdout == "top\n"
    found = sh("find -L . -path ./.dmfs -prune -o -name top -print", cwd=m).stdout.split()
    assert found == [f"./{parent}/top-c/fs/top"]
    for node, wanted in expected.items():
        assert describe(m / node / "fs") == wanted, node

    # Removal: only leaves first; a parent with children refuses.
    assert sh("rmdir base-c", cwd=m, check=False).returncode != 0
    nodes = sorted(expected, key=lambda n: n.count("/"), reverse=True)
    for node in nodes:
        sh(f"rmdir {node}", cwd=m)
    assert os.listdir(m) == [".dmfs"]


def test_rm_r_of_a_node_keeps_the_snapshot_and_its_files(tree: MountedTree) -> None:
    m = tree.mountpoint
    sh("mkdir work && echo precious > work/fs/data && mv work base && mkdir base/child", m)
    result = sh("rm -r base", m, check=False)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
    assert (m / "base" / "fs" / "data").read_text() == "precious\n"
    assert (m / "base" / "child" / "fs" / "data").read_text() == "precious\n"
    # Through the fs link the committed files are read-only.
    result = sh("rm -rf base/fs/", m, check=False)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert (m / "base" / "fs" / "data").read_text() == "precious\n"


def test_mv_to_another_parent_fails_and_copies_nothing(tree: MountedTree) -> None:
    m = tree.mountpoint
    sh("mkdir a && mv a a-c && mkdir b && mv b b-c && mkdir a-c/child && "
       "echo mine > a-c/child/fs/f", m)
    result = sh("mv a-c/child b-c/", m, check=False)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
    assert sorted(os.listdir(m / "b-c")) == ["fs"]  # no half-made copy
    assert (m / "a-c" / "child" / "fs" / "f").read_text() == "mine\n"
    snapshots = sh("ls .dmfs/by-name", m).stdout.split()
    assert snapshots == ["a-c", "b-c", "child"]


def race(calls: list) -> list[int]:  # type: ignore[type-arg]
    """Start the calls in threads at the same moment; their errnos."""
    barrier = threading.Barrier(len(calls))
    results: list[int] = [-1] * len(calls)

    def go(index: int) -> None:
        barrier.wait()
        results[index] = errno_of(calls[index])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_two_mkdirs_of_one_name_exactly_one_wins(tree: MountedTree) -> None:
    m = tree.mountpoint
    sh("mkdir p && mv p p-c && mkdir q && mv q q-c", m)
    for attempt in range(5):
        same_dir = race([lambda a=attempt: (m / f"same{a}").mkdir()] * 2)
        assert sorted(same_dir) == [0, errno.EEXIST], same_dir
        other_dirs = race([lambda a=attempt: (m / "p-c" / f"x{a}").mkdir(),
                           lambda a=attempt: (m / "q-c" / f"x{a}").mkdir()])
        assert sorted(other_dirs) == [0, errno.EEXIST], other_dirs
    listed = [n for n in os.listdir(m / "p-c") + os.listdir(m / "q-c") if n.startswith("x")]
    assert sorted(listed) == [f"x{a}" for a in range(5)]


def test_lookups_and_listings_go_on_while_an_activation_is_stuck(scratch_dir: Path) -> None:
    with loop_pool(scratch_dir, linear_data=True) as pool:
        tree = MountedTree(write_config(scratch_dir, pool.name), scratch_dir / "mnt",
                           scratch_dir / "run")
        try:
            tree.mount()
            browse_while_stuck(tree, pool)
        except BaseException:
            print("daemon log:\n" + tree.log())
            raise
        finally:
            tree.cleanup()


def browse_while_stuck(tree: MountedTree, pool: LoopPool) -> None:
    m = tree.mountpoint
    sh("mkdir slow && mv slow slow-c && mkdir other && mkdir other2 && mv other2 other-c", m)
    assert pool.data_linear is not None
    run("dmsetup", "suspend", pool.data_linear)  # every data I/O of the pool now waits
    stuck_result: list[object] = []
    stuck = threading.Thread(target=lambda: stuck_result.append(
        sorted(os.listdir(m / "slow-c" / "fs"))))  # activates and mounts: I/O
    try:
        stuck.start()
        stuck.join(timeout=2)
        assert stuck.is_alive(), "the activation should wait for the suspended pool"
        answers: list[object] = []
        browsing = threading.Thread(target=lambda: answers.extend([
            sorted(os.listdir(m)), sorted(os.listdir(m / "other-c")),
            os.getxattr(m / "other", "user.dmfs.kind"), os.stat(m / "other-c").st_nlink,
            len(os.listdir(m / ".dmfs" / "by-name"))]))
        browsing.start()
        browsing.join(timeout=60)
        assert not browsing.is_alive(), "browsing hung behind the stuck activation"
        assert answers == [[".dmfs", "other", "other-c", "slow-c"], ["fs"], b"active", 2, 3]
    finally:
        run("dmsetup", "resume", pool.data_linear)
    stuck.join(timeout=60)
    assert stuck_result == [["lost+found"]]


def test_cp_into_and_out_of_snapshots(tree: MountedTree, scratch_dir: Path) -> None:
    m = tree.mountpoint
    source = scratch_dir / "source"
    source.mkdir()
    for i in range(20):
        (source / f"f{i}").write_bytes(os.urandom(1000 * i))
    sh(f"mkdir img && cp -a {source}/. img/fs/ && mv img img-c", m)
    out = scratch_dir / "out"
    sh(f"cp -a img-c/fs/. {out}/", m)
    shutil.rmtree(out / "lost+found")
    assert describe(out) == describe(source) | {".": describe(out)["."]}
