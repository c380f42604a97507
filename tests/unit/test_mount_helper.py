"""The calls mount(8) and mount.fuse3 make (recorded in the test guest) as ``dmfs mount``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dmfs.pool
from dmfs.cli import build_parser, main
from dmfs.cli.main import mount_helper_argv
from dmfs.cli.mount_helper import HelperCallError, command_names, helper_argv, is_helper_call
from dmfs.pool import MountEntry

COMMANDS = command_names(build_parser())


def test_every_command_is_known() -> None:
    assert {"mount", "pool", "config", "status", "tree", "check", "demo"} <= COMMANDS


@pytest.mark.parametrize(("argv", "program", "expected"), [
    # mount -t fuse.dmfs, fstab type fuse.dmfs: mount(8) runs /sbin/mount.fuse.dmfs
    (["/etc/dmfs/p.toml", "/srv/s", "-o", "rw,nodev,nosuid,nofail"], "/sbin/mount.fuse.dmfs",
     ["mount", "/etc/dmfs/p.toml", "/srv/s", "-o", "rw,nodev,nosuid,nofail"]),
    (["/etc/dmfs/p.toml", "/srv/s", "-v", "-o", "rw"], "/sbin/mount.fuse.dmfs",
     ["mount", "/etc/dmfs/p.toml", "/srv/s", "-o", "rw"]),
    (["p.toml", "/srv/s", "-n", "-s", "-o", "rw", "-t", "fuse.dmfs"], "/usr/sbin/mount.fuse.dmfs",
     ["mount", "p.toml", "/srv/s", "-o", "rw"]),
    # mount -f: everything but the mount
    (["/etc/dmfs/p.toml", "/srv/s", "-f", "-o", "rw,nodev"], "/sbin/mount.fuse.dmfs",
     ["mount", "/etc/dmfs/p.toml", "/srv/s", "-o", "rw,nodev", "--fake"]),
    # the same without the link, and dmfs#CONFIG lines of type fuse: mount.fuse3 runs dmfs
    (["/etc/dmfs/p.toml", "/srv/s", "-o", "rw,opt=2,dev,suid"], "/usr/local/bin/dmfs",
     ["mount", "/etc/dmfs/p.toml", "/srv/s", "-o", "rw,opt=2,dev,suid"]),
    (["/etc/dmfs/p.toml", "/srv/s"], "dmfs", ["mount", "/etc/dmfs/p.toml", "/srv/s"]),
    # not helper calls
    (["mount", "/etc/dmfs/p.toml", "/srv/s", "-f"], "dmfs",
     ["mount", "/etc/dmfs/p.toml", "/srv/s", "-f"]),
    (["--log-level", "debug", "status", "/etc/dmfs/p.toml"], "dmfs",
     ["--log-level", "debug", "status", "/etc/dmfs/p.toml"]),
    (["stauts", "x"], "dmfs", ["stauts", "x"]),
    ([], "dmfs", []),
])
def test_calls(argv: list[str], program: str, expected: list[str]) -> None:
    assert mount_helper_argv(argv, build_parser(), program) == expected


def test_a_config_file_in_the_working_directory_is_a_helper_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pool0.toml").touch()
    (tmp_path / "status").touch()
    assert is_helper_call(["pool0.toml", "/srv/s"], "dmfs", COMMANDS)
    assert not is_helper_call(["status", "pool0.toml"], "dmfs", COMMANDS)
    assert not is_helper_call(["nothing.toml", "/srv/s"], "dmfs", COMMANDS)


@pytest.mark.parametrize(("argv", "message"), [
    (["/c", "/m", "-N", "/proc/1/ns/mnt", "-o", "rw"], "mount -N (mounting in another mount"),
    (["/c", "/dev/fd/3", "-o", "rw"], "the drop_privileges mount option is not supported"),
    (["/c", "/m", "-x"], "unknown mount helper option '-x'"),
    (["/c", "/m", "/x"], "a mount helper call is CONFIG MOUNTPOINT"),
])
def test_calls_dmfs_cannot_serve(argv: list[str], message: str) -> None:
    with pytest.raises(HelperCallError, match=re.escape(message)):
        helper_argv(argv)


def test_refused_helper_call_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["/etc/dmfs/p.toml", "/dev/fd/3", "-o", "rw"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_fake_mount_checks_the_config_and_mounts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text('[dmfs]\npool_name = "p"\nbase_image_size = "1GiB"\n')
    # No root, no device-mapper needed: nothing is touched.
    assert main([str(config), str(tmp_path / "m"), "-f", "-o", "rw,nodev"]) == 0
    assert not (tmp_path / "m").exists()
    assert main([str(config), str(tmp_path / "m"), "-f", "-o", "ro"]) == 2
    config.write_text('[dmfs]\npool_name = "p"\n')
    assert main([str(config), str(tmp_path / "m"), "-f"]) == 2


def test_a_tree_already_served_there_is_left_alone(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """mount -a cannot tell that a dmfs#CONFIG line is mounted and calls again."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    entries = [MountEntry((0, 40), mountpoint, "fuse.dmfs", "/etc/dmfs/p.toml", False)]
    monkeypatch.setattr(dmfs.pool, "mountinfo", lambda: entries)
    call = [str(mountpoint), "-o", "rw,nodev,suid"]
    assert helper_argv(["/etc/dmfs/p.toml", *call])[-1] == "--fake"
    assert helper_argv(["/etc/dmfs/other.toml", *call])[-1] != "--fake"
    entries.append(MountEntry((0, 41), mountpoint, "tmpfs", "tmpfs", False))  # on top of it
    assert helper_argv(["/etc/dmfs/p.toml", *call])[-1] != "--fake"
