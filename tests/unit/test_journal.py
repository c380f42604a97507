"""The journal and metadata records, without a pool."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dmfs.pool.errors import JournalCorrupt, PoolError
from dmfs.pool.journal import Journal, encode
from dmfs.pool.metadata import Device, DeviceState, Kind, Metadata, MetadataError, Snapshot


def reopen(path: Path) -> tuple[dict | None, list[dict]]:
    """Open a journal, read it, close it (releasing its lock)."""
    journal = Journal(path)
    try:
        return journal.open()
    finally:
        journal.close()


def snapshot_record(key: str, parent: str | None, device_id: int,
                    kind: Kind = Kind.ACTIVE) -> dict:
    return {"type": "snapshot", "snapshot": Snapshot(key, kind, parent, device_id).to_json()}


def device_record(device_id: int, state: DeviceState = DeviceState.ACTIVATED) -> dict:
    return {"type": "device", "device": Device(device_id, f"d{device_id}", 1 << 20,
                                               state).to_json()}


def test_records_survive_reopen_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.open() == (None, [])
    journal.append({"type": "header", "format": 1, "pool": "p"}, durable=True)
    journal.append(device_record(1), durable=False)
    journal.close()
    reopened = Journal(tmp_path)
    checkpoint, records = reopened.open()
    assert checkpoint is None
    assert [r["seq"] for r in records] == [1, 2]
    assert records[1]["device"]["id"] == 1
    assert reopened.append({"type": "base", "id": 1}, durable=True) == 3


def test_second_process_is_locked_out(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    first.open()
    with pytest.raises(PoolError, match="in use by another dmfs process"):
        Journal(tmp_path).open()
    first.close()
    reopen(tmp_path)


def test_torn_last_record_is_dropped_with_a_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append({"type": "header", "format": 1, "pool": "p"}, durable=True)
    journal.close()
    good_size = journal.path.stat().st_size
    with open(journal.path, "ab") as f:
        f.write(encode({"type": "base", "id": 7, "seq": 2})[:-9])  # cut mid-record
    with caplog.at_level(logging.WARNING):
        _, records = reopen(tmp_path)
    assert [r["seq"] for r in records] == [1]
    assert "torn last record at byte offset" in caplog.text
    assert journal.path.stat().st_size == good_size  # cut off, appends stay clean


def test_bad_checksum_on_last_line_is_torn_too(tmp_path: Path) -> None:
    line = encode({"type": "base", "id": 7, "seq": 1})
    (tmp_path / "journal.jsonl").write_bytes(line.replace(b'"id":7', b'"id":8'))
    assert reopen(tmp_path)[1] == []


def test_corrupt_record_in_the_middle_stops_the_start(tmp_path: Path) -> None:
    records = [encode({"type": "base", "id": i, "seq": i}) for i in (1, 2, 3)]
    damaged = records[1].replace(b'"id":2', b'"id":9')
    (tmp_path / "journal.jsonl").write_bytes(records[0] + damaged + records[2])
    with pytest.raises(JournalCorrupt) as error:
        reopen(tmp_path)
    assert str(tmp_path / "journal.jsonl") in str(error.value)
    assert f"byte offset {len(records[0])}" in str(error.value)


def test_compaction_checkpoint_and_skipped_old_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    for i in range(1, 4):
        journal.append({"type": "base", "id": i}, durable=False)
    old_journal = journal.path.read_bytes()
    journal.compact({"state": "at three"})
    journal.append({"type": "base", "id": 4}, durable=True)
    journal.close()
    checkpoint, records = reopen(tmp_path)
    assert checkpoint == {"state": "at three"}
    assert [r["seq"] for r in records] == [4]
    # A crash between the checkpoint's rename and the journal's reset leaves the
    # old records behind: they are skipped, not applied twice.
    (tmp_path / "journal.jsonl").write_bytes(old_journal)
    assert reopen(tmp_path)[1] == []


def test_damaged_checkpoint_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.json").write_bytes(b"00000000 {}\n")
    with pytest.raises(JournalCorrupt, match="checkpoint is damaged"):
        reopen(tmp_path)


def test_metadata_commit_rename_remove_and_indexes() -> None:
    meta = Metadata()
    for record in (device_record(1), snapshot_record("a", None, 1),
                   {"type": "commit", "key": "a", "name": "base", "usage": 10, "updated": "t"},
                   device_record(2), snapshot_record("b", "base", 2),
                   device_record(3), snapshot_record("c", "base", 3, Kind.VIEW),
                   {"type": "rename", "key": "base", "name": "root", "updated": "t2"}):
        meta.apply(record)
    assert meta.snapshots["root"].kind is Kind.COMMITTED and meta.snapshots["root"].usage == 10
    assert sorted(s.key for s in meta.children("root")) == ["b", "c"]
    assert meta.children("base") == [] and meta.child_count("root") == 2
    assert [s.key for s in meta.children(None)] == ["root"]
    assert meta.snapshot_of_device(2).key == "b"  # type: ignore[union-attr]
    meta.apply({"type": "remove", "key": "b"})
    assert meta.devices[2].state is DeviceState.REMOVING
    assert meta.snapshot_of_device(2) is None and meta.child_count("root") == 1
    # Directory mtimes in the tree: when each node's children last changed.
    changed = meta.children_changed_ns("root")
    assert changed > 0 and meta.keys_changed_ns >= changed
    meta.apply(snapshot_record("c", "root", 3, Kind.VIEW))  # a label change, say
    assert meta.children_changed_ns("root") == changed  # labels: same entries
    meta.apply({"type": "remove", "key": "c"})
    assert meta.children_changed_ns("root") > changed
    assert meta.children_changed_ns("nothing") == 0
    assert Metadata.load(meta.dump()).dump() == meta.dump()
    with pytest.raises(MetadataError):
        meta.apply({"type": "remove", "key": "b"})
    with pytest.raises(MetadataError):
        meta.apply({"type": "nonsense"})


def test_allocate_id_reuses_freed_and_skips_unavailable() -> None:
    meta = Metadata()
    for device_id in (1, 2, 3):
        meta.apply(device_record(device_id))
    meta.apply({"type": "device-deleted", "id": 2})
    assert meta.allocate_id() == 2
    assert meta.allocate_id({2, 4}) == 5
    meta.apply(device_record(2, DeviceState.FAULTY))
    assert meta.allocate_id() == 4  # a Faulty id is never reused


def test_a_snapshot_made_in_the_tree_says_so_and_others_are_written_as_before() -> None:
    made = Snapshot(key="t", kind=Kind.ACTIVE, parent=None, device_id=3, made_by="tree")
    assert Snapshot.from_json(made.to_json()).made_by == "tree"
    plain = Snapshot(key="p", kind=Kind.ACTIVE, parent=None, device_id=4)
    assert "made_by" not in plain.to_json()  # journals from before the field read alike
    assert Snapshot.from_json(plain.to_json()).made_by is None
