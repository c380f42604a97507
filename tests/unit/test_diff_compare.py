"""The comparison's rules on plain directories (no snapshots needed).

Two unrelated directories are compared path by path.  Two directories of one
filesystem whose files are hard links of each other share inodes the way a
snapshot shares them with its parent, which is enough to check the rules that
follow inodes (renames, replacements), with lstat as the evidence.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmfs.diff import compare_trees
from dmfs.diff.tree import READ_CHUNK

STAMP = 1_600_000_000_000_000_000  # every file's mtime, unless a test changes it
FAR_FUTURE = 2**62


def stamp(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(STAMP, STAMP), follow_symlinks=False)


def lines(old: Path | None, new: Path, racy_after_ns: int | None = None) -> list[str]:
    result = compare_trees(old, new, racy_after_ns=racy_after_ns, read_devices=False)
    return [change.line(types=True) for change in result.changes]


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "same").write_text("same\n")
        (root / "etc" / "data").write_text("aaaa\n")
        (root / "lib").mkdir()
        (root / "lib" / "x").write_text("x\n")
        (root / "lnk").symlink_to("etc/same")
    return old, new


def test_the_same_directory_twice_has_no_differences(trees: tuple[Path, Path]) -> None:
    old, _ = trees
    result = compare_trees(old, old, racy_after_ns=None)
    assert result.changes == [] and result.facts["files_read"] == 0


def test_contents_and_attributes(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "etc" / "data").write_text("bbbb\n")  # same size, same mtime after stamp()
    (new / "lib" / "x").chmod(0o600)
    os.chown(new / "etc" / "same", 1000, 1000)
    (new / "lnk").unlink()
    (new / "lnk").symlink_to("lib/x")
    os.setxattr(new / "lib", "user.colour", b"blue")
    (new / "etc" / "grown").write_text("1")
    (old / "etc" / "grown").write_text("12")
    stamp(old)
    stamp(new)
    os.utime(new / "lib" / "x", ns=(STAMP, STAMP + 1))
    new.chmod(0o700)
    assert lines(old, new) == [
        "M\t/\t/\t(mode)",
        "M\tF\t/etc/data\t(content)",
        "M\tF\t/etc/grown\t(content)",
        "M\tF\t/etc/same\t(owner)",
        "M\t/\t/lib\t(xattrs)",
        "M\tF\t/lib/x\t(mode, mtime)",
        "M\t@\t/lnk\t(target)",
    ]


@pytest.mark.parametrize("differs_at", [None, 0, READ_CHUNK - 1, READ_CHUNK, 3 * READ_CHUNK + 7])
def test_contents_are_compared_across_read_chunks(tmp_path: Path, differs_at: int | None) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    data = bytearray(os.urandom(3 * READ_CHUNK + 8))
    for root in (old, new):
        root.mkdir()
        if differs_at is not None and root is new:
            data[differs_at] ^= 0xFF
        (root / "big").write_bytes(data)
        stamp(root)
    result = compare_trees(old, new, racy_after_ns=None, read_devices=False)
    assert [c.line(types=True) for c in result.changes] == (
        [] if differs_at is None else ["M\tF\t/big\t(content)"])
    # reading stops at the first chunk that differs
    chunks = len(data) // READ_CHUNK + 1 if differs_at is None else differs_at // READ_CHUNK + 1
    assert result.facts["bytes_read"] == 2 * min(len(data), chunks * READ_CHUNK)


def test_added_removed_and_retyped(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "lib" / "x").unlink()
    (new / "lib" / "x").mkdir()
    (new / "lib" / "x" / "inside").write_text("i")
    (new / "etc" / "same").unlink()
    (new / "etc" / "same").symlink_to("data")
    (new / "new" / "deep").mkdir(parents=True)
    (new / "new" / "deep" / "f").write_text("f")
    os.mkfifo(new / "pipe")
    (old / "gone").mkdir()
    (old / "gone" / "f").write_text("f")
    (new / "etc" / "data").unlink()
    stamp(old)
    stamp(new)
    assert lines(old, new) == [
        "-\tF\t/etc/data",
        "T\tF>@\t/etc/same",
        "-\t/\t/gone",
        "-\tF\t/gone/f",
        "T\tF>/\t/lib/x",
        "+\tF\t/lib/x/inside",
        "+\t/\t/new",
        "+\t/\t/new/deep",
        "+\tF\t/new/deep/f",
        "+\t|\t/pipe",
    ]
    # And the other way round.
    assert lines(new, old) == [
        "+\tF\t/etc/data",
        "T\t@>F\t/etc/same",
        "+\t/\t/gone",
        "+\tF\t/gone/f",
        "T\t/>F\t/lib/x",
        "-\tF\t/lib/x/inside",
        "-\t/\t/new",
        "-\t/\t/new/deep",
        "-\tF\t/new/deep/f",
        "-\t|\t/pipe",
    ]


def test_link_counts(trees: tuple[Path, Path]) -> None:
    old, new = trees
    os.link(new / "etc" / "data", new / "etc" / "data2")
    stamp(old)
    stamp(new)
    assert lines(old, new) == ["M\tF\t/etc/data\t(links)", "+\tF\t/etc/data2"]


def test_against_an_empty_filesystem(trees: tuple[Path, Path]) -> None:
    _, new = trees
    assert lines(None, new) == ["+\t/\t/etc", "+\tF\t/etc/data", "+\tF\t/etc/same",
                                "+\t/\t/lib", "+\tF\t/lib/x", "+\t@\t/lnk"]


def test_odd_names_are_escaped(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "a b\nc").write_text("x")
    (new / os.fsdecode(b"bad\xff")).write_text("x")
    stamp(new)
    stamp(old)
    assert lines(old, new) == ["+\tF\t/a\\040b\\012c", "+\tF\t/bad\\377"]


# ---- related: hard links share inodes -------------------------------------------------


@pytest.fixture
def farm(tmp_path: Path) -> tuple[Path, Path]:
    """``old`` with files; ``new`` with directories of the same names and hard links of
    the files.  The directories are other inodes: each is listed as replaced."""
    old, new = tmp_path / "old", tmp_path / "new"
    for path in ("a", "a/sub", "b"):
        (old / path).mkdir(parents=True)
    for path in ("a/f", "a/sub/g", "b/h", "top"):
        (old / path).write_text(path)
    for directory in [old, *[p for p in old.rglob("*") if p.is_dir()]]:
        (new / directory.relative_to(old)).mkdir(exist_ok=True)
    for file in [p for p in old.rglob("*") if p.is_file()]:
        os.link(file, new / file.relative_to(old))
    return old, new


@pytest.mark.parametrize("racy_after_ns", [FAR_FUTURE, 0], ids=["ctimes-trusted", "racy"])
def test_renames_follow_inodes(farm: tuple[Path, Path], racy_after_ns: int) -> None:
    old, new = farm
    os.rename(new / "a" / "f", new / "b" / "moved")
    os.rename(new / "top", new / "a" / "sub" / "top")
    (new / "b" / "h").unlink()
    (new / "b" / "h").write_text("b/h")  # a new inode at the same path: replaced
    stamp(old)
    stamp(new)
    directories = ["M\t/\t/a\t(inode)", "M\t/\t/a/sub\t(inode)", "M\t/\t/b\t(inode)"]
    assert lines(old, new, racy_after_ns) == [
        directories[0],
        "R\tF\t/a/f -> /b/moved",
        directories[1],
        directories[2],
        "M\tF\t/b/h\t(inode)",
        "R\tF\t/top -> /a/sub/top",
    ]
    assert lines(new, old, racy_after_ns) == [
        directories[0],
        directories[1],
        "R\tF\t/a/sub/top -> /top",
        directories[2],
        "M\tF\t/b/h\t(inode)",
        "R\tF\t/b/moved -> /a/f",
    ]


def test_unrelated_directories_show_moves_as_removed_and_added(farm: tuple[Path, Path]
                                                               ) -> None:
    old, new = farm
    os.rename(new / "a" / "f", new / "b" / "moved")
    stamp(old)
    stamp(new)
    assert lines(old, new) == ["-\tF\t/a/f", "+\tF\t/b/moved"]


def test_a_recreated_directory_is_compared_by_name(farm: tuple[Path, Path]) -> None:
    old, new = farm
    (new / "a" / "sub" / "g").unlink()
    (new / "a" / "sub").rmdir()
    (new / "a" / "sub").mkdir()
    os.link(old / "a" / "sub" / "g", new / "a" / "sub" / "g")
    stamp(old)
    stamp(new)
    # Another directory inode at a/sub, again; its entry g is still the same file.
    assert lines(old, new, FAR_FUTURE) == [
        "M\t/\t/a\t(inode)", "M\t/\t/a/sub\t(inode)", "M\t/\t/b\t(inode)"]


def test_a_directory_moved_away_is_not_compared_with_its_successor(farm: tuple[Path, Path]
                                                                   ) -> None:
    old, new = farm
    os.rename(new / "a", new / "a.old")
    (new / "a").mkdir()
    (new / "a" / "f").write_text("a/f")
    stamp(old)
    stamp(new)
    # Old a's files are in a.old now (and a.old is a new directory here, where
    # directories cannot be hard links): renames come before names.
    assert lines(old, new, FAR_FUTURE) == [
        "M\t/\t/a\t(inode)",
        "+\t/\t/a.old",
        "+\t/\t/a.old/sub",
        "+\tF\t/a/f",
        "R\tF\t/a/f -> /a.old/f",
        "-\t/\t/a/sub",
        "R\tF\t/a/sub/g -> /a.old/sub/g",
        "M\t/\t/b\t(inode)",
    ]
