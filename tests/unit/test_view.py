"""The view's pieces that need no kernel: the inode table, the namespace against a
fake engine, the .dmfs files, the xattr rules and the error boundary."""

from __future__ import annotations

import errno
import json
import logging
import stat
from pathlib import Path

import pyfuse3
import pytest

from dmfs.fuse import control, inodes, listings, xattrs
from dmfs.fuse.boundary import errno_of, failsafe
from dmfs.fuse.inodes import EntryRole, InodeTable
from dmfs.fuse.names import BadName, NameTooLong, check_new_key, decode_entry
from dmfs.fuse.namespace import Namespace
from dmfs.pool import (
    AlreadyExists,
    DeviceState,
    HasChildren,
    Info,
    InUse,
    InvalidArgument,
    Kind,
    LabelTooLarge,
    NoSpace,
    NotFound,
    PoolError,
)


def info(key: str, device_id: int, kind: Kind = Kind.COMMITTED, parent: str | None = None,
         labels: dict[str, str] | None = None) -> Info:
    return Info(key=key, kind=kind, parent=parent, labels=labels or {},
                created=f"2026-01-01T00:00:0{device_id}Z", updated="2026-01-02T00:00:00Z",
                device_id=device_id, state=DeviceState.DEACTIVATED, mountpoint=None,
                usage=7 if kind is Kind.COMMITTED else None)


class FakeEngine:
    """What the namespace reads of the engine, from a dict."""

    def __init__(self, *infos: Info) -> None:
        self.infos = {i.key: i for i in infos}
        self.children_changed: dict[str | None, int] = {}

    def children_changed_ns(self, key: str | None) -> int:
        return self.children_changed.get(key, 0)

    def keys_changed_ns(self) -> int:
        return max(self.children_changed.values(), default=0)

    async def walk(self) -> list[Info]:
        return sorted(self.infos.values(), key=lambda i: i.key)

    def get(self, key: str) -> Info | None:
        return self.infos.get(key)

    def by_device(self, device_id: int) -> Info | None:
        return next((i for i in self.infos.values() if i.device_id == device_id), None)

    def children(self, key: str | None) -> list[Info]:
        return sorted((i for i in self.infos.values() if i.parent == key), key=lambda i: i.key)

    def child_count(self, key: str | None) -> int:
        return len(self.children(key))

    def mount_path(self, device_id: int) -> Path:
        return Path(f"/run/dmfs/p/snapshots/{device_id}")


def test_inodes_are_stable_per_identity_and_dropped_once_forgotten() -> None:
    table = InodeTable()
    node = table.inode(EntryRole.NODE, (5, "t"))
    assert table.inode(EntryRole.NODE, (5, "t")) == node
    link = table.inode(EntryRole.FS_LINK, (5, "t"))
    assert link != node and node >= inodes.FIRST_DYNAMIC
    table.looked_up(node)
    table.snapshot_gone((5, "t"))
    assert table.get(node) is not None and table.get(link) is None  # the kernel holds node
    table.forget(node, 1, still_exists=False)
    assert table.get(node) is None
    assert table.inode(EntryRole.NODE, (5, "t")) != node  # numbers are never reused


def test_namespace_resolves_nodes_links_and_control_entries() -> None:
    engine = FakeEngine(info("base", 2), info("work", 3, Kind.ACTIVE, parent="base"),
                        info("a/b", 4))
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    base = ns.child_inode(inodes.ROOT, b"base")
    assert base is not None and ns.node(base).key == "base"  # type: ignore[union-attr]
    assert ns.child_inode(inodes.ROOT, b"work") is None  # not a root node
    work = ns.child_inode(base, b"work")
    assert ns.path(work) == "/base/work"  # type: ignore[arg-type]
    assert ns.child_inode(inodes.ROOT, b"a%2Fb") is not None
    assert ns.child_inode(inodes.ROOT, b"\xff") is None
    link = ns.child_inode(base, b"fs")
    attrs = ns.snapshot_attrs(link)  # type: ignore[arg-type]
    assert stat.S_ISLNK(attrs.st_mode) and attrs.st_size == len(b"/run/dmfs/p/snapshots/2")
    assert ns.child_inode(inodes.ROOT, b".dmfs") == inodes.CONTROL_DIR
    assert ns.child_inode(inodes.CONTROL_DIR, b"snapshots.json") == inodes.SNAPSHOTS_FILE
    node = ns.node_attrs(engine.infos["base"])
    assert stat.S_IMODE(node.st_mode) == 0o555 and node.st_nlink == 3
    assert stat.S_IMODE(ns.node_attrs(engine.infos["work"]).st_mode) == 0o755
    assert [name for name, _ in ns.node_entries(None)] == [b"a%2Fb", b"base"]


def test_names_from_the_kernel_are_bytes() -> None:
    assert decode_entry("ü".encode()) == "ü"
    with pytest.raises(BadName, match="not valid UTF-8"):
        decode_entry(b"bad\xff")
    with pytest.raises(NameTooLong):
        check_new_key("x" * 256)


