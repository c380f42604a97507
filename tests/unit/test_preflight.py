from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from dmfs.cli import preflight
from dmfs.cli.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_fuse,
    require_mountpoint,
    require_root,
    require_thin_pool,
    require_tool,
)
from dmfs.pool.dm import NoSuchDevice, Target


def test_require_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentProblem, match=r"^dmfs pool create must run as root.*sudo"):
        require_root("dmfs pool create")
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 0)
    require_root("dmfs pool create")


class FakeKernel:
    """/dev/mapper/control and /sys/module under a temporary directory."""

    def __init__(self, root: Path, *, control: bool, thin: bool, modprobe_works: bool) -> None:
        self.control = root / "control"
        self.sys_module = root / "module"
        self.sys_module.mkdir()
        self.modprobe_works = modprobe_works
        self.loaded: list[str] = []
        if control:
            self.control.touch()
        if thin:
            (self.sys_module / "dm_thin_pool").mkdir()

    def modprobe(self, module: str) -> bool:
        self.loaded.append(module)
        if self.modprobe_works:
            self.control.touch()
            (self.sys_module / module).mkdir(exist_ok=True)
        return self.modprobe_works

    def check(self) -> None:
        require_device_mapper(load_module=self.modprobe, control=self.control,
                              sys_module=self.sys_module)


def test_device_mapper_present_needs_no_modprobe(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, control=True, thin=True, modprobe_works=False)
    kernel.check()
    assert kernel.loaded == []


@pytest.mark.parametrize(("control", "thin", "problem"), [
    (False, False, "the kernel has no device-mapper"),
    (True, False, "the kernel has no dm-thin target"),
])
def test_missing_device_mapper_after_modprobe(tmp_path: Path, control: bool, thin: bool,
                                              problem: str) -> None:
    kernel = FakeKernel(tmp_path, control=control, thin=thin, modprobe_works=False)
    with pytest.raises(EnvironmentProblem) as error:
        kernel.check()
    assert kernel.loaded == ["dm_thin_pool"]
    assert str(error.value).startswith(problem)
    assert "`modprobe dm_thin_pool` did not load it" in str(error.value)
    assert "CONFIG_DM_THIN_PROVISIONING" in str(error.value)


def test_modprobe_fixes_a_missing_module(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, control=False, thin=False, modprobe_works=True)
    kernel.check()
    assert kernel.loaded == ["dm_thin_pool"]


def test_require_tool() -> None:
    assert require_tool("sh", "dash").endswith("/sh")
    with pytest.raises(EnvironmentProblem,
                       match=r"^no-such-tool-dmfs not found on PATH: install the pkg package$"):
        require_tool("no-such-tool-dmfs", "pkg")


def test_missing_dmsetup_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvironmentProblem, match=r"^dmsetup not found on PATH: install"):
        open_device_mapper("dmsetup")


def test_unknown_driver_is_refused() -> None:
    with pytest.raises(EnvironmentProblem, match="unknown device-mapper driver 'lvm'"):
        open_device_mapper("lvm")


def test_ioctl_driver_without_device_mapper_is_an_environment_problem() -> None:
    if Path("/dev/mapper/control").exists():
        pytest.skip("this kernel has device-mapper")
    with pytest.raises(EnvironmentProblem, match="the ioctl device-mapper driver cannot be used"):
        open_device_mapper("ioctl")


def test_require_fuse(tmp_path: Path) -> None:
    require_fuse(Path("/dev/null"))  # any character device passes
    with pytest.raises(EnvironmentProblem, match="missing: load the kernel module with "
                                                 "`modprobe fuse`"):
        require_fuse(tmp_path / "fuse")
    (tmp_path / "fuse").touch()
    with pytest.raises(EnvironmentProblem, match="not a character device"):
        require_fuse(tmp_path / "fuse")


def test_require_mountpoint(tmp_path: Path) -> None:
    assert require_mountpoint(tmp_path) == tmp_path.resolve()
    with pytest.raises(EnvironmentProblem, match=r"does not exist: create it with `mkdir -p"):
        require_mountpoint(tmp_path / "missing")
    (tmp_path / "file").touch()
    with pytest.raises(EnvironmentProblem, match="is not a directory"):
        require_mountpoint(tmp_path / "file")
    with pytest.raises(EnvironmentProblem, match=r"^mountpoint /proc is busy: proc \(proc\) is "
                                                 r"already mounted there"):
        require_mountpoint(Path("/proc"))


class FakeDeviceMapper:
    """Only what require_thin_pool reads: tables and the device list."""

    name = "fake"

    def __init__(self, tables: dict[str, Sequence[Target]]) -> None:
        self.tables = tables

    def table(self, name: str) -> list[Target]:
        if name not in self.tables:
            raise NoSuchDevice(6, "table", name)
        return list(self.tables[name])

    def list_devices(self) -> dict[str, tuple[int, int]]:
        return {name: (254, index) for index, name in enumerate(self.tables)}


POOL = Target(0, 2048, "thin-pool", "7:1 7:0 128 10 1 error_if_no_space")


def test_require_thin_pool() -> None:
    dm = FakeDeviceMapper({"pool0": [POOL]})
    assert require_thin_pool(dm, "pool0") == POOL  # type: ignore[arg-type]


def test_pool_not_found_suggests_a_close_name() -> None:
    dm = FakeDeviceMapper({"pool0": [POOL]})
    with pytest.raises(EnvironmentProblem) as error:
        require_thin_pool(dm, "pool9")  # type: ignore[arg-type]
    assert str(error.value).startswith("thin pool 'pool9' not found")
    assert "dmfs pool create" in str(error.value)
    assert str(error.value).endswith("did you mean 'pool0'?")


def test_not_a_thin_pool_names_what_it_is() -> None:
    dm = FakeDeviceMapper({"disk": [Target(0, 8, "linear", "8:0 0"),
                                    Target(8, 8, "striped", "2 8 8:1 0 8:2 0")]})
    with pytest.raises(EnvironmentProblem,
                       match=r"^device 'disk' is not a thin-pool \(its table has: linear, "
                             r"striped\)$"):
        require_thin_pool(dm, "disk")  # type: ignore[arg-type]


def test_lvm_public_pool_device_points_to_tpool() -> None:
    dm = FakeDeviceMapper({"vg-pool": [Target(0, 2048, "linear", "254:3 0")],
                           "vg-pool-tpool": [POOL]})
    with pytest.raises(EnvironmentProblem, match="LVM calls the thin-pool device of this pool "
                                                 "'vg-pool-tpool': use that name"):
        require_thin_pool(dm, "vg-pool")  # type: ignore[arg-type]
