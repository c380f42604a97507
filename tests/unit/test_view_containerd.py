"""``.dmfs/containerd``: containerd's keys parsed, indexed and resolved against a
fake engine, without a kernel."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import trio
import trio.testing

from dmfs.fuse import coherence, inodes
from dmfs.fuse.containerd import ContainerdName, containerd_name
from dmfs.fuse.inodes import EntryRole
from dmfs.fuse.namespace import Namespace
from dmfs.pool import Info, Kind
from tests.unit.test_view import FakeEngine, info

CHAIN1 = "sha256:" + "1" * 64
CHAIN2 = "sha256:" + "2" * 64


class VersionedEngine(FakeEngine):
    """The fake engine with the state version the index keys its cache on."""

    def __init__(self, *infos: Info) -> None:
        super().__init__(*infos)
        self.state_version = 0
        self.reads = 0

    def children(self, key: str | None) -> list[Info]:
        self.reads += 1
        return super().children(key)

    def add(self, snapshot: Info) -> None:
        self.infos[snapshot.key] = snapshot
        self.state_version += 1

    def drop(self, key: str) -> None:
        del self.infos[key]
        self.state_version += 1


def containerd_pool() -> VersionedEngine:
    """Two layers and a container of namespace default, one layer of k8s.io, a
    snapshot made in the tree."""
    return VersionedEngine(
        info(f"default/4/{CHAIN1}", 2),
        info(f"default/6/{CHAIN2}", 3, parent=f"default/4/{CHAIN1}"),
        info("default/9/web", 4, Kind.ACTIVE, parent=f"default/6/{CHAIN2}"),
        info(f"k8s.io/2/{CHAIN1}", 5),
        info("base", 6))


def test_containerd_keys_are_namespace_sequence_and_name() -> None:
    assert containerd_name(f"default/12/{CHAIN1}") == ContainerdName("default", 12, CHAIN1)
    assert containerd_name(f"default/15/extract-1-2 {CHAIN1}") == ContainerdName(
        "default", 15, f"extract-1-2 {CHAIN1}")
    # containerd's own keys may hold '/' after the sequence number
    assert containerd_name("k8s.io/3/a/b") == ContainerdName("k8s.io", 3, "a/b")
    for key in ("base", "default/x/name", "default/3/", "/3/name", "de..fault/3/x",
                "-x/3/y", "default//3/x", "a" * 77 + "/3/x"):
        assert containerd_name(key) is None, key


def test_namespaces_and_names_resolve_to_their_nodes() -> None:
    engine = containerd_pool()
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    assert ns.child_inode(inodes.CONTROL_DIR, b"containerd") == inodes.CONTAINERD_DIR
    assert [name for name, _ in ns.containerd_entries(inodes.CONTAINERD_DIR)] == [
        b"default", b"k8s.io"]
    default = ns.child_inode(inodes.CONTAINERD_DIR, b"default")
    assert default is not None and ns.inodes.namespace_of(default) == "default"
    assert ns.child_inode(inodes.CONTAINERD_DIR, b"base") is None
    assert ns.child_inode(inodes.CONTAINERD_DIR, b"\xff") is None
    entries = ns.containerd_entries(default)
    assert [name for name, _ in entries] == [CHAIN1.encode(), CHAIN2.encode(), b"web"]
    web = ns.child_inode(default, b"web")
    assert web == dict(entries)[b"web"]
    assert ns.snapshot(web) == (EntryRole.CONTAINERD, engine.infos["default/9/web"])
    target = os.fsencode(f"../../../default%2F4%2F{CHAIN1}/default%2F6%2F{CHAIN2}/"
                         "default%2F9%2Fweb")
    assert ns.link_target(EntryRole.CONTAINERD, engine.infos["default/9/web"]) == target
    attrs = ns.snapshot_attrs(web)
    assert stat.S_ISLNK(attrs.st_mode) and attrs.st_size == len(target)
    assert attrs.entry_timeout == 0  # it changes behind the kernel's back
    assert ns.child_inode(default, b"base") is None and ns.child_inode(default, b"nope") is None
    assert ns.path(default, b"web") == "/.dmfs/containerd/default/web"
    assert ns.is_control_dir(default) and ns.is_control_dir(inodes.CONTAINERD_DIR)
    assert not ns.is_control_dir(ns.child_inode(inodes.ROOT, b"base"))  # type: ignore[arg-type]


def test_directory_attributes_count_namespaces() -> None:
    ns = Namespace(containerd_pool(), admin_gid=None)  # type: ignore[arg-type]
    top = ns.fixed_attrs(inodes.CONTAINERD_DIR)
    assert stat.S_ISDIR(top.st_mode) and stat.S_IMODE(top.st_mode) == 0o555
    assert top.st_nlink == 4  # ., .., default, k8s.io
    assert ns.fixed_attrs(inodes.CONTROL_DIR).st_nlink == 4  # ., .., by-name, containerd
    default = ns.child_inode(inodes.CONTAINERD_DIR, b"default")
    assert ns.fixed_attrs(default).st_nlink == 2  # type: ignore[arg-type]


def test_the_newest_sequence_wins_and_gone_namespaces_go() -> None:
    engine = containerd_pool()
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    k8s = ns.child_inode(inodes.CONTAINERD_DIR, b"k8s.io")
    # containerd removed "web" from its database and made a new one; the old
    # snapshot waits for containerd's garbage collector
    engine.add(info("default/11/web", 7, Kind.ACTIVE, parent=f"default/6/{CHAIN2}"))
    default = ns.child_inode(inodes.CONTAINERD_DIR, b"default")
    web = ns.child_inode(default, b"web")  # type: ignore[arg-type]
    assert ns.snapshot(web)[1].key == "default/11/web"  # type: ignore[arg-type,index]
    engine.drop(f"k8s.io/2/{CHAIN1}")
    assert ns.child_inode(inodes.CONTAINERD_DIR, b"k8s.io") is None
    assert ns.fixed_attrs(k8s) is None  # type: ignore[arg-type]
    assert [name for name, _ in ns.containerd_entries(inodes.CONTAINERD_DIR)] == [b"default"]


def test_the_index_is_rebuilt_only_when_the_state_changed() -> None:
    engine = containerd_pool()
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    default = ns.child_inode(inodes.CONTAINERD_DIR, b"default")
    reads = engine.reads
    for _ in range(3):
        assert ns.child_inode(default, b"web") is not None  # type: ignore[arg-type]
    assert engine.reads == reads
    engine.add(info("default/12/new", 8, Kind.ACTIVE))
    assert ns.child_inode(default, b"new") is not None  # type: ignore[arg-type]
    assert engine.reads > reads


def test_names_are_encoded_as_in_the_tree_and_too_long_ones_left_out() -> None:
    engine = VersionedEngine(info("default/3/a/b", 2), info("default/4/.hidden", 3),
                             info("default/5/" + "x" * 300, 4))
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    default = ns.child_inode(inodes.CONTAINERD_DIR, b"default")
    assert [name for name, _ in ns.containerd_entries(default)] == [  # type: ignore[arg-type]
        b"%2Ehidden", b"a%2Fb"]
    assert ns.child_inode(default, b"a%2Fb") is not None  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the kernel's caches
def held(ns: Namespace, parent: int, name: bytes) -> int:
    """Look ``name`` up as the kernel does, and report its attributes."""
    inode = ns.child_inode(parent, name)
    assert inode is not None
    ns.inodes.looked_up(inode)
    ns.inodes.known_as(inode, parent, name)
    ns.snapshot_attrs(inode)
    return inode


def kernel_holding_the_chain(engine: object) -> tuple[Namespace, int, int, int]:
    """A view of ``engine`` whose kernel has looked up the root and containerd's
    chain of two layers with the container ``web`` on top; their inodes."""
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    ns.fixed_attrs(inodes.ROOT)
    bottom = held(ns, inodes.ROOT, f"default%2F4%2F{CHAIN1}".encode())
    top = held(ns, bottom, f"default%2F6%2F{CHAIN2}".encode())
    return ns, bottom, top, held(ns, top, b"default%2F9%2Fweb")


def test_changes_made_elsewhere_are_found_stale() -> None:
    engine = containerd_pool()
    ns, bottom, top, web = kernel_holding_the_chain(engine)
    assert not coherence.stale(ns)  # nothing changed

    # containerd commits web as default/10/app: same device, new name and mode
    old = engine.infos["default/9/web"]
    engine.drop(old.key)
    engine.add(info("default/10/app", old.device_id, parent=old.parent))
    engine.infos["default/10/app"] = replace(engine.infos["default/10/app"],
                                            created=old.created)
    found = coherence.stale(ns)
    assert found.entries == [(top, b"default%2F9%2Fweb", web, False)]
    assert found.attributes == [web]  # 0755 -> 0555
    assert not coherence.stale(ns)  # each change is reported once

    # containerd's collector removes the app, then the top layer
    engine.drop("default/10/app")
    found = coherence.stale(ns)
    assert found.entries == [(top, b"default%2F10%2Fapp", web, True)]
    assert found.attributes == [top]  # one link fewer
    assert found.gone == [old.identity]
    engine.drop(f"default/6/{CHAIN2}")
    engine.add(info("other", 9))  # a new root node: the root's link count changes
    found = coherence.stale(ns)
    assert [entry[1] for entry in found.entries] == [f"default%2F6%2F{CHAIN2}".encode()]
    assert set(found.attributes) == {bottom, inodes.ROOT}


def test_what_the_kernel_never_saw_is_not_invalidated() -> None:
    engine = containerd_pool()
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    engine.drop("base")
    assert not coherence.stale(ns).entries and not coherence.stale(ns).attributes


def test_only_what_the_engine_says_changed_is_compared() -> None:
    engine = containerd_pool()
    ns, _, top, web = kernel_holding_the_chain(engine)
    base = held(ns, inodes.ROOT, b"base")
    engine.drop("default/9/web")
    engine.drop("base")
    # told only of web's device and its parent: base's removal waits for its own news
    found = coherence.stale(ns, ({4}, {f"default/6/{CHAIN2}"}))
    assert found.entries == [(top, b"default%2F9%2Fweb", web, True)]
    assert found.attributes == [top]
    found = coherence.stale(ns, ({6}, {None}))
    assert found.entries == [(inodes.ROOT, b"base", base, True)]
    assert found.attributes == [inodes.ROOT]
    # a device id the kernel never saw, a parent gone meanwhile: nothing to do
    assert not coherence.stale(ns, ({99}, {"gone"}))
    # not knowing what changed compares everything (and finds it all done)
    everything = coherence.stale(ns, None)
    assert not everything.entries and not everything.attributes


def test_a_link_whose_target_changes_gets_a_new_inode() -> None:
    """The kernel caches a link's target with its inode: after a commit moves a
    node, its by-name and containerd links are new inodes; the old ones go once
    the kernel forgets them."""
    engine = containerd_pool()
    ns = Namespace(engine, admin_gid=None)  # type: ignore[arg-type]
    web = ns.inodes.namespace_dir("default")
    old_link = ns.child_inode(web, b"web")
    assert old_link is not None
    ns.inodes.looked_up(old_link)
    old_target = ns.served_target(old_link, EntryRole.CONTAINERD, engine.infos["default/9/web"])
    assert ns.child_inode(web, b"web") == old_link  # same target: same inode

    # containerd commits default/9/web as default/10/web
    old = engine.infos["default/9/web"]
    engine.drop(old.key)
    engine.infos["default/10/web"] = replace(old, key="default/10/web")
    engine.state_version += 1
    new_link = ns.child_inode(web, b"web")
    assert new_link is not None and new_link != old_link
    new_info = engine.infos["default/10/web"]
    assert ns.served_target(new_link, EntryRole.CONTAINERD, new_info).endswith(
        b"default%2F10%2Fweb")
    assert ns.served_target(old_link, EntryRole.CONTAINERD, new_info) == old_target
    ns.inodes.forget(old_link, 1, still_exists=True)  # the snapshot lives on
    assert ns.inodes.get(old_link) is None
    assert ns.inodes.get(new_link) is not None


class FollowedEngine(VersionedEngine):
    """The versioned fake with the change signal the view follows."""

    def __init__(self, *infos: Info) -> None:
        super().__init__(*infos)
        self.before_unmount = None
        self._changed = trio.Event()

    def add(self, snapshot: Info) -> None:
        super().add(snapshot)
        self._changed.set()
        self._changed = trio.Event()

    def drop(self, key: str) -> None:
        super().drop(key)
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self, since: int) -> int:
        while self.state_version == since:
            await self._changed.wait()
        return self.state_version

    def touched_since(self, version: int) -> None:
        return None  # compare everything


def test_a_change_elsewhere_is_answered_once_the_kernel_was_told() -> None:
    """The socket's Commit and Remove wait (changed_elsewhere) until the view's
    follower has told the kernel, in a worker thread, of what the change made
    stale; after the session closes nobody waits and nothing is sent."""
    from dmfs.fuse import linkcache
    from dmfs.fuse.operations import DmfsOperations

    engine = FollowedEngine(*containerd_pool().infos.values())
    operations = DmfsOperations(engine)  # type: ignore[arg-type]
    told: list[tuple[str, object]] = []
    operations.links = linkcache.LinkInvalidator(
        operations.inodes, lambda inode: None,
        lambda parent, name: told.append(("entry", (parent, name))),
        lambda inode: told.append(("attr", inode)))
    operations.follower.links = operations.links
    ns = operations.ns
    ns.fixed_attrs(inodes.ROOT)
    base = held(ns, inodes.ROOT, b"base")

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(operations.follower.follow)
            await trio.testing.wait_all_tasks_blocked()
            before = engine.infos["base"]
            engine.drop("base")  # what the socket's Remove did
            await operations.follower.changed_elsewhere(before)
            assert told == [("entry", (inodes.ROOT, b"base")), ("attr", inodes.ROOT)]
            assert base in [e.inode for e in ns.inodes.entries(EntryRole.NODE)]  # still held
            await operations.links.session_closing()
            told.clear()
            engine.add(info("later", 20))
            await trio.testing.wait_all_tasks_blocked()
            assert told == []  # the session is over: nothing reaches pyfuse3
            nursery.cancel_scope.cancel()
        await operations.follower.changed_elsewhere(before)  # the follower is gone: no waiting

    trio.run(scenario)