def test_snapshots_json_renders_usage_and_labels() -> None:
    infos = [info("base", 2, labels={"k": "v"}), info("work", 3, Kind.ACTIVE, parent="base")]
    document = json.loads(control.render_snapshots("p", infos, {"work": 4096}))
    by_name = {s["name"]: s for s in document["snapshots"]}
    assert document["pool"] == "p"
    assert by_name["base"]["usage"] == 7 and by_name["base"]["labels"] == {"k": "v"}
    assert by_name["work"]["usage"] == 4096 and by_name["work"]["parent"] == "base"


def test_pool_file_is_key_value_lines() -> None:
    text = control.render_pool({"mode": "rw", "snapshots": {"active": 1}, "faulty": [],
                                "needs_check": False, "last": None}).decode()
    assert text == "mode: rw\nsnapshots: active=1\nfaulty: none\nneeds_check: no\nlast: -\n"


def test_label_changes_are_checked_before_the_engine() -> None:
    node = info("base", 2, labels={"k": "v"})
    assert xattrs.label_change(node, b"user.label.k", b"new") == ("k", "new")
    assert xattrs.label_change(node, b"user.label.k", None) == ("k", None)
    for name, value, code in [(b"user.label.k", b"\xff", errno.EINVAL),
                              (b"user.label.\xff", b"x", errno.EINVAL),
                              (b"user.dmfs.kind", b"x", errno.EPERM),
                              (b"trusted.x", b"x", errno.ENOTSUP),
                              (b"user.label.", b"x", errno.ENOTSUP),
                              (b"user.label.gone", None, errno.ENODATA)]:
        with pytest.raises(xattrs.Refused) as refused:
            xattrs.label_change(node, name, value)
        assert refused.value.code == code, name


def test_engine_errors_map_to_the_documented_errnos() -> None:
    assert [errno_of(e("x")) for e in (AlreadyExists, NotFound, HasChildren, InUse, NoSpace,
                                        LabelTooLarge, InvalidArgument, PoolError)] == [
        errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY, errno.ENOSPC, errno.E2BIG,
        errno.EINVAL, errno.EIO]


async def test_failsafe_answers_eio_and_logs_one_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    @failsafe
    async def broken() -> None:
        raise KeyError("a bug")

    @failsafe
    async def refused() -> None:
        raise InUse("files are in use")

    with caplog.at_level(logging.WARNING), pytest.raises(pyfuse3.FUSEError) as error:
        await broken()
    assert error.value.errno == errno.EIO
    assert [r.exc_info is not None for r in caplog.records] == [True]
    with pytest.raises(pyfuse3.FUSEError) as error:
        await refused()
    assert error.value.errno == errno.EBUSY


async def test_listings_are_computed_when_a_listing_starts_and_kept_for_its_rest() -> None:
    engine = FakeEngine(info("base", 2), info("a", 3, parent="base"))
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    base = ns.child_inode(inodes.ROOT, b"base")
    assert base is not None
    table = listings.Listings(ns, cache=True)
    opened = table.open(base)
    assert isinstance(opened, pyfuse3.FileInfo) and opened.cache_readdir and opened.keep_cache
    fh = opened.fh
    # Added after opendir, before the listing starts: listed (the kernel stamps
    # its cache with the mtime it fetched just before offset 0).
    engine.infos["b"] = info("b", 4, parent="base")
    assert [name for name, _ in await table.entries(fh, 0)] == [b"fs", b"a", b"b"]
    del engine.infos["a"]
    assert [name for name, _ in await table.entries(fh, 2)] == [b"fs", b"a", b"b"]
    assert [name for name, _ in await table.entries(fh, 0)] == [b"fs", b"b"]  # rewinddir
    table.release(fh)
    assert await table.entries(fh, 0) == [] and len(table) == 0
    assert isinstance(listings.Listings(ns, cache=False).open(inodes.ROOT), int)
    link = ns.child_inode(base, b"fs")
    for inode, code in [(link, errno.ENOTDIR), (10**9, errno.ENOENT)]:
        with pytest.raises(pyfuse3.FUSEError) as error:
            table.open(inode)  # type: ignore[arg-type]
        assert error.value.errno == code
    by_name = await table.entries(table.open(inodes.BY_NAME_DIR).fh, 0)  # type: ignore[union-attr]
    assert [name for name, _ in by_name] == [b"b", b"base"]


def test_a_directory_mtime_moves_when_its_entries_change() -> None:
    engine = FakeEngine(info("base", 2))
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    before = ns.node_attrs(engine.infos["base"]).st_mtime_ns
    root_before = ns.fixed_attrs(inodes.ROOT).st_mtime_ns  # type: ignore[union-attr]
    engine.children_changed["base"] = before + 5
    assert ns.node_attrs(engine.infos["base"]).st_mtime_ns == before + 5
    engine.children_changed[None] = root_before + 7
    assert ns.fixed_attrs(inodes.ROOT).st_mtime_ns == root_before + 7  # type: ignore[union-attr]
    by_name = ns.fixed_attrs(inodes.BY_NAME_DIR)
    assert by_name.st_mtime_ns == root_before + 7  # type: ignore[union-attr]
