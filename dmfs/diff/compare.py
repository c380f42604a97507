"""The comparison: which paths were added, removed, modified, renamed or retyped.

Both sides are trees of directories whose entries name inodes.  When the two
filesystems are related (snapshots of one ext4, see :mod:`dmfs.diff.lineage`),
an inode number with the same generation is the same file on both sides, and
the changes are defined in terms of inodes:

1. Directories correspond: the roots; a directory that is the same inode on
   both sides; otherwise a new directory and the old directory of the same
   name in the corresponding parent, if that old one is not still present
   elsewhere (``rm -r d; mkdir d`` keeps comparing ``d``'s entries by name).
2. An entry is (corresponding directory, name).  The same entry naming the
   same inode on both sides: **modified** when an attribute of the inode
   changed, else not listed.
3. Entries left over that name the same inode on both sides: **renamed**, the
   old and new paths paired in path order (hard links beyond the pairs are
   removed or added).
4. An entry left over on both sides: **modified** with ``inode`` among its
   attributes (the path now names another file), or **type changed** when the
   file types differ.
5. Anything else: **removed** (old side) or **added** (new side), every path
   of a removed or added directory included.

When the filesystems are not related (different pools), inode numbers mean
nothing: entries are matched by name only (rule 4 without ``inode``), and a
moved file is removed and added.

The attributes compared: content (files), target (symlinks), device number,
permission bits (not of symlinks), owner and group, modification time (not
of directories: their entries are reported instead), link count (not of
directories), extended attributes.  Access and change times are not: a copy
can never keep them.  An :class:`~dmfs.diff.evidence.Evidence` says what is
known without looking at a file, which is what makes the comparison fast; the
definitions above do not depend on it.
"""

from __future__ import annotations

import stat
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dmfs.diff.changes import Change, Kind, ordered_attributes
from dmfs.diff.evidence import Evidence, Verdict
from dmfs.diff.tree import Directory, Entry, Side, Tree, Unreadable, same_bytes


class _Link(NamedTuple):
    """One directory entry with its path (a tuple, as :class:`~dmfs.diff.tree.Entry`)."""

    rel: str
    ino: int
    file_type: int

    @classmethod
    def of(cls, directory: Directory, entry: Entry) -> _Link:
        return cls(directory.child_path(entry.name), entry.ino, entry.file_type)


@dataclass
class _Pending:
    kind: Kind
    old: _Link
    new: _Link
    file_type: int
    attributes: set[str] = field(default_factory=set)
    size: int | None = None  # set while the contents still need comparing


@dataclass
class Result:
    """The changes, in path order, and how they were found."""

    changes: list[Change]
    facts: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def compare_sides(old: Side, new: Side, evidence: Evidence) -> Result:
    """Compare two sides (``old`` may be an :class:`~dmfs.diff.tree.EmptySide`)."""
    old_tree = old.scan()

    def reuse(ino: int, path: str) -> list[Entry] | None:
        directory = old_tree.dirs.get(ino)
        if not evidence.related or directory is None:
            return None
        unchanged = evidence.verdict(ino, directory.path, path) is Verdict.UNCHANGED
        return directory.entries if unchanged else None

    new_tree = new.scan(reuse)
    return _Comparison(old, new, old_tree, new_tree, evidence).run()


