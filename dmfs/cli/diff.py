"""``dmfs diff``: what changed between two snapshots (the comparison is :mod:`dmfs.diff`).

The command reaches the snapshots the way a user would.  Usually a daemon
serves the pool's tree: snapshots are named by their nodes there, their
lineage is read from ``M/.dmfs/snapshots.json``, and resolving
``M/.dmfs/by-name/<name>/fs`` makes the daemon activate and mount a committed
snapshot read-only (an active one is mounted already); the daemon unmounts
it again once idle.  With ``--config`` and no daemon running, the command
opens the engine itself, which activates the snapshots read-only and
releases them when it closes.

Registration: this module is listed in ``dmfs.cli.main.COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmfs.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    OperationFailed,
    UsageError,
    add_command,
    emit,
    json_option,
)

log = logging.getLogger("dmfs.cli")

DIFF_DESCRIPTION = """\
Show what changed from snapshot OLD to snapshot NEW, one line per path as
`zfs diff` prints them, then a summary. With only NEW, compare it with its
parent (a snapshot without a parent: with an empty filesystem).

OLD and NEW are snapshot nodes of a mounted dmfs tree: M/<node>, M/<node>/fs or
M/.dmfs/by-name/<name>. With --config they are snapshot names of that pool,
found through its tree when a dmfs daemon serves it; with no daemon running,
dmfs diff opens the pool itself (as root), mounts the two snapshots read-only
and releases them afterwards.

As root, the snapshots' ext4 inode tables are read from their devices and the
pool's thin delta tells which blocks differ, so only what changed is read;
without root, every file's metadata is read (lstat) and files whose metadata
changed but not their size are read; what the user may not read (lost+found,
at least) is left out, named in a warning, and the exit status is 1."""

DIFF_NOTES = """\
change types:
  +  added         the path is only in NEW
  -  removed       the path is only in OLD
  M  modified      the same path with something changed, listed in parentheses:
                   content, target (of a symlink), device (number), mode, owner
                   (or group), mtime, links (link count), xattrs; inode: the path
                   now names another file (replaced, e.g. by `mv new old`)
  R  renamed       the same file at another path: OLD-PATH -> NEW-PATH (moves and
                   renames are recognised by inode number and generation)
  T  type changed  the path names another kind of file (F file, / directory,
                   @ symlink, | fifo, = socket, B/C block/character device)
Paths start at the snapshot's files (/etc/passwd); backslash, white space and
bytes that are not printable UTF-8 are written \\ooo. A directory whose entries
changed is not listed itself (its entries are), nor are access and change
times. -F adds a column with the file type (OLD>NEW for T).

defined results:
  the same snapshot twice   no differences; nothing is read
  snapshots of two pools    compared path by path: a moved file shows as - and +,
                            every file of equal size is read (slow)
  an active snapshot        compared as it is when read (its filesystem is flushed
                            first); files written meanwhile may be listed or not
  a view                    has its parent's files: no differences from it"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    diff = add_command(
        commands, "diff", "what changed between two snapshots", DIFF_DESCRIPTION,
        ["dmfs diff /srv/snapshots/base /srv/snapshots/base/app",
         "dmfs diff /srv/snapshots/.dmfs/by-name/app --json",
         "dmfs diff --config /etc/dmfs/pool0.toml base app"],
        notes=DIFF_NOTES)
    diff.add_argument("snapshots", metavar="SNAPSHOT", nargs="+",
                      help="[OLD] NEW: snapshot nodes (or names, with --config)")
    diff.add_argument("--config", metavar="CONFIG", type=Path,
                      help="the pool's TOML file: SNAPSHOTs are names in that pool")
    diff.add_argument("-F", "--types", action="store_true",
                      help="add a column with each path's file type")
    diff.add_argument("--walk", action="store_true",
                      help="read every file's metadata through the filesystems (lstat) "
                           "instead of the inode tables on the devices: what happens without "
                           "root; slower, same result")
    json_option(diff)
    diff.set_defaults(run=run_diff)


# ---- how the snapshots are reached --------------------------------------------------


@dataclass(frozen=True)
class Picked:
    """A snapshot named on the command line."""

    key: str
    kind: str
    parent: str | None
    pool: str  # the tree's mountpoint, or the pool name: same value, same pool


