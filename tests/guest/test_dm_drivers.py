"""Both DeviceMapper drivers against a real thin pool, with and without udevd.

Each interface test runs once with the dmsetup driver and once with the ioctl
driver, so the two are held to the same behaviour: device state, tables and
status, typed errors by errno, and /dev/mapper/<name> nodes (made by the tool
itself without udevd, by udev's rules with it).
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pyudev

from dmfs.pool.dm import (
    DeviceBusy,
    DeviceExists,
    DeviceMapper,
    DmError,
    NoData,
    NoSuchDevice,
    Target,
)
from dmfs.pool.dmioctl import IoctlDriver
from dmfs.pool.dmnodes import OwnNodes, UdevNodes
from dmfs.pool.dmsetup import DmsetupDriver
from dmfs.pool.status import parse_thin_status
from dmfs.pool.udev import udevd_running
from tests.support.loop_pool import LoopPool, loop_pool, run

THIN_SECTORS = 64 * 2**20 // 512
UDEV_TIER = os.environ.get("DMFS_GUEST_UDEV") == "1"
MISSING = "drv-missing"


def make_driver(kind: str) -> DeviceMapper:
    return DmsetupDriver() if kind == "dmsetup" else IoctlDriver()


@pytest.fixture(params=["dmsetup", "ioctl"])
def driver(request: pytest.FixtureRequest) -> Iterator[DeviceMapper]:
    made = make_driver(request.param)
    yield made
    if isinstance(made, IoctlDriver):
        made.close()


@pytest.fixture
def made() -> Iterator[list[str]]:
    """Names of devices a test creates; whatever is left is removed afterwards."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        # --retry: udev's blkid may still hold a device that was just written.
        run("dmsetup", "remove", "--retry", name, check=False)


def thin_table(pool: LoopPool, device_id: int, sectors: int = THIN_SECTORS) -> list[Target]:
    return [Target(0, sectors, "thin", f"{pool.device} {device_id}")]


def node_devnum(path: str) -> tuple[int, int]:
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode), f"{path} is not a block device"
    return (os.major(st.st_rdev), os.minor(st.st_rdev))


@contextmanager
def kernel_uevents() -> Iterator[pyudev.Monitor]:
    """The kernel's own block uevents (udevd or not), opened before what sends them."""
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.filter_by("block")
    monitor.start()
    yield monitor


def wait_for_uevent(monitor: pyudev.Monitor, devnum: tuple[int, int], action: str,
                    timeout: float = 30.0) -> None:
    poller = select.poll()
    poller.register(monitor.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if poller.poll(remaining * 1000):
            device = monitor.poll(timeout=0)
            if (device is not None and device.action == action
                    and (os.major(device.device_number),
                         os.minor(device.device_number)) == devnum):
                return
    pytest.fail(f"no {action!r} uevent for {devnum} within {timeout} s")


def test_guest_tier_matches_udevd() -> None:
    assert udevd_running() == UDEV_TIER


def test_driver_reports_the_interface_version(driver: DeviceMapper) -> None:
    assert isinstance(driver, DeviceMapper)
    major, minor, _patch = (int(part) for part in driver.version().split("."))
    assert major == 4 and minor >= 27  # deferred remove and cookies are older than 4.27


def test_thin_device_lifecycle(driver: DeviceMapper, thin_pool: LoopPool,
                               made: list[str]) -> None:
    assert driver.message(thin_pool.name, "create_thin 1") == ""
    name = "drv-life"
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 1))
    assert (info.name, info.target_count, info.open_count) == (name, 1, 0)
    assert info.live_table and not info.inactive_table
    assert not info.suspended and not info.read_only

    path = driver.device_path(name)
    assert path == f"/dev/mapper/{name}"
    assert node_devnum(path) == info.devnum
    # udev's rules make a symlink to ../dm-N; without udevd the tool mknods the node.
    assert os.path.islink(path) == UDEV_TIER
    assert driver.info(name) == info

    assert driver.table(name) == [Target(0, THIN_SECTORS, "thin",
                                         f"{thin_pool.devnum} 1")]
    [status] = driver.status(name)
    assert (status.start, status.length, status.target_type) == (0, THIN_SECTORS, "thin")
    assert parse_thin_status(status.params).mapped_sectors == 0

    listed = driver.list_devices()
    assert listed[name] == info.devnum
    assert listed[thin_pool.name] == node_devnum(thin_pool.device)

    driver.suspend(name)
    assert driver.info(name).suspended
    driver.resume(name)
    assert not driver.info(name).suspended
    driver.suspend(name, flush=False)
    assert driver.info(name).suspended
    driver.resume(name)
    assert not driver.info(name).suspended

    driver.remove(name)
    assert not os.path.lexists(path)
    assert name not in driver.list_devices()
    with pytest.raises(NoSuchDevice, match=name):
        driver.info(name)


