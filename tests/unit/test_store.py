"""The store (dmfs.pool.store) and device transitions (dmfs.pool.devices), without
a pool: records written by worker threads, applied by the trio thread, durable
before an operation answers, and checkpoints that lose nothing."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from dmfs.pool.devices import DeviceTable
from dmfs.pool.errors import PoolError
from dmfs.pool.journal import Journal
from dmfs.pool.metadata import (
    TOUCHED_KEPT,
    Device,
    DeviceState,
    Kind,
    Metadata,
    Snapshot,
    read_metadata,
)
from dmfs.pool.store import Effects, Store


def open_store(path: Path) -> Store:
    journal = Journal(path)
    store = Store(journal, read_metadata(journal.open()))
    return store


def device_record(device_id: int, state: DeviceState) -> dict:
    return {"type": "device", "device": Device(device_id, f"d{device_id}", 1 << 20,
                                               state).to_json()}


async def test_effects_reach_the_state_on_the_trio_thread_only(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    trio_thread = threading.get_ident()
    seen_in_worker: list[bool] = []

    def sequence(effects: Effects) -> str:
        effects.record(device_record(1, DeviceState.CREATING), durable=True)
        seen_in_worker.append(1 in store.meta.devices)
        effects.later(lambda: seen_in_worker.append(threading.get_ident() == trio_thread))
        return "done"

    assert await store.run(sequence) == "done"
    assert seen_in_worker == [False, True]
    assert store.meta.devices[1].state is DeviceState.CREATING
    store.journal.close()
    assert 1 in open_store(tmp_path).meta.devices


async def test_effects_of_a_failed_sequence_are_applied_too(tmp_path: Path) -> None:
    store = open_store(tmp_path)

    def sequence(effects: Effects) -> None:
        effects.record(device_record(1, DeviceState.CREATING), durable=True)
        raise OSError(5, "the dm operation failed")

    with pytest.raises(OSError):
        await store.run(sequence)
    assert 1 in store.meta.devices  # written, so applied: a replay would apply it


async def test_a_record_whose_fsync_fails_is_retracted_and_superseded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    await store.write(device_record(1, DeviceState.CREATED))
    real_fsync = Journal._sync
    calls = {"n": 0}

    def failing_once(journal: Journal) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            journal.needs_rewrite = True
            raise OSError(5, "injected")
        real_fsync(journal)

    monkeypatch.setattr(Journal, "_sync", failing_once)
    with pytest.raises(OSError, match="injected"):
        await store.write(device_record(2, DeviceState.CREATED))
    assert set(store.meta.devices) == {1}  # not applied
    assert not store.journal.needs_rewrite  # the state was written again
    await store.write(device_record(3, DeviceState.CREATED))  # the next one works
    store.journal.close()
    assert set(open_store(tmp_path).meta.devices) == {1, 3}  # replay agrees


async def test_a_checkpoint_keeps_records_written_while_it_is_made(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.write(device_record(1, DeviceState.CREATED))
    state, seq = store.meta.dump(), store.journal.seq
    store.journal.write(device_record(2, DeviceState.CREATED))  # after the state was taken
    store.journal.compact(state, seq)
    store.journal.close()
    assert set(open_store(tmp_path).meta.devices) == {1, 2}


async def test_compaction_waits_for_running_sequences(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    release = threading.Event()
    order: list[str] = []

    def slow(effects: Effects) -> None:
        effects.record(device_record(1, DeviceState.CREATED))
        release.wait()
        order.append("sequence")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run, slow)
            await trio.testing.wait_all_tasks_blocked()
            assert store.busy
            nursery.start_soon(functools.partial(store.compact, force=True))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    finally:
        release.set()
    order.append("compacted")
    assert order == ["sequence", "compacted"]
    state, _ = Journal(tmp_path).read()
    assert state is not None and [d["id"] for d in state["devices"]] == [1]


def test_transition_journals_trying_durably_then_done(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    effects = Effects(journal)
    table = DeviceTable(Store(journal), pool=None)  # type: ignore[arg-type]
    device = Device(1, "d1", 1 << 20, DeviceState.CREATED)
    done = table.transition(effects, device, DeviceState.ACTIVATED, lambda: {"baseline_sectors": 8},
                            trying=DeviceState.ACTIVATING, read_only=True)
    assert (done.state, done.read_only, done.baseline_sectors) == (DeviceState.ACTIVATED, True, 8)

    def failing() -> None:
        raise OSError(16, "busy")

    with pytest.raises(OSError):
        table.transition(effects, done, DeviceState.DEACTIVATED, failing,
                         trying=DeviceState.DEACTIVATING, on_error=DeviceState.ACTIVATED)
    meta = Metadata()
    effects.apply(meta)
    _, records = journal.read()
    assert [r["device"]["state"] for r in records] == [
        "Activating", "Activated", "Deactivating", "Activated"]
    assert meta.devices[1].state is DeviceState.ACTIVATED


async def test_a_closed_journal_is_a_pool_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.journal.close()
    with pytest.raises(PoolError, match="not open"):
        await store.write(device_record(1, DeviceState.CREATED))


# ---------------------------------------------------------------------- following the state
def snapshot_record(key: str, device_id: int, parent: str | None = None,
                    kind: Kind = Kind.ACTIVE) -> dict:
    return {"type": "snapshot", "snapshot": Snapshot(key, kind, parent, device_id).to_json()}


async def test_wait_change_wakes_for_any_change_and_says_the_new_version(tmp_path: Path
                                                                         ) -> None:
    store = open_store(tmp_path)
    before = store.meta.version
    woken: list[int] = []

    async def follower() -> None:
        woken.append(await store.wait_change(before))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        assert not woken  # nothing changed yet
        await store.write(device_record(1, DeviceState.CREATING))
    assert woken == [before + 1]
    assert await store.wait_change(before) == before + 1  # already changed: at once


def test_touched_since_names_the_devices_and_parents_that_changed() -> None:
    meta = Metadata()
    meta.apply(snapshot_record("base", 1))
    meta.apply({"type": "commit", "key": "base", "name": "b", "usage": 0, "updated": "t"})
    start = meta.version
    assert meta.touched_since(start) == (set(), set())
    meta.apply(snapshot_record("child", 2, parent="b"))
    meta.apply(device_record(3, DeviceState.CREATING))  # not a snapshot: touches none
    assert meta.touched_since(start) == ({2}, {"b"})
    after_child = meta.version
    meta.apply({"type": "rename", "key": "b", "name": "c", "updated": "t2"})
    assert meta.touched_since(after_child) == ({1, 2}, {None, "b", "c"})
    meta.apply({"type": "remove", "key": "child"})
    assert meta.touched_since(meta.version - 1) == ({2}, {"c"})
    assert meta.touched_since(start) == ({1, 2}, {None, "b", "c"})


def test_touched_since_too_long_ago_is_unknown() -> None:
    meta = Metadata()
    start = meta.version
    for n in range(TOUCHED_KEPT + 1):
        meta.apply(snapshot_record(f"s{n}", n + 1))
    assert meta.touched_since(start) is None  # the first change was forgotten
    assert meta.touched_since(start + 1) is not None
    assert meta.touched_since(meta.version - 1) == ({TOUCHED_KEPT + 1}, {None})
