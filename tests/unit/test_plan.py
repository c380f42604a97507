"""The start-up plan (dmfs.pool.plan): what a start does for each state a crash
or a reboot can leave, without a pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmfs.pool.fs import MountEntry
from dmfs.pool.metadata import Device, DeviceRole, DeviceState, Kind, Metadata, Snapshot
from dmfs.pool.plan import LiveDevice, Step, World, plan

BASE = 1
RUN = Path("/run/dmfs/p/snapshots")


def device(device_id: int, state: DeviceState, *, role: DeviceRole = DeviceRole.SNAPSHOT,
           read_only: bool = False) -> Device:
    name = "p-base" if role is DeviceRole.BASE else f"p-snap-{device_id}"
    return Device(device_id, name, 1 << 20, state, role=role, read_only=read_only)


def meta_with(*devices: Device, snapshots: tuple[Snapshot, ...] = ()) -> Metadata:
    meta = Metadata()
    meta.pool_name, meta.base_id = "p", BASE
    meta.apply({"type": "device", "device": device(BASE, DeviceState.DEACTIVATED,
                                                   role=DeviceRole.BASE).to_json()})
    for one in devices:
        meta.apply({"type": "device", "device": one.to_json()})
    for snapshot in snapshots:
        meta.apply({"type": "snapshot", "snapshot": snapshot.to_json()})
    return meta


def world(ids: set[int], live: dict[str, LiveDevice] | None = None,
          mounts: dict[int, MountEntry] | None = None) -> World:
    return World(ids | {BASE}, live or {}, mounts or {})


def mounted(device_id: int, devnum: tuple[int, int], read_only: bool = False) -> MountEntry:
    return MountEntry(devnum, RUN / str(device_id), "ext4", f"/dev/mapper/p-snap-{device_id}",
                      read_only)


def steps(meta: Metadata, seen: World) -> list[tuple[Step, int | None]]:
    return [(a.step, a.device_id) for a in plan(meta, seen).actions]


def test_a_clean_pool_after_a_clean_stop_only_activates_active_snapshots() -> None:
    meta = meta_with(device(2, DeviceState.DEACTIVATED), device(3, DeviceState.DEACTIVATED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2),
                                Snapshot("c", Kind.COMMITTED, None, 3)))
    the_plan = plan(meta, world({2, 3}))
    assert [(a.step, a.device_id) for a in the_plan.actions] == [(Step.ACTIVATE, 2),
                                                                  (Step.MOUNT, 2)]
    assert the_plan.problems == [] and the_plan.foreign_ids == set()


def test_an_unfinished_prepare_is_deleted_and_an_unfinished_remove_finished() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED), device(3, DeviceState.REMOVING))
    seen = world({2, 3}, live={"p-snap-2": LiveDevice((253, 2))},
                 mounts={2: mounted(2, (253, 2))})
    the_plan = plan(meta, seen)
    assert [(a.step, a.device_id, a.live) for a in the_plan.actions] == [
        (Step.DELETE, 2, True), (Step.DELETE, 3, False)]
    assert the_plan.actions[0].path == RUN / "2"
    assert all(a.problem for a in the_plan.actions)


def test_a_lost_thin_device_is_marked_faulty_once() -> None:
    snapshots = (Snapshot("a", Kind.COMMITTED, None, 2),)
    meta = meta_with(device(2, DeviceState.DEACTIVATED), snapshots=snapshots)
    assert steps(meta, world(set())) == [(Step.MARK_FAULTY, 2)]
    faulty = meta_with(device(2, DeviceState.FAULTY), snapshots=snapshots)
    assert steps(faulty, world(set())) == []


def test_a_faulty_device_back_in_the_pool_is_recovered() -> None:
    meta = meta_with(device(2, DeviceState.FAULTY),
                     snapshots=(Snapshot("c", Kind.COMMITTED, None, 2),))
    assert steps(meta, world({2})) == [(Step.RECOVER, 2)]


def test_an_unfinished_commit_rolls_back_and_the_snapshot_ends_live_and_mounted() -> None:
    meta = meta_with(device(2, DeviceState.DEACTIVATED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2, pending="commit"),))
    assert steps(meta, world({2})) == [(Step.ROLL_BACK, 2), (Step.ACTIVATE, 2),
                                       (Step.MOUNT, 2)]


def test_a_suspended_device_is_resumed_and_its_mount_adopted() -> None:
    meta = meta_with(device(2, DeviceState.SUSPENDED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2), suspended=True)},
                 mounts={2: mounted(2, (253, 2))})
    assert steps(meta, seen) == [(Step.RESUME, 2), (Step.SET_STATE, 2), (Step.ADOPT, 2)]
    resumed = plan(meta, seen).actions
    assert [a.problem for a in resumed] == [True, False, False]


def test_a_mount_of_a_device_that_is_gone_is_detached() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 9))}, mounts={2: mounted(2, (253, 2))})
    assert steps(meta, seen) == [(Step.UNMOUNT_STALE, 2), (Step.MOUNT, 2)]


def test_committed_snapshots_left_mounted_are_adopted_read_only() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED, read_only=True),
                     snapshots=(Snapshot("c", Kind.COMMITTED, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2), read_only=True)},
                 mounts={2: mounted(2, (253, 2), read_only=True)})
    actions = plan(meta, seen).actions
    assert [(a.step, a.read_only, a.problem) for a in actions] == [(Step.ADOPT, True, False)]


def test_a_live_committed_device_without_its_mount_is_deactivated() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED, read_only=True),
                     snapshots=(Snapshot("c", Kind.COMMITTED, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2), read_only=True)})
    assert steps(meta, seen) == [(Step.DEACTIVATE, 2)]


@pytest.mark.parametrize("kind", [Kind.COMMITTED, Kind.VIEW])
def test_a_device_a_client_holds_open_stays_live(kind: Kind) -> None:
    """containerd mounted it itself (Mounts): deactivating it would fail, and
    should not be tried; nothing is a problem."""
    meta = meta_with(device(2, DeviceState.ACTIVATED, read_only=True),
                     snapshots=(Snapshot("c", kind, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2), read_only=True, open_count=1)})
    assert plan(meta, seen).actions == []
    meta = meta_with(device(2, DeviceState.DEACTIVATING),  # a stop was interrupted
                     snapshots=(Snapshot("c", kind, None, 2),))
    actions = plan(meta, seen).actions
    assert [(a.step, a.state, a.read_only, a.problem) for a in actions] == [
        (Step.SET_STATE, DeviceState.ACTIVATED, True, False)]


def test_after_a_reboot_devices_the_journal_thought_live_are_recorded_inactive() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED, read_only=True),
                     snapshots=(Snapshot("c", Kind.COMMITTED, None, 2),))
    actions = plan(meta, world({2})).actions
    assert [(a.step, a.state, a.problem) for a in actions] == [
        (Step.SET_STATE, DeviceState.DEACTIVATED, False)]


def test_an_active_snapshot_live_read_only_is_made_writable() -> None:
    meta = meta_with(device(2, DeviceState.ACTIVATED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2), read_only=True)})
    assert steps(meta, seen) == [(Step.DEACTIVATE, 2), (Step.ACTIVATE, 2), (Step.MOUNT, 2)]


def test_strays_and_foreign_ids() -> None:
    meta = meta_with()
    stray_mount = MountEntry((253, 7), RUN / "7", "ext4", "/dev/mapper/x", False)
    odd_mount = MountEntry((253, 8), RUN / "odd", "ext4", "/dev/mapper/y", False)
    seen = World({BASE, 42},
                 {"p-snap-9": LiveDevice((253, 9))}, {7: stray_mount}, [odd_mount])
    the_plan = plan(meta, seen)
    assert [(a.step, a.path or a.name) for a in the_plan.actions] == [
        (Step.UNMOUNT_STRAY, RUN / "7"), (Step.UNMOUNT_STRAY, RUN / "odd"),
        (Step.DEACTIVATE_STRAY, "p-snap-9")]
    assert the_plan.foreign_ids == {42}
    assert set(the_plan.by_device()) == {None}


def test_a_live_base_device_is_resumed_and_deactivated() -> None:
    meta = meta_with()
    seen = world(set(), live={"p-base": LiveDevice((253, 1), suspended=True)})
    assert steps(meta, seen) == [(Step.RESUME, BASE), (Step.DEACTIVATE, BASE)]


def test_a_second_plan_after_carrying_out_the_first_has_no_problems() -> None:
    # What the first start leaves: the active snapshot live and mounted.
    meta = meta_with(device(2, DeviceState.ACTIVATED),
                     snapshots=(Snapshot("a", Kind.ACTIVE, None, 2),))
    seen = world({2}, live={"p-snap-2": LiveDevice((253, 2))}, mounts={2: mounted(2, (253, 2))})
    assert steps(meta, seen) == [(Step.ADOPT, 2)]
    assert plan(meta, seen).problems == []
