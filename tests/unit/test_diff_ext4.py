"""The ext4 inode table reader, on images made by mkfs.ext4 and changed with debugfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dmfs.diff import ext4
from dmfs.diff.evidence import Ext4Evidence, Verdict
from dmfs.pool.thindelta import BlockDelta

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None
                                or shutil.which("debugfs") is None,
                                reason="needs e2fsprogs (mkfs.ext4, debugfs)")


def debugfs(image: Path, *commands: str) -> str:
    result = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands),
                            capture_output=True, text=True, check=True)
    return result.stdout


def inode_numbers(image: Path) -> dict[str, int]:
    out = subprocess.run(["debugfs", "-R", "ls -p /", str(image)], capture_output=True,
                         text=True, check=True).stdout
    numbers = {}
    for line in out.splitlines():
        fields = line.split("/")
        if len(fields) > 5 and fields[5] not in (".", ".."):
            numbers[fields[5]] = int(fields[1])
    return numbers


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """An 8 MiB ext4 image with two 20,000-byte files, a directory and a symlink."""
    image = tmp_path / "base.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", str(image), "8M"],
                   check=True, capture_output=True)
    source = tmp_path / "src"
    source.write_bytes(bytes(range(256)) * 78 + b"x" * 32)
    debugfs(image, f"write {source} f1", f"write {source} f2", "mkdir d", "symlink l /f1")
    return image


def copy_of(image: Path, name: str) -> Path:
    copy = image.with_name(name)
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    return copy


def test_the_superblock_and_groups(base: Path) -> None:
    with ext4.Image(str(base)) as image:
        g = image.geometry
        assert (g.block_size, g.inode_size) == (1024, 256)  # mke2fs's "small" type
        assert g.groups == len(image.groups) >= 1
        assert image.groups[0].used >= 15  # reserved inodes, lost+found, our four


def test_not_ext4_is_unsupported(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(65536))
    with pytest.raises(ext4.Unsupported):
        ext4.Image(str(blank))


def test_changed_records_are_found_and_access_times_ignored(base: Path) -> None:
    numbers = inode_numbers(base)
    changed = copy_of(base, "changed.img")
    debugfs(changed, "sif /f1 mode 0100600", "sif /f2 atime 20200101",
            "sif /d generation 7", "sif /l uid 1000")
    with ext4.Image(str(base)) as old, ext4.Image(str(changed)) as new:
        ext4.load_pair(old, new)
        assert ext4.changed_inodes(old, new) == {numbers["f1"], numbers["d"], numbers["l"]}
        d_old, d_new = old.inode(numbers["d"]), new.inode(numbers["d"])
        assert d_old is not None and d_new is not None
        assert (ext4.generation(d_old), ext4.generation(d_new)) == (0, 7)
        assert ext4.mode(new.inode(numbers["f1"]) or b"") == 0o100600


def test_times_extents_and_xattrs_as_the_kernel_reports_them(base: Path) -> None:
    numbers = inode_numbers(base)
    debugfs(base, "sif /f1 ctime 20230405060708", "sif /f1 ctime_extra 0x4",
            "ea_set /f2 user.colour blue")
    blocks = subprocess.run(["debugfs", "-R", "blocks /f1", str(base)], capture_output=True,
                            text=True, check=True).stdout.split()
    with ext4.Image(str(base)) as image:
        image.load_tables([group.used for group in image.groups])
        f1 = image.inode(numbers["f1"])
        f2 = image.inode(numbers["f2"])
        assert f1 is not None and f2 is not None
        # 2023-04-05 06:07:08 UTC, and ctime_extra 4 = 1 ns (the low two bits are the epoch).
        assert ext4.ctime_ns(f1) == 1680674828 * 10**9 + 1
        extents = image.extents(f1)
        assert extents is not None
        mapped = [e.physical + i for e in extents for i in range(e.length)]
        assert mapped == [int(b) for b in blocks]
        assert ext4.xattr_block(f2) == 0 and b"colour" in ext4.in_inode_xattrs(f2)
        assert b"colour" not in ext4.in_inode_xattrs(f1)


def test_evidence_from_records_and_blocks(base: Path) -> None:
    numbers = inode_numbers(base)
    changed = copy_of(base, "changed.img")
    debugfs(changed, "sif /f2 mode 0100600")
    with ext4.Image(str(base)) as old, ext4.Image(str(changed)) as new:
        later = 2**62  # every ctime is before the split
        evidence = Ext4Evidence(old, new, later)
        assert evidence.verdict(numbers["f1"], "/f1", "/f1") is Verdict.UNCHANGED
        assert evidence.verdict(numbers["f2"], "/f2", "/f2") is Verdict.CHANGED
        assert evidence.same_inode(numbers["f2"], "/f2", "/f2")
        # ctimes at or after the split: equal records are not enough.
        assert Ext4Evidence(old, new, 0).verdict(numbers["f1"], "/f1", "/f1") is (
            Verdict.METADATA_EQUAL)
        # Same blocks on both sides: equal exactly when the pool shares them.
        assert not evidence.data_equal(numbers["f2"], numbers["f2"])  # no delta: unknown
        f2 = old.extents(old.inode(numbers["f2"]) or b"")
        assert f2 is not None
        block = old.geometry.block_size
        start = f2[0].physical * block
        evidence.delta = BlockDelta(((0, 1024),))
        assert evidence.data_equal(numbers["f2"], numbers["f2"])
        evidence.delta = BlockDelta(((start, start + block),))
        assert not evidence.data_equal(numbers["f2"], numbers["f2"])
        # Two files with the same bytes in different blocks are not proved equal.
        evidence.delta = BlockDelta(())
        assert not evidence.data_equal(numbers["f1"], numbers["f2"])


def test_a_delta_is_read_only_when_cheaper_than_reading(base: Path) -> None:
    changed = copy_of(base, "changed.img")
    calls: list[int] = []

    def load() -> BlockDelta:
        calls.append(1)
        return BlockDelta(())

    with ext4.Image(str(base)) as old, ext4.Image(str(changed)) as new:
        evidence = Ext4Evidence(old, new, 2**62, load)
        evidence.plan_data_proofs(3, 30_000)
        assert not calls and evidence.delta is None
        evidence.plan_data_proofs(50, 500 * 2**20)
        assert calls == [1] and evidence.delta is not None


def test_a_record_gives_what_lstat_would(base: Path) -> None:
    numbers = inode_numbers(base)
    debugfs(base, "sif /f1 uid 70000", "sif /f1 gid 567",
            "sif /f1 mtime 20230405060708", "sif /f1 mtime_extra 0x10",
            "sif /f1 links_count 3", "mknod tty c 4 200", "mknod disk b 259 300")
    numbers = inode_numbers(base) | numbers
    with ext4.Image(str(base)) as image:
        image.load_tables([group.used for group in image.groups])
        f1 = ext4.stat_of(image.inode(numbers["f1"]) or b"")
        assert (f1.st_uid, f1.st_gid) == (70000, 567)  # uid: 16 bits and 16 more
        assert f1.st_size == 20000 and f1.st_nlink == 3
        assert f1.st_mtime_ns == 1680674828 * 10**9 + 4  # extra 0x10: 4 ns
        assert f1.st_mode == 0o100644
        tty = ext4.stat_of(image.inode(numbers["tty"]) or b"")
        disk = ext4.stat_of(image.inode(numbers["disk"]) or b"")
        assert tty.st_rdev == os.makedev(4, 200)
        assert disk.st_rdev == os.makedev(259, 300)  # the new encoding
