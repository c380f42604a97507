"""The files under contrib/ that an administrator installs: they must parse."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

CONTRIB = Path(__file__).parents[2] / "contrib"
UNIT = CONTRIB / "systemd" / "dmfs@.service"
FSTAB = CONTRIB / "fstab.example"
INSTALLED_DMFS = "/usr/local/bin/dmfs"


def dmfs_script() -> Path:
    script = Path(sys.executable).with_name("dmfs")
    if not script.exists():
        pytest.skip(f"no dmfs console script next to {sys.executable} (pip install -e .)")
    return script


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at this checkout's dmfs.
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_DMFS} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_DMFS, str(dmfs_script())))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, check=False)
    # systemd-analyze reports unknown keys and bad values on stderr with status 0.
    assert (result.returncode, result.stderr) == (0, "")


def test_systemd_unit_serves_one_config_per_instance() -> None:
    service = UNIT.read_text().split("\n[Service]\n")[-1]
    assert "dmfs mount /etc/dmfs/%i.toml --foreground" in service
    assert "Type=notify" in service and "RestartPreventExitStatus=2" in service


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="findmnt is not installed")
def test_fstab_example_verifies(tmp_path: Path) -> None:
    lines = [line for line in FSTAB.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1
    source, target, fstype, options, dump, passno = lines[0].split()
    assert (fstype, dump, passno) == ("fuse.dmfs", "0", "0")
    assert (source, target) == ("/etc/dmfs/pool0.toml", "/srv/snapshots")
    # findmnt wants the source and the target to exist: use stand-ins for both.
    config, mountpoint = tmp_path / "pool0.toml", tmp_path / "snapshots"
    config.touch()
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{config} {mountpoint} {fstype} {options} {dump} {passno}\n")
    result = subprocess.run(["findmnt", "--verify", "--verbose", "--tab-file", str(fstab)],
                            capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 parse errors, 0 errors" in output
    assert "VFS options: nodev,nosuid" in output
    assert "userspace options: nofail,x-systemd.requires-mounts-for=/var/lib/dmfs" in output


def test_containerd_fragment_names_the_example_configs_socket() -> None:
    """contrib/containerd-config.toml is containerd's side of the example pool:
    a proxy snapshotter at the grpc_address that dmfs.toml.example suggests."""
    fragment = tomllib.loads((CONTRIB / "containerd-config.toml").read_text())
    plugin = fragment["proxy_plugins"]["dmfs"]
    assert plugin["type"] == "snapshot"
    suggested = re.search(r'^# grpc_address = "(.*)"$',
                          (CONTRIB / "dmfs.toml.example").read_text(), re.MULTILINE)
    assert suggested is not None and plugin["address"] == suggested.group(1)
