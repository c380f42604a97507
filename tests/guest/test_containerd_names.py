"""``.dmfs/containerd`` through a real mount, with snapshots named as containerd
names them but made with mkdir and mv (the same keys containerd's metadata layer
sends; tests/guest/test_containerd_ctr.py browses what containerd itself made)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support.tree import MountedTree, errno_of

pytestmark = pytest.mark.no_udev_only  # nothing here depends on who makes device nodes

CHAIN1 = "sha256:" + "a" * 64
CHAIN2 = "sha256:" + "b" * 64


def encoded(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def test_containerd_names_link_to_their_nodes(tree: MountedTree) -> None:
    # what an unpack does: prepare extract-..., commit it under the chain id
    layer1 = tree.path(encoded(f"default/1/extract-100-x {CHAIN1}"))
    layer1.mkdir()
    (layer1 / "fs" / "hello").write_text("layer 1")
    assert os.listdir(tree.path(".dmfs", "containerd", "default")) == [
        f"extract-100-x {CHAIN1}"]
    layer1.rename(tree.path(encoded(f"default/2/{CHAIN1}")))
    layer2 = tree.path(encoded(f"default/2/{CHAIN1}"), encoded(f"default/3/{CHAIN2}"))
    layer2.mkdir()
    layer2.rename(layer2.with_name(encoded(f"default/4/{CHAIN2}")))
    container = layer2.with_name(encoded(f"default/4/{CHAIN2}")) / encoded("default/5/web")
    container.mkdir()
    (container / "fs" / "written").write_text("by the container")
    tree.path("base").mkdir()  # not containerd's: not linked

    top = tree.path(".dmfs", "containerd")
    assert os.listdir(top) == ["default"]
    names = tree.path(".dmfs", "containerd", "default")
    assert sorted(os.listdir(names)) == [CHAIN1, CHAIN2, "web"]
    assert os.path.samefile(names / "web", container)
    assert os.readlink(names / "web") == "../../../" + "/".join(
        [encoded(f"default/2/{CHAIN1}"), encoded(f"default/4/{CHAIN2}"), encoded("default/5/web")])
    assert (names / "web" / "fs" / "written").read_text() == "by the container"
    assert (names / "web" / "fs" / "hello").read_text() == "layer 1"
    assert os.getxattr(names / CHAIN2, "user.dmfs.kind") == b"committed"
    # a second namespace, and the nlink counts that find(1) relies on
    tree.path(encoded(f"k8s.io/1/{CHAIN1}")).mkdir()
    assert sorted(os.listdir(top)) == ["default", "k8s.io"]
    assert os.stat(top).st_nlink == 4 and os.stat(tree.path(".dmfs")).st_nlink == 4

    # the links change with the tree: a removed container goes, an emptied namespace too
    container.rmdir()
    assert not (names / "web").exists() and not os.path.lexists(names / "web")
    tree.path(encoded(f"k8s.io/1/{CHAIN1}")).rmdir()
    assert os.listdir(top) == ["default"]


def test_containerd_directories_are_read_only(tree: MountedTree) -> None:
    tree.path(encoded("default/1/web")).mkdir()
    names = tree.path(".dmfs", "containerd", "default")
    for what, call, code in [  # each refused with the documented errno and one log line
            ("mkdir in .dmfs/containerd", lambda: (names.parent / "ns").mkdir(), errno.EPERM),
            ("mkdir in a namespace", lambda: (names / "x").mkdir(), errno.EPERM),
            ("unlink of a link", lambda: (names / "web").unlink(), errno.EPERM),
            ("symlink in a namespace", lambda: (names / "l").symlink_to("web"), errno.EPERM),
            ("rename of a link", lambda: (names / "web").rename(names / "w2"), errno.EPERM)]:
        before = tree.log().count(" refused ")
        assert errno_of(call) == code, what
        assert tree.log().count(" refused ") == before + 1, f"{what}: no log line"
    # the kernel itself refuses rmdir of a link
    assert errno_of(lambda: (names / "web").rmdir()) == errno.ENOTDIR
    assert not os.access(names, os.W_OK)
    assert os.path.isdir(tree.path(encoded("default/1/web")))


def test_a_namespace_that_is_gone_is_enoent(tree: MountedTree) -> None:
    node = tree.path(encoded("gone/1/x"))
    node.mkdir()
    namespace = tree.path(".dmfs", "containerd", "gone")
    assert namespace.is_dir()
    node.rmdir()
    assert errno_of(lambda: os.listdir(namespace)) == errno.ENOENT
    assert not Path(namespace).exists()
