"""A model of a snapshot's files for ``dmfs diff`` tests: random layers, expected changes.

:class:`FsModel` knows which path names which inode (hard links share one),
and every attribute dmfs diff compares, including modification times: every
operation that creates or writes a file sets its mtime explicitly, to a value
drawn from the seeded generator, so that the model can predict every change
exactly.  :func:`random_layer` applies random operations to a real directory
and to the model at once; :func:`expected_changes` is the definition of the
changes in dmfs.diff.compare's docstring, written again over the model, where
inode identity is known rather than inferred.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

KINDS = {"file": "F", "dir": "/", "symlink": "@", "fifo": "|"}
FILE_MODES = (0o644, 0o600, 0o755, 0o640, 0o444)
DIR_MODES = (0o755, 0o700, 0o750)
OWNERS = ((0, 0), (1000, 1000), (1001, 100))
MTIME_BASE = 1_600_000_000 * 10**9
_identities = itertools.count()


@dataclass(eq=False)
class Inode:
    """One file of the model; hard links are the same object under two paths, and
    ``ident`` stays the same in copies of the model (a snapshot's child)."""

    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    content: bytes = b""
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    ident: int = field(default_factory=lambda: next(_identities))


class FsModel:
    """Path (relative, "" for the root) -> inode, for one snapshot's files."""

    def __init__(self) -> None:
        self.paths: dict[str, Inode] = {"": Inode("dir", 0o755),
                                        "lost+found": Inode("dir", 0o700)}
        self.names = 0

    def copy(self) -> FsModel:
        clone = FsModel()
        clone.paths = copy.deepcopy(self.paths)  # keeps hard links shared
        clone.names = self.names
        return clone

    def fresh_name(self, rng: random.Random) -> str:
        self.names += 1
        return f"{rng.choice('abcdefgh')}{self.names}"

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, node in self.paths.items()
                      if node.kind in kinds and p not in ("", "lost+found"))

    def links(self, node: Inode) -> int:
        return sum(1 for other in self.paths.values() if other.ident == node.ident)


def _mtime(rng: random.Random) -> int:
    return MTIME_BASE + rng.randrange(10**12) * 1000


def _content(rng: random.Random) -> bytes:
    size = rng.choice([0, rng.randrange(1, 200), rng.randrange(200, 6000),
                       rng.randrange(60_000, 140_000)])
    return rng.randbytes(size)


def _write(path: Path, node: Inode) -> None:
    path.write_bytes(node.content)
    os.chmod(path, node.mode)
    os.chown(path, node.uid, node.gid)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns))


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def random_layer(model: FsModel, root: Path, rng: random.Random, count: int) -> None:
    """Apply ``count`` random operations to the files under ``root`` and to ``model``."""
    for _ in range(count):
        op = rng.choice(OPERATIONS)
        op(model, root, rng)


def _new_path(model: FsModel, rng: random.Random) -> str:
    directory = rng.choice(["", *model.of_kind("dir")])
    name = model.fresh_name(rng)
    return f"{directory}/{name}" if directory else name


def op_write_new(model: FsModel, root: Path, rng: random.Random) -> None:
    path = _new_path(model, rng)
    uid, gid = rng.choice(OWNERS)
    node = Inode("file", rng.choice(FILE_MODES), uid, gid, _mtime(rng), _content(rng))
    _write(root / path, node)
    model.paths[path] = node


def op_mkdir(model: FsModel, root: Path, rng: random.Random) -> None:
    path = _new_path(model, rng)
    node = Inode("dir", rng.choice(DIR_MODES))
    (root / path).mkdir()
    os.chmod(root / path, node.mode)
    model.paths[path] = node


def op_symlink(model: FsModel, root: Path, rng: random.Random) -> None:
    path = _new_path(model, rng)
    node = Inode("symlink", 0o777, mtime_ns=_mtime(rng), target=f"t{rng.randrange(10**6)}")
    os.symlink(node.target, root / path)
    os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    model.paths[path] = node


