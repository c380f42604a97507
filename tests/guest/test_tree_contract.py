"""Every row of DESIGN.md §1's table, through a real mount, with the exact errno.

Only what a shell user has: mkdir, rename, rmdir, open, xattrs, stat.  Each
refusal must also leave one line in the daemon's log saying why.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from tests.guest.test_pool_events import write_direct
from tests.support.loop_pool import loop_pool
from tests.support.tree import MountedTree, as_user, errno_of, renameat2, write_config

pytestmark = pytest.mark.no_udev_only

NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def committed(tree: MountedTree, name: str, parent: Path | None = None,
              files: dict[str, str] | None = None) -> Path:
    """mkdir + write files + mv: a committed node called ``name``."""
    where = parent or tree.mountpoint
    work = where / f"{name}.work"
    work.mkdir()
    for file, content in (files or {}).items():
        (work / "fs" / file).write_text(content)
    work.rename(where / name)
    return where / name


def refused(tree: MountedTree, code: int, call, operation: str) -> None:  # type: ignore[no-untyped-def]
    """``call`` fails with ``code`` and the daemon logged why."""
    before = tree.log().count(" refused ")
    assert errno_of(call) == code, f"{operation}: expected {errno.errorcode[code]}"
    log = tree.log()
    assert log.count(" refused ") == before + 1, f"{operation}: no log line\n{log}"
    assert f"({errno.errorcode[code]})" in log.splitlines()[-1]


def test_mkdir_at_root_prepares_an_empty_active_snapshot(tree: MountedTree) -> None:
    node = tree.path("first")
    node.mkdir()
    assert mode_of(node) == 0o755
    assert os.getxattr(node, "user.dmfs.kind") == b"active"
    assert sorted(os.listdir(node)) == ["fs"]
    fs = node / "fs"
    assert fs.is_symlink() and os.path.ismount(os.readlink(fs))
    assert os.listdir(fs) == ["lost+found"]
    (fs / "written").write_text("data")
    assert (fs / "written").read_text() == "data"


def test_mkdir_under_committed_prepares_a_child_with_its_content(tree: MountedTree) -> None:
    parent = committed(tree, "base", files={"a": "from base"})
    child = parent / "child"
    child.mkdir()
    assert os.getxattr(child, "user.dmfs.parent") == b"base"
    assert (child / "fs" / "a").read_text() == "from base"
    (child / "fs" / "a").write_text("changed in child")
    assert (parent / "fs" / "a").read_text() == "from base"


def test_mkdir_without_owner_write_bit_makes_a_view(tree: MountedTree) -> None:
    parent = committed(tree, "base", files={"a": "x"})
    view = parent / "look"
    os.mkdir(view, 0o555)
    assert mode_of(view) == 0o555
    assert os.getxattr(view, "user.dmfs.kind") == b"view"
    assert (view / "fs" / "a").read_text() == "x"
    assert errno_of(lambda: (view / "fs" / "new").write_text("no")) == errno.EROFS


def test_mkdir_under_active_or_view_is_eperm(tree: MountedTree) -> None:
    active = tree.path("active")
    active.mkdir()
    refused(tree, errno.EPERM, lambda: (active / "child").mkdir(), "mkdir under active")
    view = committed(tree, "base") / "view"
    os.mkdir(view, 0o555)
    refused(tree, errno.EPERM, lambda: (view / "child").mkdir(), "mkdir under view")


def test_mkdir_of_a_name_anywhere_in_the_pool_is_eexist(tree: MountedTree) -> None:
    base = committed(tree, "base")
    (base / "taken").mkdir()
    refused(tree, errno.EEXIST, lambda: tree.path("taken").mkdir(), "mkdir elsewhere")
    refused(tree, errno.EEXIST, lambda: (base / "base").mkdir(), "mkdir of the parent's name")
    # In the same directory the kernel finds the entry and answers itself.
    assert errno_of(lambda: (base / "taken").mkdir()) == errno.EEXIST


@pytest.mark.parametrize("name", ["fs", ".hidden", "bad%name", "%2e"])
def test_mkdir_of_reserved_or_invalid_names_is_einval(tree: MountedTree, name: str) -> None:
    refused(tree, errno.EINVAL, lambda: tree.path(name).mkdir(), f"mkdir {name}")


def test_mkdir_fs_inside_a_node_is_eexist(tree: MountedTree) -> None:
    base = committed(tree, "base")
    assert errno_of(lambda: (base / "fs").mkdir()) == errno.EEXIST


def test_encoded_names_carry_slashes_and_percent(tree: MountedTree) -> None:
    node = tree.path("default%2F1%2Fsha256:abc%25")
    node.mkdir()
    snapshots = json.loads(tree.path(".dmfs", "snapshots.json").read_text())["snapshots"]
    assert [s["name"] for s in snapshots] == ["default/1/sha256:abc%"]
    link = tree.path(".dmfs", "by-name", "default%2F1%2Fsha256:abc%25")
    assert os.path.samefile(link, node)


def test_mv_of_an_active_node_commits_it(tree: MountedTree) -> None:
    work = tree.path("work")
    work.mkdir()
    (work / "fs" / "f").write_text("kept")
    work.rename(tree.path("layer"))
    assert not work.exists()
    layer = tree.path("layer")
    assert mode_of(layer) == 0o555  # right away, not after the attribute timeout
    assert os.getxattr(layer, "user.dmfs.kind") == b"committed"
    assert (layer / "fs" / "f").read_text() == "kept"
    assert errno_of(lambda: (layer / "fs" / "g").write_text("no")) == errno.EROFS


def test_mv_of_a_committed_node_renames_it_and_children_follow(tree: MountedTree) -> None:
    base = committed(tree, "base", files={"a": "1"})
    (base / "child").mkdir()
    base.rename(tree.path("renamed"))
    assert os.getxattr(tree.path("renamed", "child"), "user.dmfs.parent") == b"renamed"
    assert tree.path("renamed", "child", "fs", "a").read_text() == "1"
    assert os.readlink(tree.path(".dmfs", "by-name", "child")) == "../../renamed/child"


def test_mv_of_a_view_is_eperm(tree: MountedTree) -> None:
    view = committed(tree, "base") / "view"
    os.mkdir(view, 0o555)
    refused(tree, errno.EPERM, lambda: view.rename(view.parent / "other"), "mv view")


def test_rename_to_another_parent_is_eperm(tree: MountedTree) -> None:
    first, second = committed(tree, "first"), committed(tree, "second")
    (first / "child").mkdir()
    refused(tree, errno.EPERM, lambda: (first / "child").rename(second / "child"),
            "rename to another parent")
    refused(tree, errno.EPERM, lambda: (first / "child").rename(tree.path("child2")),
            "rename to the root")


def test_rename_onto_an_existing_name_is_eexist_and_exchange_einval(tree: MountedTree
                                                                   ) -> None:
    committed(tree, "a")
    committed(tree, "b")
    refused(tree, errno.EEXIST, lambda: os.rename(tree.path("a"), tree.path("b")),
            "rename onto existing")
    assert errno_of(lambda: renameat2(tree.path("a"), tree.path("b"), 1)) == errno.EEXIST
    refused(tree, errno.EINVAL, lambda: renameat2(tree.path("a"), tree.path("b"), 2),
            "RENAME_EXCHANGE")
    assert os.path.isdir(tree.path("a")) and os.path.isdir(tree.path("b"))


def test_rmdir_removes_a_snapshot(tree: MountedTree) -> None:
    node = committed(tree, "gone", files={"f": "x"})
    device = os.getxattr(node, "user.dmfs.id")
    node.rmdir()
    assert not node.exists()
    assert not tree.path(".dmfs", "by-name", "gone").exists()
    snapshots = json.loads(tree.path(".dmfs", "snapshots.json").read_text())["snapshots"]
    assert str(device.decode()) not in [str(s["device_id"]) for s in snapshots]


def test_rmdir_with_children_is_enotempty(tree: MountedTree) -> None:
    base = committed(tree, "base")
    (base / "child").mkdir()
    refused(tree, errno.ENOTEMPTY, lambda: base.rmdir(), "rmdir with children")
    (base / "child").rmdir()
    base.rmdir()


def test_rmdir_of_a_node_in_use_is_ebusy_and_removes_nothing(tree: MountedTree) -> None:
    node = tree.path("busy")
    node.mkdir()
    with open(node / "fs" / "held", "w") as held:
        held.write("x")
        refused(tree, errno.EBUSY, lambda: node.rmdir(), "rmdir in use")
        refused(tree, errno.EBUSY, lambda: node.rename(tree.path("busy2")), "commit in use")
    assert (node / "fs" / "held").read_text() == "x"
    assert os.getxattr(node, "user.dmfs.kind") == b"active"


def test_creating_or_unlinking_other_things_at_node_level_is_eperm(tree: MountedTree) -> None:
    node = tree.path("node")
    node.mkdir()
    for operation, call in [
            ("create at root", lambda: tree.path("file").write_text("x")),
            ("create in node", lambda: (node / "file").write_text("x")),
            ("symlink in node", lambda: os.symlink("/tmp", node / "link")),
            ("unlink fs", lambda: os.unlink(node / "fs")),
            ("mknod in node", lambda: os.mkfifo(node / "fifo")),
            ("link into node", lambda: os.link(tree.path(".dmfs", "pool"), node / "h")),
            ("mkdir in .dmfs", lambda: tree.path(".dmfs", "x").mkdir())]:
        refused(tree, errno.EPERM, call, operation)


def test_writes_under_committed_or_view_are_erofs(tree: MountedTree) -> None:
    base = committed(tree, "base", files={"f": "x"})
    os.mkdir(base / "view", 0o555)
    for fs in (base / "fs", base / "view" / "fs"):
        assert errno_of(lambda fs=fs: (fs / "new").write_text("no")) == errno.EROFS
        assert errno_of(lambda fs=fs: (fs / "f").unlink()) == errno.EROFS


def test_changes_by_other_users_are_eacces(tree: MountedTree) -> None:
    base = committed(tree, "base")
    (base / "work").mkdir()
    for operation, call in [
            ("mkdir", lambda: tree.path("mine").mkdir()),
            ("mkdir child", lambda: (base / "mine").mkdir()),
            ("commit", lambda: (base / "work").rename(base / "w2")),
            ("rmdir", lambda: (base / "work").rmdir()),
            ("setxattr", lambda: os.setxattr(base, "user.label.x", b"1"))]:
        before = tree.log().count("refused (EACCES)")
        assert as_user(NOBODY, NOBODY, [], call) == errno.EACCES, operation
        assert tree.log().count("refused (EACCES)") == before + 1
    # Browsing works for everyone.
    assert as_user(NOBODY, NOBODY, [], lambda: os.listdir(base)) == 0
    assert as_user(NOBODY, NOBODY, [], lambda: os.getxattr(base, "user.dmfs.kind")) == 0
    assert as_user(NOBODY, NOBODY, [], lambda: tree.path(".dmfs", "pool").read_text()) == 0


def test_members_of_the_admin_group_may_change(unmounted_tree: MountedTree) -> None:
    text = unmounted_tree.config.read_text() + 'admin_group = "4242"\n'
    unmounted_tree.config.write_text(text)
    unmounted_tree.mount()
    root = unmounted_tree.mountpoint
    assert as_user(NOBODY, NOBODY, [4242], lambda: (root / "by-admin").mkdir()) == 0
    assert as_user(NOBODY, 4242, [], lambda: (root / "by-admin").rmdir()) == 0
    assert as_user(NOBODY, NOBODY, [], lambda: (root / "x").mkdir()) == errno.EACCES


def test_node_modes_and_link_counts(tree: MountedTree) -> None:
    base = committed(tree, "base")
    assert os.stat(base).st_nlink == 2
    (base / "a").mkdir()
    os.mkdir(base / "b", 0o555)
    assert os.stat(base).st_nlink == 4
    assert mode_of(base) == 0o555 and mode_of(base / "a") == 0o755
    (base / "a").rmdir()
    assert os.stat(base).st_nlink == 3


def test_labels_are_extended_attributes(tree: MountedTree) -> None:
    node = tree.path("node")
    node.mkdir()
    os.setxattr(node, "user.label.team", b"storage")
    os.setxattr(node, "user.label.containerd.io/gc.root", b"2026")
    assert os.getxattr(node, "user.label.team") == b"storage"
    names = set(os.listxattr(node))
    assert {"user.label.team", "user.label.containerd.io/gc.root", "user.dmfs.kind",
            "user.dmfs.usage", "user.dmfs.created", "user.dmfs.updated"} <= names
    os.removexattr(node, "user.label.team")
    assert errno_of(lambda: os.getxattr(node, "user.label.team")) == errno.ENODATA
    refused(tree, errno.EPERM, lambda: os.setxattr(node, "user.dmfs.kind", b"view"),
            "set an info attribute")
    node.rename(tree.path("done"))
    assert os.getxattr(tree.path("done"), "user.label.containerd.io/gc.root") == b"2026"
    snapshot = json.loads(tree.path(".dmfs", "snapshots.json").read_text())["snapshots"][0]
    assert snapshot["labels"] == {"containerd.io/gc.root": "2026"}


def test_usage_attribute_grows_with_data(tree: MountedTree) -> None:
    node = tree.path("node")
    node.mkdir()
    assert os.getxattr(node, "user.dmfs.usage") == b"0"
    with open(node / "fs" / "big", "wb") as f:
        f.write(os.urandom(3 * 2**20))
        os.fsync(f.fileno())
    assert int(os.getxattr(node, "user.dmfs.usage")) >= 3 * 2**20


def test_control_files(tree: MountedTree) -> None:
    base = committed(tree, "base")
    (base / "work").mkdir()
    pool = dict(line.split(": ", 1) for line in
                tree.path(".dmfs", "pool").read_text().splitlines())
    assert pool["mode"] == "rw"
    assert int(pool["data_used_blocks"]) <= int(pool["data_total_blocks"])
    assert pool["snapshots"] == "active=1 view=0 committed=1"
    for key in ("transaction_id", "metadata_used_blocks", "metadata_total_blocks",
                "low_water", "block_size"):
        assert key in pool
    document = json.loads(tree.path(".dmfs", "snapshots.json").read_text())
    by_name = {s["name"]: s for s in document["snapshots"]}
    assert by_name["work"]["parent"] == "base" and by_name["work"]["kind"] == "active"
    assert by_name["base"]["kind"] == "committed"
    assert sorted(os.listdir(tree.path(".dmfs", "by-name"))) == ["base", "work"]
    assert errno_of(lambda: tree.path(".dmfs", "pool").write_text("x")) == errno.EACCES
    assert os.statvfs(tree.mountpoint).f_blocks == int(pool["data_total_blocks"])


def test_mkdir_when_the_pool_is_full_is_enospc(scratch_dir: Path) -> None:
    with loop_pool(scratch_dir, data_mib=40) as pool:
        tree = MountedTree(write_config(scratch_dir, pool.name), scratch_dir / "mnt",
                           scratch_dir / "run")
        try:
            tree.mount()
            tree.path("hog").mkdir()
            assert write_direct(tree.path("hog", "fs", "big"), 100) == errno.ENOSPC
            refused(tree, errno.ENOSPC, lambda: tree.path("more").mkdir(), "mkdir, pool full")
            tree.path("hog").rmdir()
            tree.path("more").mkdir()  # space again
        finally:
            tree.cleanup()