def test_read_only_device(driver: DeviceMapper, thin_pool: LoopPool, made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 2")
    name = "drv-ro"
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 2), read_only=True)
    assert info.read_only and driver.info(name).read_only
    # The block layer's view; opening it for writing would do, but closing a
    # written-to device makes udev's watch rule probe it, and a remove right
    # after would race that probe (EBUSY).
    major, minor = info.devnum
    assert Path(f"/sys/dev/block/{major}:{minor}/ro").read_text().strip() == "1"
    driver.remove(name)


def test_longest_name_and_uuid(driver: DeviceMapper, thin_pool: LoopPool,
                               made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 3")
    name, uuid = "drv-" + "n" * 123, "DMFS-" + "u" * 123
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 3), uuid=uuid)
    assert (info.name, info.uuid) == (name, uuid)
    assert driver.info(name).uuid == uuid
    assert node_devnum(driver.device_path(name)) == info.devnum
    with pytest.raises(DmError):
        driver.create(name + "x", thin_table(thin_pool, 3))
    assert name + "x" not in driver.list_devices()
    driver.remove(name)


def test_create_thin_of_a_taken_id_is_device_exists(driver: DeviceMapper,
                                                    thin_pool: LoopPool) -> None:
    driver.message(thin_pool.name, "create_thin 4")
    with pytest.raises(DeviceExists) as raised:
        driver.message(thin_pool.name, "create_thin 4")
    assert raised.value.errno == errno.EEXIST
    assert thin_pool.name in str(raised.value) and "message" in str(raised.value)


def test_delete_of_a_missing_id_is_no_data(driver: DeviceMapper, thin_pool: LoopPool) -> None:
    with pytest.raises(NoData) as raised:
        driver.message(thin_pool.name, "delete 77")
    assert raised.value.errno == errno.ENODATA
    assert thin_pool.name in str(raised.value)


def test_thin_on_a_missing_id_is_no_data_and_leaves_nothing(driver: DeviceMapper,
                                                            thin_pool: LoopPool,
                                                            made: list[str]) -> None:
    name = "drv-ghost"
    made.append(name)
    with pytest.raises(NoData) as raised:
        driver.create(name, thin_table(thin_pool, 42))
    assert name in str(raised.value) and "create" in str(raised.value)
    assert name not in driver.list_devices()
    assert not os.path.lexists(driver.device_path(name))
    with pytest.raises(NoSuchDevice):
        driver.info(name)


def test_create_of_a_taken_name_is_busy_and_keeps_that_device(driver: DeviceMapper,
                                                              thin_pool: LoopPool,
                                                              made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 5")
    driver.message(thin_pool.name, "create_thin 6")
    name = "drv-taken"
    made.append(name)
    first = driver.create(name, thin_table(thin_pool, 5))
    # The kernel answers EBUSY, not EEXIST, when the name is in use.
    with pytest.raises(DeviceBusy, match=name):
        driver.create(name, thin_table(thin_pool, 6))
    assert driver.info(name) == first
    assert driver.table(name) == [Target(0, THIN_SECTORS, "thin", f"{thin_pool.devnum} 5")]
    assert node_devnum(driver.device_path(name)) == first.devnum
    driver.remove(name)


def test_remove_of_an_open_device_is_busy(driver: DeviceMapper, thin_pool: LoopPool,
                                          made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 7")
    name = "drv-open"
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 7))
    fd = os.open(driver.device_path(name), os.O_RDONLY)
    try:
        assert driver.info(name).open_count == 1
        with pytest.raises(DeviceBusy) as raised:
            driver.remove(name)
        assert raised.value.errno == errno.EBUSY
        assert name in str(raised.value) and "remove" in str(raised.value)
        assert driver.list_devices()[name] == info.devnum
        assert node_devnum(driver.device_path(name)) == info.devnum
    finally:
        os.close(fd)
    driver.remove(name)
    assert name not in driver.list_devices()


def test_deferred_remove_happens_on_last_close(driver: DeviceMapper, thin_pool: LoopPool,
                                               made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 8")
    name = "drv-deferred"
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 8))
    path = driver.device_path(name)
    with kernel_uevents() as uevents:
        fd = os.open(path, os.O_RDONLY)
        try:
            driver.remove(name, deferred=True)
            assert driver.list_devices()[name] == info.devnum
        finally:
            os.close(fd)
        wait_for_uevent(uevents, info.devnum, "remove")
    assert name not in driver.list_devices()
    if not UDEV_TIER:
        # Nobody is told when the kernel finally removes it: like libdm, the
        # driver cannot remove the node it made, so it stays behind.
        Path(path).unlink(missing_ok=True)


