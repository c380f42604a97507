"""Node strategies of the ioctl driver: the choice between them and their failures.

Making real block nodes needs root and a device, so that is proven in the guest
(tests/guest/test_dm_drivers.py); here the decisions and error paths are.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dmfs.pool import dmnodes
from dmfs.pool.dm import DmError
from dmfs.pool.dmioctl_abi import (
    DM_UDEV_DISABLE_DM_RULES_FLAG,
    DM_UDEV_FLAGS_SHIFT,
    DM_UDEV_PRIMARY_SOURCE_FLAG,
)
from dmfs.pool.dmnodes import OwnNodes, UdevNodes, device_nodes


@pytest.mark.parametrize(("udevd", "disable", "expected"), [
    (True, None, True), (True, "1", False), (True, "0", False), (False, None, False)])
def test_udev_makes_nodes_only_when_running_and_not_disabled(
        monkeypatch: pytest.MonkeyPatch, udevd: bool, disable: str | None,
        expected: bool) -> None:
    monkeypatch.setattr(dmnodes, "udevd_running", lambda: udevd)
    if disable is None:
        monkeypatch.delenv("DM_DISABLE_UDEV", raising=False)
    else:
        monkeypatch.setenv("DM_DISABLE_UDEV", disable)  # any value disables, as in libdm
    assert dmnodes.udev_makes_nodes() is expected
    assert isinstance(device_nodes(), UdevNodes if expected else OwnNodes)


def test_cookies_tell_the_rules_who_makes_the_node() -> None:
    own = OwnNodes().cookie >> DM_UDEV_FLAGS_SHIFT
    udev = UdevNodes().cookie >> DM_UDEV_FLAGS_SHIFT
    assert own & DM_UDEV_DISABLE_DM_RULES_FLAG and own & DM_UDEV_PRIMARY_SOURCE_FLAG
    assert udev == DM_UDEV_PRIMARY_SOURCE_FLAG
    assert OwnNodes(cookie=0).cookie == 0


def test_own_node_failure_is_a_dm_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "mapper"
    not_a_directory.write_text("")
    with pytest.raises(DmError) as raised:
        OwnNodes(not_a_directory).make_node("thin-1", (254, 1))
    assert "create node on thin-1" in str(raised.value)


def test_own_node_removal(tmp_path: Path) -> None:
    nodes = OwnNodes(tmp_path)
    nodes.after_remove("never-made")  # nothing to remove is fine
    (tmp_path / "stale").write_text("")
    nodes.after_remove("stale")
    assert not (tmp_path / "stale").exists()
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(DmError, match="remove node on a-directory"):
        nodes.after_remove("a-directory")


def test_udev_node_that_never_appeared_is_explained(tmp_path: Path) -> None:
    with pytest.raises(DmError) as raised:
        UdevNodes(tmp_path).after_create("thin-1", (254, 1))
    assert raised.value.errno == errno.ENOENT
    assert "55-dm.rules" in str(raised.value)


def test_udev_node_of_another_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thin-1").write_text("")  # st_rdev 0:0
    with pytest.raises(DmError, match="not 254:1"):
        UdevNodes(tmp_path).after_create("thin-1", (254, 1))
