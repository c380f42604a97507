"""dmfs diff's pure parts: change lines and JSON, the lineage's split time, thin_delta's output."""

from __future__ import annotations

import stat

import pytest

from dmfs.diff.changes import Change, Kind, Summary, escape
from dmfs.diff.lineage import RACY_MARGIN_NS, Lineage, ancestry, racy_after_ns, split_ns, stamp_ns
from dmfs.pool.errors import PoolError
from dmfs.pool.thindelta import BlockDelta, parse_thin_delta


@pytest.mark.parametrize(("path", "escaped"), [
    ("/etc/passwd", "/etc/passwd"),
    ("/a b", "/a\\040b"),
    ("/tab\there", "/tab\\011here"),
    ("/new\nline", "/new\\012line"),
    ("/back\\slash", "/back\\134slash"),
    ("/café", "/café"),  # printable UTF-8 stays readable
    ("/nbsp\u00a0x", "/nbsp\\302\\240x"),  # a space that is not ASCII is still white space
    ("/bad\udcff", "/bad\\377"),  # a byte that is not UTF-8 (surrogateescape)
])
def test_paths_are_escaped_to_one_unbroken_field(path: str, escaped: str) -> None:
    assert escape(path) == escaped
    assert len(escape(path).split()) == 1


def test_change_lines_look_like_zfs_diff() -> None:
    modified = Change(Kind.MODIFIED, "/etc/passwd", stat.S_IFREG,
                      attributes=("content", "mtime"))
    assert modified.line() == "M\t/etc/passwd\t(content, mtime)"
    assert modified.line(types=True) == "M\tF\t/etc/passwd\t(content, mtime)"
    renamed = Change(Kind.RENAMED, "/a dir", stat.S_IFDIR, new_path="/b")
    assert renamed.line() == "R\t/a\\040dir -> /b"
    assert renamed.line(types=True) == "R\t/\t/a\\040dir -> /b"
    retyped = Change(Kind.TYPE_CHANGED, "/x", stat.S_IFLNK, old_type=stat.S_IFREG)
    assert retyped.line(types=True) == "T\tF>@\t/x"
    assert Change(Kind.ADDED, "/f", stat.S_IFIFO).line(types=True) == "+\t|\t/f"
    assert Change(Kind.REMOVED, "/s", stat.S_IFSOCK).line() == "-\t/s"


def test_change_json_keeps_raw_paths() -> None:
    change = Change(Kind.RENAMED, "/a b", stat.S_IFREG, new_path="/c", attributes=("mode",))
    assert change.as_dict() == {"change": "renamed", "path": "/a b", "new_path": "/c",
                                "file_type": "file", "attributes": ["mode"]}
    retyped = Change(Kind.TYPE_CHANGED, "/x", stat.S_IFDIR, old_type=stat.S_IFREG).as_dict()
    assert retyped["file_type"] == "directory" and retyped["old_file_type"] == "file"


def test_summary() -> None:
    changes = [Change(Kind.ADDED, "/a", stat.S_IFREG), Change(Kind.ADDED, "/b", stat.S_IFREG),
               Change(Kind.TYPE_CHANGED, "/c", stat.S_IFDIR, old_type=stat.S_IFREG)]
    summary = Summary.of(changes)
    assert summary.line() == "2 added, 0 removed, 0 modified, 0 renamed, 1 type changed"
    assert summary.as_dict() == {"added": 2, "removed": 0, "modified": 0, "renamed": 0,
                                 "type_changed": 1}
    assert Summary.of([]).line() == "no differences"


# ---- lineage ------------------------------------------------------------------------

LINEAGE = {
    "base": Lineage(None, "2024-05-01T10:00:00.000000Z"),
    "app": Lineage("base", "2024-05-01T10:01:00.000000Z"),
    "app2": Lineage("app", "2024-05-01T10:02:00.500000Z"),
    "tool": Lineage("base", "2024-05-01T10:03:00.000000Z"),
    "other": Lineage(None, "2024-05-01T09:00:00.250000Z"),
}


def test_stamps_are_read_to_the_microsecond() -> None:
    assert stamp_ns("1970-01-01T00:00:01.000002Z") == 1_000_002_000
    assert stamp_ns("2024-05-01T10:02:00.500000Z") - stamp_ns("2024-05-01T10:02:00Z") == 5e8


def test_split_is_the_first_snapshot_below_the_common_ancestor() -> None:
    at = stamp_ns
    # A descendant: only its side changed, from the child of the ancestor on.
    assert split_ns(LINEAGE, "base", "app2") == at("2024-05-01T10:01:00Z")
    assert split_ns(LINEAGE, "app2", "base") == at("2024-05-01T10:01:00Z")
    assert split_ns(LINEAGE, "app", "app2") == at("2024-05-01T10:02:00.5Z")
    # Cousins: whichever side started first.
    assert split_ns(LINEAGE, "app2", "tool") == at("2024-05-01T10:01:00Z")
    # No common snapshot: both copy the base device; the older root started first.
    assert split_ns(LINEAGE, "other", "app") == at("2024-05-01T09:00:00.25Z")
    assert split_ns(LINEAGE, "app", "app") is None
    assert racy_after_ns(LINEAGE, "base", "app") == at("2024-05-01T10:01:00Z") - RACY_MARGIN_NS


def test_ancestry_refuses_a_broken_lineage() -> None:
    assert ancestry(LINEAGE, "app2") == ["app2", "app", "base"]
    with pytest.raises(KeyError):
        ancestry({"a": Lineage("gone", "2024-05-01T10:00:00Z")}, "a")
    with pytest.raises(KeyError):
        ancestry({"a": Lineage("b", "x"), "b": Lineage("a", "x")}, "a")


# ---- thin_delta ---------------------------------------------------------------------

THIN_DELTA_OUTPUT = """\
<superblock uuid="" time="2" transaction="0" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <different begin="0" length="1"/>
    <same begin="1" length="17"/>
    <different begin="18" length="2"/>
    <right_only begin="20" length="1"/>
    <left_only begin="30" length="3"/>
  </diff>
</superblock>
"""


def test_thin_delta_output_becomes_byte_ranges() -> None:
    block = 128 * 512
    delta = parse_thin_delta(THIN_DELTA_OUTPUT)
    # 18-19 different and 20 right-only touch: one range.
    assert delta.ranges == ((0, block), (18 * block, 21 * block), (30 * block, 33 * block))
    assert delta.size == 7 * block


def test_thin_delta_without_its_xml_is_an_error() -> None:
    with pytest.raises(PoolError):
        parse_thin_delta("thin_delta: no such device\n")
    with pytest.raises(PoolError):
        parse_thin_delta("<superblock><diff/></superblock>")


def test_block_delta_clear() -> None:
    delta = BlockDelta(((100, 200), (300, 400)))
    assert delta.clear(0, 100) and delta.clear(200, 100) and delta.clear(400, 1000)
    assert not delta.clear(99, 2) and not delta.clear(150, 1) and not delta.clear(199, 1)
    assert not delta.clear(0, 1000) and not delta.clear(250, 51)
    assert delta.clear(250, 50) and delta.clear(123, 0)
    assert BlockDelta(()).clear(0, 1 << 40)