class TreeSource:
    """Snapshots served by a dmfs daemon at ``mountpoint``."""

    def __init__(self, mountpoint: Path) -> None:
        from dmfs.diff.lineage import Lineage

        self.mountpoint = mountpoint
        try:
            document = json.loads((mountpoint / ".dmfs" / "snapshots.json").read_text())
        except (OSError, ValueError) as error:
            raise OperationFailed(f"cannot read {mountpoint}/.dmfs/snapshots.json: "
                                  f"{error}") from None
        self.records = {s["name"]: s for s in document["snapshots"]}
        self.lineage = {name: Lineage(s["parent"], s["created"])
                        for name, s in self.records.items()}

    def pick(self, key: str) -> Picked:
        record = self.records.get(key)
        if record is None:
            raise UsageError(f"{self.mountpoint} has no snapshot {key!r}")
        return Picked(key, record["kind"], record["parent"], str(self.mountpoint))

    def files(self, key: str) -> Path:
        """Where the snapshot's files are: resolving its fs link mounts it."""
        from dmfs.fuse.names import encode_key

        link = self.mountpoint / ".dmfs" / "by-name" / encode_key(key) / "fs"
        try:
            return Path(os.readlink(link))
        except OSError as error:
            raise OperationFailed(f"cannot reach the files of {key!r} ({link}): "
                                  f"{error.strerror} (the dmfs log says why)") from None


def _tree_mounts() -> list[Path]:
    from dmfs.pool import mountinfo

    return [e.mountpoint for e in mountinfo() if e.fs_type == "fuse.dmfs"]


def node_of(argument: str) -> tuple[Path, str]:
    """(tree mountpoint, snapshot key) of a node path, its fs link or its by-name link."""
    from dmfs.fuse.names import BadName, decode_name

    path = Path(argument)
    if path.name == "fs" and path.is_symlink():
        path = path.parent
    real = Path(os.path.realpath(path))
    trees = [m for m in _tree_mounts() if real == m or m in real.parents]
    if not trees:
        raise UsageError(f"{argument}: not in a mounted dmfs tree (give a snapshot node such "
                         "as M/<name>, or use --config CONFIG with snapshot names)")
    tree = max(trees, key=lambda m: len(m.parts))
    parts = real.relative_to(tree).parts
    if not parts or parts[0] == ".dmfs":
        raise UsageError(f"{argument}: not a snapshot node of the tree at {tree}")
    try:
        return tree, decode_name(parts[-1])
    except BadName as error:
        raise UsageError(f"{argument}: not a snapshot node ({error})") from None


def _served_tree(pool_name: str) -> Path | None:
    """The mountpoint of the tree that serves pool ``pool_name``, if one does."""
    for mountpoint in _tree_mounts():
        try:
            lines = (mountpoint / ".dmfs" / "pool").read_text().splitlines()
        except OSError:
            continue
        if f"name: {pool_name}" in lines:
            return mountpoint
    return None


# ---- the command --------------------------------------------------------------------


def run_diff(args: argparse.Namespace) -> int:
    if len(args.snapshots) > 2:
        raise UsageError("dmfs diff takes one or two snapshots: [OLD] NEW")
    if args.config is not None:
        return _diff_by_name(args)
    sources: dict[Path, TreeSource] = {}
    picked = []
    for argument in args.snapshots:
        mountpoint, key = node_of(argument)
        if mountpoint not in sources:
            sources[mountpoint] = TreeSource(mountpoint)
        picked.append((sources[mountpoint], key))
    return _diff_in_trees(args, picked)


def _diff_by_name(args: argparse.Namespace) -> int:
    from dmfs.config import load_config
    from dmfs.pool import journal_in_use

    config = load_config(args.config)
    if journal_in_use(config.state_dir):
        mountpoint = _served_tree(config.pool_name)
        if mountpoint is None:
            raise OperationFailed(f"a dmfs daemon holds pool {config.pool_name}'s journal but "
                                  "no mounted tree serves it: give snapshot node paths")
        source = TreeSource(mountpoint)
        return _diff_in_trees(args, [(source, key) for key in args.snapshots])
    return _diff_with_engine(args, config)


def _pair(picked: list[Picked]) -> tuple[Picked | None, Picked]:
    if len(picked) == 2:
        return picked[0], picked[1]
    return None, picked[0]


def _diff_in_trees(args: argparse.Namespace, named: list[tuple[TreeSource, str]]) -> int:
    if len(named) == 1:
        source, key = named[0]
        parent = source.pick(key).parent
        if parent is not None:
            named = [(source, parent), (source, key)]
    picked = [source.pick(key) for source, key in named]
    old, new = _pair(picked)
    if old is not None and old.key == new.key and old.pool == new.pool:
        return _report(args, old, new, None)
    _warn_active(old, new)
    old_root = named[0][0].files(old.key) if old is not None else None
    new_source = named[-1][0]
    new_root = new_source.files(new.key)
    return _report(args, old, new, _compare(args, old, new, old_root, new_root,
                                            new_source.lineage))