class _Comparison:
    def __init__(self, old: Side, new: Side, old_tree: Tree, new_tree: Tree,
                 evidence: Evidence) -> None:
        self.old, self.new = old, new
        self.old_tree, self.new_tree = old_tree, new_tree
        self.evidence = evidence
        self.pending: list[_Pending] = []
        self.changes: list[Change] = []
        self.files_read = 0
        self.bytes_read = 0
        self.not_compared: set[str] = set()

    # -- entries -------------------------------------------------------------------
    def _correspondence(self) -> dict[int, int]:
        """New directory inode -> the old directory it is compared with (rule 1)."""
        related, old_dirs, new_dirs = self.evidence.related, self.old_tree.dirs, self.new_tree.dirs
        mapping = {self.new_tree.root_ino: self.old_tree.root_ino}
        same: dict[int, bool] = {}
        old_subdirs: dict[int, dict[str, int]] = {}  # old directory -> its directories' inodes

        def same_dir(ino: int) -> bool:
            if ino not in same:
                same[ino] = (related and ino in old_dirs and ino in new_dirs
                             and self._same_inode(ino, old_dirs[ino].path, new_dirs[ino].path))
            return same[ino]

        def old_subdir(old_dir: int, name: str) -> int | None:
            if old_dir not in old_subdirs:
                listed = old_dirs[old_dir].entries if old_dir in old_dirs else []
                old_subdirs[old_dir] = {e.name: e.ino for e in listed if e.ino in old_dirs}
            return old_subdirs[old_dir].get(name)

        pending = [self.new_tree.root_ino]
        while pending:
            dir_ino = pending.pop()
            directory, old_dir = new_dirs[dir_ino], mapping.get(dir_ino)
            for e in directory.entries:
                if e.file_type != stat.S_IFDIR or e.ino not in new_dirs:
                    continue
                pending.append(e.ino)
                if same_dir(e.ino):
                    mapping[e.ino] = e.ino
                    continue
                previous = old_subdir(old_dir, e.name) if old_dir is not None else None
                if previous is not None and not same_dir(previous):
                    mapping[e.ino] = previous
        return mapping

    def _pair_entries(self, mapping: dict[int, int]) -> tuple[dict[tuple[Any, ...], _Link],
                                                              dict[tuple[Any, ...], _Link]]:
        """Rule 2 for each entry present on both sides (what changed is recorded);
        the entries left over on each side, by (old directory, name) where the
        entry's directory corresponds to an old one.

        Directory by directory, so that the entries that did not change, nearly
        all of them, cost a name lookup and no record of their own: in the test
        guest each page of memory a program touches first costs ~60 us, and
        records with paths for every entry of both sides were ~1,400 such pages
        for 10,000 files (bench/diff_ops.py)."""
        related, old_dirs = self.evidence.related, self.old_tree.dirs
        unmatched_old: dict[tuple[Any, ...], _Link] = {}
        unmatched_new: dict[tuple[Any, ...], _Link] = {}
        paired: set[int] = set()
        for dir_ino, directory in self.new_tree.dirs.items():
            old_dir = mapping.get(dir_ino)
            old_directory = old_dirs.get(old_dir) if old_dir is not None else None
            if old_dir is None or old_directory is None:
                for e in directory.entries:
                    key = (old_dir, e.name) if old_dir is not None else ("new", dir_ino, e.name)
                    unmatched_new[key] = _Link.of(directory, e)
                continue
            paired.add(old_dir)
            left = {e.name: e for e in old_directory.entries}
            for e in directory.entries:
                previous = left.get(e.name)
                if previous is not None and related and previous.ino == e.ino:
                    # (paths only: nearly every pair is unchanged and needs no record)
                    old_rel = old_directory.child_path(e.name)
                    new_rel = directory.child_path(e.name)
                    verdict = self.evidence.verdict(e.ino, old_rel, new_rel)
                    if verdict is Verdict.UNCHANGED:
                        del left[e.name]
                        continue
                    if verdict is Verdict.METADATA_EQUAL or self.evidence.same_inode(
                            e.ino, old_rel, new_rel):
                        del left[e.name]
                        self._same_link(_Link(old_rel, previous.ino, previous.file_type),
                                        _Link(new_rel, e.ino, e.file_type), verdict)
                        continue
                unmatched_new[(old_dir, e.name)] = _Link.of(directory, e)
            for name, e in left.items():
                unmatched_old[(old_dir, name)] = _Link.of(old_directory, e)
        for dir_ino, old_directory in old_dirs.items():
            if dir_ino not in paired:
                for e in old_directory.entries:
                    unmatched_old[(dir_ino, e.name)] = _Link.of(old_directory, e)
        return unmatched_old, unmatched_new

    def _same_inode(self, ino: int, old_rel: str, new_rel: str) -> bool:
        verdict = self.evidence.verdict(ino, old_rel, new_rel)
        return verdict is not Verdict.CHANGED or self.evidence.same_inode(ino, old_rel, new_rel)

    def run(self) -> Result:
        if not self.old.empty:
            self._root()
        unmatched_old, unmatched_new = self._pair_entries(self._correspondence())
        # A directory one side could not list is left out on both sides.
        opaque = self.old.unreadable | self.new.unreadable
        if opaque:
            self.not_compared |= opaque
            inside = tuple(f"{path.rstrip('/')}/" for path in opaque)
            unmatched_old = {k: v for k, v in unmatched_old.items()
                             if not v.rel.startswith(inside)}
            unmatched_new = {k: v for k, v in unmatched_new.items()
                             if not v.rel.startswith(inside)}
        if self.evidence.related:
            self._renames(unmatched_old, unmatched_new)
        for key in [k for k in unmatched_new if k in unmatched_old]:
            self._attributes(Kind.MODIFIED, unmatched_old.pop(key), unmatched_new.pop(key),
                             replaced=True)
        for link in unmatched_old.values():
            self._one_sided(Kind.REMOVED, self.old, link)
        for link in unmatched_new.values():
            self._one_sided(Kind.ADDED, self.new, link)
        self._contents()
        for item in self.pending:
            if item.attributes or item.kind is Kind.RENAMED:
                self.changes.append(Change(
                    item.kind, item.old.rel if item.kind is Kind.RENAMED else item.new.rel,
                    item.file_type, new_path=item.new.rel if item.kind is Kind.RENAMED else None,
                    attributes=ordered_attributes(item.attributes)))
        self.changes.sort(key=lambda c: c.sort_key)
        facts = {"metadata": self.evidence.method, "related": self.evidence.related,
                 "files_read": self.files_read, "bytes_read": self.bytes_read,
                 **self.evidence.facts}
        notes = [f"{self.new.absolute(p) if p in self.new_tree.skipped else p}: another "
                 "filesystem is mounted there; not compared"
                 for p in (*self.old_tree.skipped, *self.new_tree.skipped)]
        if self.not_compared:
            facts["not_compared"] = sorted(self.not_compared)
            notes.append(f"not compared (permission denied; dmfs diff as root compares "
                         f"everything): {', '.join(sorted(self.not_compared))}")
        return Result(self.changes, facts, notes)

    # -- rules 2 to 5 --------------------------------------------------------------------
    def _root(self) -> None:
        root_old = _Link("/", self.old_tree.root_ino, stat.S_IFDIR)
        root_new = _Link("/", self.new_tree.root_ino, stat.S_IFDIR)
        if self.evidence.related and root_old.ino == root_new.ino:
            verdict = self.evidence.verdict(root_old.ino, "/", "/")
            if verdict is not Verdict.CHANGED:
                return
        self._attributes(Kind.MODIFIED, root_old, root_new, replaced=False)

    def _same_link(self, old: _Link, new: _Link, verdict: Verdict) -> None:
        if verdict is Verdict.CHANGED:
            self._attributes(Kind.MODIFIED, old, new, replaced=False)
            return
        # Every inode field is equal: only data can differ.
        known = self.evidence.stats(old.ino, new.ino)
        st = known[0] if known is not None else self.old.lstat(old.rel)
        if st is None:
            return
        item = _Pending(Kind.MODIFIED, old, new, stat.S_IFMT(st.st_mode))
        if stat.S_ISREG(st.st_mode):
            item.size = st.st_size
        elif stat.S_ISLNK(st.st_mode) and self.old.readlink(old.rel) != self.new.readlink(
                new.rel):
            item.attributes.add("target")
        self.pending.append(item)

    def _renames(self, unmatched_old: dict[tuple[Any, ...], _Link],
                 unmatched_new: dict[tuple[Any, ...], _Link]) -> None:
        old_by_ino: defaultdict[int, list[tuple[Any, ...]]] = defaultdict(list)
        new_by_ino: defaultdict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for key, link in unmatched_old.items():
            old_by_ino[link.ino].append(key)
        for key, link in unmatched_new.items():
            new_by_ino[link.ino].append(key)
        for ino in sorted(old_by_ino.keys() & new_by_ino.keys()):
            old_keys = sorted(old_by_ino[ino], key=lambda k: unmatched_old[k].rel)
            new_keys = sorted(new_by_ino[ino], key=lambda k: unmatched_new[k].rel)
            if not self.evidence.same_inode(ino, unmatched_old[old_keys[0]].rel,
                                            unmatched_new[new_keys[0]].rel):
                continue
            for old_key, new_key in zip(old_keys, new_keys, strict=False):
                self._attributes(Kind.RENAMED, unmatched_old.pop(old_key),
                                 unmatched_new.pop(new_key), replaced=False)

    def _one_sided(self, kind: Kind, side: Side, link: _Link) -> None:
        file_type = link.file_type
        if not file_type:
            st = side.lstat(link.rel)
            if st is None:
                return
            file_type = stat.S_IFMT(st.st_mode)
        self.changes.append(Change(kind, link.rel, file_type))

    def _attributes(self, kind: Kind, old: _Link, new: _Link, *, replaced: bool) -> None:
        known = self.evidence.stats(old.ino, new.ino)
        a, b = known if known is not None else (self.old.lstat(old.rel), self.new.lstat(new.rel))
        if a is None or b is None:  # gone meanwhile (a snapshot being written)
            if a is not None:
                self._one_sided(Kind.REMOVED, self.old, old)
            if b is not None:
                self._one_sided(Kind.ADDED, self.new, new)
            return
        old_type, new_type = stat.S_IFMT(a.st_mode), stat.S_IFMT(b.st_mode)
        if old_type != new_type:
            self.changes.append(Change(Kind.TYPE_CHANGED, new.rel, new_type,
                                       old_type=old_type))
            return
        item = _Pending(kind, old, new, new_type)
        changed = item.attributes
        if replaced and self.evidence.related:
            changed.add("inode")
        if new_type != stat.S_IFLNK and stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode):
            changed.add("mode")
        if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
            changed.add("owner")
        if new_type != stat.S_IFDIR:
            if a.st_mtime_ns != b.st_mtime_ns:
                changed.add("mtime")
            if a.st_nlink != b.st_nlink:
                changed.add("links")
        if new_type in (stat.S_IFCHR, stat.S_IFBLK) and a.st_rdev != b.st_rdev:
            changed.add("device")
        if new_type == stat.S_IFLNK and self.old.readlink(old.rel) != self.new.readlink(new.rel):
            changed.add("target")
        if new_type == stat.S_IFREG:
            if a.st_size != b.st_size:
                changed.add("content")
            else:
                item.size = a.st_size
        if not self.evidence.xattrs_equal(old.ino, new.ino):
            try:
                if self.old.xattrs(old.rel) != self.new.xattrs(new.rel):
                    changed.add("xattrs")
            except Unreadable as error:
                self.not_compared.add(f"{error.rel} (xattrs)")
        self.pending.append(item)

    def _contents(self) -> None:
        waiting = [item for item in self.pending if item.size is not None]
        self.evidence.plan_data_proofs(len(waiting), sum(item.size or 0 for item in waiting))
        for item in waiting:
            if item.size == 0 or self.evidence.data_equal(item.old.ino, item.new.ino):
                continue
            try:
                equal, read = same_bytes(self.old, item.old.rel, self.new, item.new.rel)
            except Unreadable as error:
                self.not_compared.add(f"{error.rel} (content)")
                continue
            self.files_read += 2
            self.bytes_read += read
            if not equal:
                item.attributes.add("content")