def op_fifo(model: FsModel, root: Path, rng: random.Random) -> None:
    path = _new_path(model, rng)
    node = Inode("fifo", 0o644, mtime_ns=_mtime(rng))
    os.mkfifo(root / path, node.mode)
    os.chmod(root / path, node.mode)
    os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns))
    model.paths[path] = node


def op_hard_link(model: FsModel, root: Path, rng: random.Random) -> None:
    files = model.of_kind("file")
    if files:
        source, path = rng.choice(files), _new_path(model, rng)
        os.link(root / source, root / path)
        model.paths[path] = model.paths[source]


def op_chmod(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir", "fifo")
    if paths:
        path = rng.choice(paths)
        node = model.paths[path]
        node.mode = rng.choice(DIR_MODES if node.kind == "dir" else FILE_MODES)
        os.chmod(root / path, node.mode)


def op_chown(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir", "fifo", "symlink")
    if paths:
        path = rng.choice(paths)
        node = model.paths[path]
        node.uid, node.gid = rng.choice(OWNERS)
        os.chown(root / path, node.uid, node.gid, follow_symlinks=False)


def op_xattr(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir")
    if paths:
        path = rng.choice(paths)
        node = model.paths[path]
        name = f"user.k{rng.randrange(3)}"
        if name in node.xattrs and rng.random() < 0.4:
            del node.xattrs[name]
            os.removexattr(root / path, name)
        else:
            node.xattrs[name] = rng.randbytes(rng.randrange(1, 40))
            os.setxattr(root / path, name, node.xattrs[name])


def op_rewrite_in_place(model: FsModel, root: Path, rng: random.Random) -> None:
    """Same size, same mtime, other bytes: only the contents tell."""
    files = [p for p in model.of_kind("file") if model.paths[p].content]
    if files:
        path = rng.choice(files)
        node = model.paths[path]
        node.content = bytes(b ^ 0x5A for b in node.content)
        with open(root / path, "r+b") as f:
            f.write(node.content)
        os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns))


def op_rewrite(model: FsModel, root: Path, rng: random.Random) -> None:
    files = model.of_kind("file")
    if files:
        path = rng.choice(files)
        node = model.paths[path]
        node.content, node.mtime_ns = _content(rng), _mtime(rng)
        with open(root / path, "r+b") as f:
            f.truncate(0)
            f.write(node.content)
        os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns))


def op_touch(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "fifo")
    if paths:
        path = rng.choice(paths)
        node = model.paths[path]
        node.mtime_ns = _mtime(rng)
        os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns))