def _diff_with_engine(args: argparse.Namespace, config: Any) -> int:
    import trio

    from dmfs.cli.preflight import EnvironmentProblem, require_device_mapper, require_root
    from dmfs.diff.lineage import Lineage
    from dmfs.pool import NotFound, PoolError, SnapshotError, Snapshotter

    require_root("dmfs diff --config (with no dmfs daemon serving the pool)")
    require_device_mapper()

    async def session() -> tuple[Picked | None, Picked, Any]:
        async with Snapshotter.open(config) as engine:
            infos = {info.key: info for info in await engine.walk()}
            lineage = {key: Lineage(i.parent, i.created) for key, i in infos.items()}
            picked = []
            for key in args.snapshots:
                if key not in infos:
                    raise UsageError(f"pool {config.pool_name} has no snapshot {key!r}")
                picked.append(Picked(key, infos[key].kind.value, infos[key].parent,
                                     config.pool_name))
            if len(picked) == 1 and picked[0].parent is not None:
                parent = infos[picked[0].parent]
                picked.insert(0, Picked(parent.key, parent.kind.value, parent.parent,
                                        config.pool_name))
            old, new = _pair(picked)
            if old is not None and old.key == new.key:
                return old, new, None
            _warn_active(old, new)
            old_root = await engine.mountpoint(old.key) if old is not None else None
            new_root = await engine.mountpoint(new.key)
            result = await trio.to_thread.run_sync(
                lambda: _compare(args, old, new, old_root, new_root, lineage,
                                 driver=config.driver))
            return old, new, result

    try:
        try:
            old, new, result = trio.run(session)
        except BaseExceptionGroup as group:  # the engine's nursery wraps what the body raised
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    except NotFound as error:
        raise UsageError(str(error)) from None
    except PoolError as error:
        raise EnvironmentProblem(str(error)) from None
    except SnapshotError as error:
        raise OperationFailed(str(error)) from None
    return _report(args, old, new, result)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def _warn_active(old: Picked | None, new: Picked) -> None:
    for snapshot in (old, new):
        if snapshot is not None and snapshot.kind == "active":
            log.warning("%s is active: files written while dmfs diff runs may be listed or "
                        "not (commit it for an exact answer)", snapshot.key)


def _compare(args: argparse.Namespace, old: Picked | None, new: Picked, old_root: Path | None,
             new_root: Path, lineage: dict[str, Any], driver: str = "ioctl") -> Any:
    from dmfs.diff import DiffError, compare_trees
    from dmfs.diff.lineage import racy_after_ns
    from dmfs.pool import PoolError

    related = old is not None and old.pool == new.pool
    racy_after = racy_after_ns(lineage, old.key, new.key) if related and old else None
    use_devices = not args.walk and os.geteuid() == 0
    load_delta = _delta_loader(old_root, new_root, driver) if related and use_devices else None
    try:
        return compare_trees(old_root, new_root, racy_after_ns=racy_after,
                             read_devices=use_devices, load_delta=load_delta)
    except (DiffError, PoolError) as error:
        raise OperationFailed(str(error)) from None


def _delta_loader(old_root: Path | None, new_root: Path, driver: str
                  ) -> Callable[[], Any] | None:
    if old_root is None:
        return None

    def load() -> Any:
        from dmfs.cli.preflight import EnvironmentProblem, open_device_mapper
        from dmfs.pool import PoolError, ThinPool, read_delta, thin_device_of

        try:
            dm = open_device_mapper(driver)
        except EnvironmentProblem as error:
            raise PoolError(str(error)) from None
        try:
            ends = [thin_device_of(dm, _devnum(root)) for root in (old_root, new_root)]
            if None in ends or ends[0].pool_name != ends[1].pool_name:  # type: ignore[union-attr]
                raise PoolError(f"{old_root} and {new_root} are not thin devices of one pool")
            pool = ThinPool(dm, ends[0].pool_name)  # type: ignore[union-attr]
            pool.attach()
            return read_delta(pool, ends[0].thin_id, ends[1].thin_id)  # type: ignore[union-attr]
        finally:
            dm.close()

    return load


def _devnum(root: Path) -> tuple[int, int]:
    st = os.stat(root)
    return os.major(st.st_dev), os.minor(st.st_dev)


def _report(args: argparse.Namespace, old: Picked | None, new: Picked, result: Any) -> int:
    from dmfs.diff import Summary

    changes = result.changes if result is not None else []
    summary = Summary.of(changes)
    for note in result.notes if result is not None else []:
        log.warning("%s", note)
    old_name = old.key if old is not None else "(empty)"

    def side(snapshot: Picked | None) -> dict[str, Any] | None:
        return None if snapshot is None else {"name": snapshot.key, "kind": snapshot.kind}

    data = {"old": side(old), "new": side(new), "changes": [c.as_dict() for c in changes],
            "summary": summary.as_dict(),
            "method": result.facts if result is not None else {"metadata": "none: the same "
                                                                "snapshot on both sides"}}
    lines = [c.line(types=args.types) for c in changes]
    lines.append(f"{summary.line()}: {old_name} -> {new.key}")
    emit(args, data, lines)
    return EXIT_FAILED if result is not None and result.facts.get("not_compared") else EXIT_OK