@pytest.mark.parametrize("operation", ["info", "status", "table", "suspend", "resume",
                                       "remove", "message"])
def test_operations_on_a_missing_device_are_no_such_device(driver: DeviceMapper,
                                                           operation: str) -> None:
    arguments = (MISSING, "create_thin 1") if operation == "message" else (MISSING,)
    with pytest.raises(NoSuchDevice) as raised:
        getattr(driver, operation)(*arguments)
    assert MISSING in str(raised.value)


def test_wait_event_returns_when_the_pool_crosses_its_low_water_mark(
        driver: DeviceMapper, scratch_dir: Path, made: list[str]) -> None:
    # 64 MiB of 64 KiB blocks: 1024 blocks; the event fires at 16 used blocks.
    with loop_pool(scratch_dir, data_mib=64, low_water_blocks=1024 - 16) as pool:
        driver.message(pool.name, "create_thin 1")
        name = "drv-fill"
        made.append(name)
        driver.create(name, thin_table(pool, 1))
        before = driver.info(pool.name).event_nr
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(
            driver.wait_event(pool.name, before)), daemon=True)
        waiter.start()
        assert driver.info(pool.name).event_nr == before  # nothing has happened yet
        run("dd", "if=/dev/zero", f"of={driver.device_path(name)}", "bs=1M", "count=2",
            "oflag=direct")
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "wait_event did not return after the low-water event"
        assert result[0] > before
        assert driver.info(pool.name).event_nr == result[0]
        # A counter that already moved on answers at once.
        assert driver.wait_event(pool.name, before) == result[0]
        run("dmsetup", "remove", "--retry", name)