def op_rename(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir", "symlink", "fifo")
    if not paths:
        return
    source = rng.choice(paths)
    targets = [d for d in ["", *model.of_kind("dir")]
               if d != source and not d.startswith(source + "/")]
    directory = rng.choice(targets)
    name = model.fresh_name(rng)
    if model.paths[source].kind == "file" and rng.random() < 0.3:
        files = [p for p in model.of_kind("file")
                 if p != source and model.paths[p].ident != model.paths[source].ident]
        if files:  # onto an existing file, which loses that name
            destination = rng.choice(files)
            os.rename(root / source, root / destination)
            model.paths[destination] = model.paths.pop(source)
            return
    destination = f"{directory}/{name}" if directory else name
    os.rename(root / source, root / destination)
    for path in sorted(model.paths):
        if path == source or path.startswith(source + "/"):
            model.paths[destination + path[len(source):]] = model.paths.pop(path)


def op_replace(model: FsModel, root: Path, rng: random.Random) -> None:
    """The way package managers change a file: a new one renamed over it."""
    files = model.of_kind("file")
    if files:
        path = rng.choice(files)
        old = model.paths[path]
        node = Inode("file", old.mode, old.uid, old.gid, old.mtime_ns,
                     rng.choice([old.content, _content(rng)]))
        temporary = root / f"{path}.tmp-{model.fresh_name(rng)}"
        _write(temporary, node)
        os.rename(temporary, root / path)
        model.paths[path] = node


def _remove(model: FsModel, root: Path, path: str) -> None:
    if model.paths[path].kind == "dir":
        shutil.rmtree(root / path)
    else:
        (root / path).unlink()
    for other in [p for p in model.paths if p == path or p.startswith(path + "/")]:
        del model.paths[other]


def op_remove(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir", "symlink", "fifo")
    if paths:
        _remove(model, root, rng.choice(paths))


def op_retype(model: FsModel, root: Path, rng: random.Random) -> None:
    paths = model.of_kind("file", "dir", "symlink", "fifo")
    if not paths:
        return
    path = rng.choice(paths)
    kind = rng.choice([k for k in ("file", "dir", "symlink") if k != model.paths[path].kind])
    _remove(model, root, path)
    if kind == "file":
        node = Inode("file", 0o644, mtime_ns=_mtime(rng), content=_content(rng))
        _write(root / path, node)
    elif kind == "dir":
        node = Inode("dir", 0o755)
        (root / path).mkdir()
        os.chmod(root / path, node.mode)
    else:
        node = Inode("symlink", 0o777, mtime_ns=_mtime(rng), target="retyped")
        os.symlink(node.target, root / path)
        os.utime(root / path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    model.paths[path] = node


OPERATIONS = [op_write_new] * 5 + [op_mkdir] * 2 + [
    op_symlink, op_fifo, op_hard_link, op_chmod, op_chown, op_xattr, op_rewrite_in_place,
    op_rewrite_in_place, op_rewrite, op_touch, op_rename, op_rename, op_replace, op_remove,
    op_retype]


# ---- what dmfs diff must answer ---------------------------------------------------------


def _attributes(old: FsModel, a: Inode, new: FsModel, b: Inode, *, replaced: bool,
                related: bool) -> list[str]:
    changed = set()
    if replaced and related:
        changed.add("inode")
    if b.kind != "symlink" and a.mode != b.mode:
        changed.add("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        changed.add("owner")
    if b.kind != "dir":
        if a.mtime_ns != b.mtime_ns:
            changed.add("mtime")
        if old.links(a) != new.links(b):
            changed.add("links")
    if b.kind == "symlink" and a.target != b.target:
        changed.add("target")
    if b.kind == "file" and a.content != b.content:
        changed.add("content")
    if a.xattrs != b.xattrs:
        changed.add("xattrs")
    order = ("inode", "content", "target", "device", "mode", "owner", "mtime", "links",
             "xattrs")
    return [name for name in order if name in changed]


def expected_changes(old: FsModel | None, new: FsModel, related: bool = True) -> list[str]:
    """The lines ``dmfs diff -F`` prints for these two states, without the summary."""
    def ident(node: Inode) -> int:
        return node.ident

    empty = old is None
    if old is None:
        old = FsModel()
        old.paths = {"": Inode("dir", 0o755)}
    out: list[tuple[str, str, str]] = []  # (sort path, letter, line)

    def emit(letter: str, kind: str, path: str, rest: str = "", attributes: list[str] = ()
             ) -> None:
        line = f"{letter}\t{kind}\t/{path}{rest}"
        if attributes:
            line += f"\t({', '.join(attributes)})"
        out.append((f"/{path}", letter, line))

    def name(path: str) -> str:
        return path.rpartition("/")[2]

    old_dirs = {ident(n) for n in old.paths.values() if n.kind == "dir"}
    new_dirs = {ident(n) for n in new.paths.values() if n.kind == "dir"}
    old_entries = {(ident(old.paths[_parent(p)]), name(p)): p for p in old.paths if p}
    mapping = {ident(new.paths[""]): ident(old.paths[""])}
    for path in sorted((p for p in new.paths if p and new.paths[p].kind == "dir"),
                       key=lambda p: p.count("/")):
        node, parent = new.paths[path], mapping.get(ident(new.paths[_parent(path)]))
        if related and ident(node) in old_dirs:
            mapping[ident(node)] = ident(node)
            continue
        previous = old_entries.get((parent, name(path))) if parent is not None else None
        if (previous is not None and old.paths[previous].kind == "dir"
                and not (related and ident(old.paths[previous]) in new_dirs)):
            mapping[ident(node)] = ident(old.paths[previous])
    new_entries = {}
    for path in (p for p in new.paths if p):
        parent = ident(new.paths[_parent(path)])
        key = (mapping[parent], name(path)) if parent in mapping else ("new", parent,
                                                                        name(path))
        new_entries[key] = path

    def compare(kind_letter: str, op: str, np: str, *, replaced: bool) -> None:
        a, b = old.paths[op], new.paths[np]
        if a.kind != b.kind:
            emit("T", f"{KINDS[a.kind]}>{KINDS[b.kind]}", np)
            return
        attributes = _attributes(old, a, new, b, replaced=replaced, related=related)
        if kind_letter == "R":
            emit("R", KINDS[b.kind], op, f" -> /{np}", attributes)
        elif attributes:
            emit("M", KINDS[b.kind], np, attributes=attributes)

    if not empty:
        compare("M", "", "", replaced=False)
    unmatched_old, unmatched_new = dict(old_entries), {}
    for key, path in new_entries.items():
        previous = unmatched_old.get(key)
        if previous is not None and related and old.paths[previous].ident == new.paths[path].ident:
            del unmatched_old[key]
            compare("M", previous, path, replaced=False)
        else:
            unmatched_new[key] = path
    if related:
        by_inode: dict[int, tuple[list, list]] = {}
        for key, path in unmatched_old.items():
            by_inode.setdefault(ident(old.paths[path]), ([], []))[0].append(key)
        for key, path in unmatched_new.items():
            if ident(new.paths[path]) in by_inode:
                by_inode[ident(new.paths[path])][1].append(key)
        for old_keys, new_keys in by_inode.values():
            old_keys.sort(key=lambda k: unmatched_old[k])
            new_keys.sort(key=lambda k: unmatched_new[k])
            for old_key, new_key in zip(old_keys, new_keys, strict=False):
                compare("R", unmatched_old.pop(old_key), unmatched_new.pop(new_key),
                        replaced=False)
    for key in [k for k in unmatched_new if k in unmatched_old]:
        compare("M", unmatched_old.pop(key), unmatched_new.pop(key), replaced=True)
    for path in unmatched_old.values():
        emit("-", KINDS[old.paths[path].kind], path)
    for path in unmatched_new.values():
        emit("+", KINDS[new.paths[path].kind], path)
    return [line for _, _, line in sorted(out)]


def describe(root: Path) -> dict[str, tuple]:
    """The real files under ``root`` in the model's terms, to check the model against."""
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
             stat.S_IFIFO: "fifo"}
    found: dict[str, tuple] = {}
    for path in [root, *root.rglob("*")]:
        rel = str(path.relative_to(root)) if path != root else ""
        st = path.lstat()
        kind = kinds[stat.S_IFMT(st.st_mode)]
        data = (path.read_bytes() if kind == "file" else
                os.readlink(path) if kind == "symlink" else None)
        xattrs = ({n: os.getxattr(path, n) for n in os.listxattr(path)}
                  if kind in ("file", "dir") else {})
        found[rel] = (kind, stat.S_IMODE(st.st_mode) if kind != "symlink" else 0o777,
                      st.st_uid, st.st_gid, None if kind == "dir" else st.st_mtime_ns, data,
                      xattrs)
    return found


def model_view(model: FsModel) -> dict[str, tuple]:
    """What :func:`describe` finds when the model is right."""
    return {path: (n.kind, n.mode, n.uid, n.gid, None if n.kind == "dir" else n.mtime_ns,
                   n.content if n.kind == "file" else n.target if n.kind == "symlink" else None,
                   n.xattrs)
            for path, n in model.paths.items()}
