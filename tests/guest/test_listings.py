"""Listings the kernel caches (issue 12): a node listed again makes no READDIR
request, and every change of its entries shows at the next listing.

The counts are the daemon's own (``fuse_requests`` in .dmfs/pool), never timings.
"""

from __future__ import annotations

import os

import pytest

from dmfs.fuse import listings
from tests.support.tree import MountedTree

pytestmark = pytest.mark.no_udev_only  # nothing here depends on who makes device nodes

needs_listing_cache = pytest.mark.skipif(
    not listings.PYFUSE3_CAN_CACHE,
    reason="stock pyfuse3 cannot ask the kernel to cache listings (contrib/install builds "
           "the one in contrib/pyfuse3)")
STOCK = "tests.support.stock_pyfuse3"
CHILDREN = 20


def readdirs(tree: MountedTree) -> int:
    return tree.requests().get("readdir", 0)


def names(path: os.PathLike[str]) -> list[str]:
    return sorted(os.listdir(path))


def committed(tree: MountedTree, name: str) -> None:
    (tree.mountpoint / "work").mkdir()
    (tree.mountpoint / "work").rename(tree.mountpoint / name)


def listings_stay_right(tree: MountedTree) -> None:
    """Every change made through the tree shows at the next listing of the
    directory it changed, whether or not the kernel caches listings."""
    m = tree.mountpoint
    committed(tree, "base")
    for name in ("a", "b"):
        (m / "base" / name).mkdir()
    assert names(m / "base") == ["a", "b", "fs"]
    assert names(m) == [".dmfs", "base"]
    (m / "base" / "c").mkdir()
    assert names(m / "base") == ["a", "b", "c", "fs"]
    (m / "base" / "a").rmdir()
    assert names(m / "base") == ["b", "c", "fs"]
    os.rename(m / "base" / "b", m / "base" / "b-done")  # a commit
    assert names(m / "base") == ["b-done", "c", "fs"]
    (m / "top").mkdir()
    assert names(m) == [".dmfs", "base", "top"]
    assert names(m / ".dmfs" / "by-name") == ["b-done", "base", "c", "top"]
    (m / "top").rmdir()
    assert names(m) == [".dmfs", "base"]
    assert names(m / ".dmfs" / "by-name") == ["b-done", "base", "c"]
    # ls -l: the listing and the attributes of every entry.
    entries = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(m / "base")}
    assert sorted(entries) == ["b-done", "c", "fs"]
    assert entries["b-done"].st_mode & 0o777 == 0o555 and entries["c"].st_mode & 0o777 == 0o755


@needs_listing_cache
def test_a_node_listed_again_is_answered_by_the_kernel(tree: MountedTree) -> None:
    m = tree.mountpoint
    committed(tree, "base")
    for index in range(CHILDREN):
        os.mkdir(m / "base" / f"child-{index}", 0o555)  # views: quick to make
    first = readdirs(tree)
    assert len(os.listdir(m / "base")) == CHILDREN + 1
    assert len(os.listdir(m)) == 2
    filled = readdirs(tree)
    assert filled > first
    for _ in range(20):
        assert len(os.listdir(m / "base")) == CHILDREN + 1
        assert len(os.listdir(m)) == 2
    assert readdirs(tree) == filled
    os.mkdir(m / "base" / "one-more", 0o555)
    assert len(os.listdir(m / "base")) == CHILDREN + 2  # the kernel dropped its copy


@needs_listing_cache
def test_cached_listings_stay_right(tree: MountedTree) -> None:
    listings_stay_right(tree)


def test_with_stock_pyfuse3_listings_are_right_and_each_asks_the_daemon(
        unmounted_tree: MountedTree) -> None:
    tree = unmounted_tree
    tree.mount(module=STOCK)
    listings_stay_right(tree)
    before = readdirs(tree)
    for _ in range(5):
        os.listdir(tree.mountpoint / "base")
    assert readdirs(tree) - before >= 5  # what the cached case saves