def test_message_reply_text_of_any_length(driver: DeviceMapper, thin_pool: LoopPool,
                                          made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 9")
    name = "drv-stats"
    made.append(name)
    driver.create(name, thin_table(thin_pool, 9))
    # dm statistics answer messages with text; 1024 areas print ~36 KiB.
    region = driver.message(name, "@stats_create - /1024")
    assert region == "0"
    lines = driver.message(name, f"@stats_print {region}").splitlines()
    assert len(lines) == 1024
    assert lines[1].startswith(f"{THIN_SECTORS // 1024}+{THIN_SECTORS // 1024} ")
    assert driver.message(name, f"@stats_delete {region}") == ""
    driver.remove(name)


def test_table_and_status_of_1000_targets(driver: DeviceMapper, made: list[str]) -> None:
    name = "drv-zeros"
    made.append(name)
    table = [Target(i * 8, 8, "zero", "") for i in range(1000)]
    info = driver.create(name, table)
    assert info.target_count == 1000
    assert driver.table(name) == table
    assert driver.status(name) == table  # zero has no status text either
    driver.remove(name)


def test_ioctl_driver_makes_its_own_nodes_replacing_stale_ones(thin_pool: LoopPool,
                                                               scratch_dir: Path,
                                                               made: list[str]) -> None:
    directory = scratch_dir / "mapper"  # does not exist yet
    with IoctlDriver(nodes=OwnNodes(directory)) as driver:
        driver.message(thin_pool.name, "create_thin 1")
        driver.message(thin_pool.name, "create_thin 2")
        made.extend(["drv-own-1", "drv-own-2"])
        first = driver.create("drv-own-1", thin_table(thin_pool, 1))
        assert driver.device_path("drv-own-1") == str(directory / "drv-own-1")
        assert node_devnum(str(directory / "drv-own-1")) == first.devnum
        (directory / "drv-own-2").write_text("stale\n")
        second = driver.create("drv-own-2", thin_table(thin_pool, 2))
        assert node_devnum(str(directory / "drv-own-2")) == second.devnum
        # A node that points at another device is replaced as well.
        driver.suspend("drv-own-1")
        (directory / "drv-own-1").unlink()
        os.mknod(directory / "drv-own-1", stat.S_IFBLK | 0o600, os.makedev(*second.devnum))
        driver.resume("drv-own-1")
        assert node_devnum(str(directory / "drv-own-1")) == first.devnum
        if UDEV_TIER:
            # The cookie's flags kept udev's dm rules from making symlinks.
            run("udevadm", "settle")
            assert not os.path.lexists("/dev/mapper/drv-own-1")
        for name in ("drv-own-1", "drv-own-2"):
            driver.remove(name)
            assert not os.path.lexists(directory / name)


@pytest.mark.skipif(not UDEV_TIER, reason="needs udevd (the guest-udev tier)")
def test_udev_rules_see_a_primary_source_activation(driver: DeviceMapper,
                                                    thin_pool: LoopPool,
                                                    made: list[str]) -> None:
    driver.message(thin_pool.name, "create_thin 1")
    name = "drv-udev"
    made.append(name)
    info = driver.create(name, thin_table(thin_pool, 1))
    device = pyudev.Devices.from_device_number(pyudev.Context(), "block",
                                               os.makedev(*info.devnum))
    properties = dict(device.properties)
    assert properties["DM_NAME"] == name
    assert properties["DM_UDEV_PRIMARY_SOURCE_FLAG"] == "1"
    assert properties.get("DM_UDEV_DISABLE_DM_RULES_FLAG") != "1"
    assert os.readlink(driver.device_path(name)) == f"../{device.sys_name}"
    driver.remove(name)
    assert not os.path.lexists(driver.device_path(name))


@pytest.mark.skipif(UDEV_TIER, reason="needs a guest without udevd")
def test_waiting_for_a_udev_that_does_not_run_times_out_clearly(thin_pool: LoopPool,
                                                                made: list[str]) -> None:
    name = "drv-no-udevd"
    made.append(name)
    with IoctlDriver(nodes=UdevNodes(timeout=0.5)) as driver:
        driver.message(thin_pool.name, "create_thin 1")
        with pytest.raises(DmError) as raised:
            driver.create(name, thin_table(thin_pool, 1))
        assert raised.value.errno == errno.ETIMEDOUT
        assert name in str(raised.value) and "udevd" in str(raised.value)
        # The live device was removed again (that remove's udev wait timed out too).
        assert name not in driver.list_devices()


def test_a_pool_with_1000_thin_devices_is_listed(thin_pool: LoopPool,
                                                 scratch_dir: Path) -> None:
    """1000 active thin devices, made by the ioctl driver, listed by both drivers.

    dmsetup would take ~2 min here (two processes per device, ≈55 ms each).
    With udevd, udev-synchronised creates cost ≈130 ms each in the guest (its
    rules run `dmsetup udevflags` and `dmsetup udevcomplete` per event), so in
    that tier the driver makes its own nodes in a scratch directory and sends
    no cookie: udev then runs no program per event.
    """
    nodes = OwnNodes(scratch_dir / "mapper", cookie=0) if UDEV_TIER else None
    names = [f"drv-many-{i:04d}" for i in range(1000)]
    with IoctlDriver(nodes=nodes) as driver:
        devnums: dict[str, tuple[int, int]] = {}
        try:
            for device_id, name in enumerate(names):
                driver.message(thin_pool.name, f"create_thin {device_id}")
                info = driver.create(name, thin_table(thin_pool, device_id, 2048))
                devnums[name] = info.devnum
            listed = driver.list_devices()
            assert {name: listed[name] for name in names} == devnums
            assert set(listed) == {*names, thin_pool.name}
            assert DmsetupDriver().list_devices() == listed
            assert all(node_devnum(driver.device_path(name)) == devnums[name]
                       for name in names)
        finally:
            for name in devnums:
                driver.remove(name)
        assert set(driver.list_devices()) == {thin_pool.name}
        assert not any(os.path.lexists(driver.device_path(name)) for name in names)
    if UDEV_TIER:
        run("udevadm", "settle")  # leave no backlog of events to later tests



def test_a_blocking_ioctl_with_a_large_buffer_leaves_other_threads_running(
        thin_pool: LoopPool) -> None:
    """fcntl.ioctl holds the GIL for buffers over 1024 bytes; the driver's
    ioctl must not, or one blocked call (DM_DEV_WAIT here, a pool status
    during a stalled commit in real life) freezes the whole daemon."""
    import signal

    from dmfs.pool.dmioctl import ioctl_without_gil
    from dmfs.pool.dmioctl_abi import (
        DM_DEV_WAIT_CMD,
        dm_request,
        encode_device_name,
        encode_request,
        native_ioc_encoding,
    )

    with IoctlDriver() as driver:
        event_nr = driver.info(thin_pool.name).event_nr
        buffer = encode_request(name=encode_device_name(thin_pool.name), event_nr=event_nr,
                                buffer_size=16384)
        request = dm_request(DM_DEV_WAIT_CMD, native_ioc_encoding())
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                ioctl_without_gil(driver.fileno(), request, buffer)
            except OSError as error:
                outcome.append(error)

        previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        try:
            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            progress, deadline = 0, time.monotonic() + 0.5
            while time.monotonic() < deadline:
                progress += 1  # cannot run while the waiter holds the GIL
            assert waiter.is_alive() and progress > 1000
            assert waiter.ident is not None
            signal.pthread_kill(waiter.ident, signal.SIGUSR1)  # EINTR ends the wait
            waiter.join(timeout=30)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], InterruptedError)
