"""``dmfs pool create`` / ``dmfs pool destroy`` and their environment errors, on real dm-thin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmfs.cli import main
from dmfs.pool.status import parse_pool_status
from dmfs.pool.thinpool import PoolTable
from tests.support.loop_pool import LoopPool, destroy_pool, run

MiB = 1024**2
NOBODY = 65534


def dmfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmfs", *args], capture_output=True,
                          text=True, check=False)


def create(directory: Path, name: str, *options: str) -> dict:
    result = dmfs("pool", "create", "--loopback", str(directory), "--name", name, "--json",
                  *options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def table_params(name: str) -> str:
    _start, _length, target, params = run("dmsetup", "table", name).stdout.split(maxsplit=3)
    assert target == "thin-pool"
    return params.strip()


def status_params(name: str) -> str:
    _start, _length, target, params = run("dmsetup", "status", name).stdout.split(maxsplit=3)
    assert target == "thin-pool"
    return params


def loops_of(path: Path) -> list[str]:
    return run("losetup", "--noheadings", "--output", "NAME", "--list", "--associated",
               str(path)).stdout.split()


def tear_down(directory: Path, name: str) -> None:
    """Remove what the CLI made for pool ``name`` in ``directory``, whatever state it is in."""
    files = (directory / f"{name}.data", directory / f"{name}.metadata")
    data_loops, metadata_loops = (loops_of(path) if path.exists() else [] for path in files)
    destroy_pool(LoopPool(name, *(data_loops or [""])[:1], *(metadata_loops or [""])[:1],
                          0, 1, files))
    for loop in [*data_loops, *metadata_loops]:
        run("losetup", "--detach", loop, check=False)


@pytest.fixture
def pool_name(scratch_dir: Path) -> Iterator[str]:
    """A pool name for the CLI to use; whatever it (or NAME-tpool) leaves is torn down."""
    name = f"dmfs-admin-{os.getpid()}"
    yield name
    for leftover in (name, f"{name}-tpool"):
        tear_down(scratch_dir, leftover)


def activate_thin(pool: str, name: str, device_id: int, sectors: int = 262144) -> str:
    run("dmsetup", "message", pool, "0", f"create_thin {device_id}")
    run("dmsetup", "create", name, "--table", f"0 {sectors} thin /dev/mapper/{pool} {device_id}")
    return f"/dev/mapper/{name}"


def test_create_twice_is_harmless_and_reports_the_same_pool(scratch_dir: Path,
                                                            pool_name: str) -> None:
    first = create(scratch_dir, pool_name, "--size", "256MiB", "--block-size", "128KiB",
                   "--low-water", "25%")
    assert first["created"] and not first["reactivated"]
    blocks = 256 * MiB // (128 * 1024)
    assert (first["total_data_blocks"], first["low_water_blocks"]) == (blocks, blocks // 4)

    data_loops = loops_of(scratch_dir / f"{pool_name}.data")
    metadata_loops = loops_of(scratch_dir / f"{pool_name}.metadata")
    assert len(data_loops) == len(metadata_loops) == 1
    table = PoolTable.parse(table_params(pool_name))
    assert table.block_sectors == 256
    assert table.low_water_blocks == blocks // 4
    assert table.features == ("error_if_no_space",)
    assert os.stat(data_loops[0]).st_rdev == os.makedev(*map(int, table.data_device.split(":")))
    status = parse_pool_status(status_params(pool_name))
    assert status.error_if_no_space and status.mode == "rw" and not status.needs_check
    assert status.total_data_blocks == blocks

    second = create(scratch_dir, pool_name, "--size", "256MiB", "--block-size", "128KiB",
                    "--low-water", "25%")
    assert not second["created"]
    assert {**second, "created": True} == first
    assert loops_of(scratch_dir / f"{pool_name}.data") == data_loops, "attached a second loop"
    assert table_params(pool_name) == table.params()

    text = dmfs("pool", "create", "--loopback", str(scratch_dir), "--name", pool_name,
                "--size", "256MiB", "--block-size", "128KiB", "--low-water", "25%")
    assert text.returncode == 0
    assert text.stdout.startswith(f"pool {pool_name} already exists: /dev/mapper/{pool_name}\n")


def test_create_makes_a_missing_directory_and_says_so(scratch_dir: Path,
                                                     pool_name: str) -> None:
    directory = scratch_dir / "var" / "pools"
    # A create that fails after making the directory takes it away again.
    refused = dmfs("pool", "create", "--loopback", str(directory), "--name", pool_name,
                   "--size", "1PiB")
    assert refused.returncode == 1 and "free but the pool's files can grow" in refused.stderr
    assert list(scratch_dir.iterdir()) == []
    try:
        result = dmfs("pool", "create", "--loopback", str(directory), "--name", pool_name,
                      "--size", "64MiB")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"  made       directory {scratch_dir / 'var'}\n"
                                        f"  made       directory {directory}\n"
                                        f"pool {pool_name} created: ")
        assert oct(directory.stat().st_mode & 0o7777) == "0o700"
        assert oct(directory.parent.stat().st_mode & 0o7777) == "0o755"
        assert (directory / f"{pool_name}.data").exists()
        again = create(directory, pool_name, "--size", "64MiB")
        assert again["created_directories"] == [] and not again["created"]
    finally:
        tear_down(directory, pool_name)
    # --json names them as well.
    shutil.rmtree(scratch_dir / "var")
    try:
        report = create(directory, pool_name, "--size", "64MiB")
        assert report["created_directories"] == [str(scratch_dir / "var"), str(directory)]
    finally:
        tear_down(directory, pool_name)


def test_created_pool_works_and_signals_the_low_water_mark(scratch_dir: Path,
                                                          pool_name: str) -> None:
    report = create(scratch_dir, pool_name, "--size", "64MiB", "--low-water", "50%")
    assert report["low_water_blocks"] == 512
    events_before = int(run("dmsetup", "info", "-c", "--noheadings", "-o", "events",
                            pool_name).stdout)
    thin = activate_thin(pool_name, f"{pool_name}-thin", 0)
    # 40 of 64 MiB written leaves fewer free blocks than the mark: the kernel raises an event.
    run("dd", "if=/dev/urandom", f"of={thin}", "bs=1M", "count=40", "oflag=direct")
    status = parse_pool_status(status_params(pool_name))
    assert status.used_data_blocks == 40 * MiB // (64 * 1024)
    assert status.free_data_blocks < report["low_water_blocks"]
    events_after = int(run("dmsetup", "info", "-c", "--noheadings", "-o", "events",
                           pool_name).stdout)
    assert events_after > events_before
    # error_if_no_space: writing past the end fails at once instead of queueing.
    overflow = subprocess.run(["dd", "if=/dev/zero", f"of={thin}", "bs=1M", "count=30",
                               "seek=40", "oflag=direct"], capture_output=True, text=True,
                              timeout=60, check=False)
    assert overflow.returncode != 0
    assert parse_pool_status(status_params(pool_name)).mode == "out_of_data_space"
    run("dmsetup", "remove", f"{pool_name}-thin")


def test_destroy_refuses_while_a_thin_device_is_active_or_mounted(scratch_dir: Path,
                                                                   pool_name: str) -> None:
    create(scratch_dir, pool_name, "--size", "128MiB")
    files = [scratch_dir / f"{pool_name}.data", scratch_dir / f"{pool_name}.metadata"]
    loops = [*loops_of(files[0]), *loops_of(files[1])]
    thin = activate_thin(pool_name, f"{pool_name}-thin", 0)

    refused = dmfs("pool", "destroy", "--name", pool_name, "--loopback", str(scratch_dir))
    assert refused.returncode == 1
    assert refused.stderr == (f"dmfs: error: pool {pool_name} is in use, not removed: devices "
                              f"on it are active: {pool_name}-thin; stop dmfs, unmount them "
                              f"and remove them (dmsetup remove) first\n")

    run("mkfs.ext4", "-q", "-E", "nodiscard", thin)
    mountpoint = scratch_dir / "mnt"
    mountpoint.mkdir()
    run("mount", thin, str(mountpoint))
    try:
        refused = dmfs("pool", "destroy", "--name", pool_name, "--loopback", str(scratch_dir))
        assert refused.returncode == 1
        assert f"{pool_name}-thin (mounted on {mountpoint})" in refused.stderr
    finally:
        run("umount", str(mountpoint))
    assert all(path.exists() for path in files), "a refused destroy deleted files"
    assert pool_name in run("dmsetup", "ls").stdout

    run("dmsetup", "remove", f"{pool_name}-thin")
    result = dmfs("pool", "destroy", "--name", pool_name, "--loopback", str(scratch_dir),
                  "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed"]
    assert sorted(report["detached"]) == sorted(loops)
    assert report["deleted"] == [str(path) for path in files]
    assert report["used_data_blocks"] > 0  # mkfs wrote to the thin device
    assert pool_name not in run("dmsetup", "ls").stdout
    assert not any(path.exists() for path in files)
    attached = run("losetup", "--noheadings", "--output", "NAME", "--list").stdout.split()
    assert not set(loops) & set(attached)


def test_destroy_keeps_the_files_and_create_brings_the_pool_back(scratch_dir: Path,
                                                                 pool_name: str) -> None:
    create(scratch_dir, pool_name, "--size", "128MiB")
    run("dmsetup", "message", pool_name, "0", "create_thin 7")
    result = dmfs("pool", "destroy", "--name", pool_name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pool {pool_name} removed\n")
    data = scratch_dir / f"{pool_name}.data"
    assert data.exists() and loops_of(data) == []

    again = create(scratch_dir, pool_name, "--size", "128MiB")
    assert again["created"] and again["reactivated"]
    # Thin device 7 survived in the metadata: creating it again is refused.
    exists = run("dmsetup", "message", pool_name, "0", "create_thin 7", check=False)
    assert exists.returncode != 0 and "File exists" in exists.stderr

    assert dmfs("pool", "destroy", "--name", pool_name).returncode == 0
    resized = dmfs("pool", "create", "--loopback", str(scratch_dir), "--name", pool_name,
                   "--size", "256MiB")
    assert resized.returncode == 1
    assert resized.stderr == (
        f"dmfs: error: {scratch_dir / pool_name}.metadata holds an earlier pool whose data file "
        f"{data} has 128MiB, not 256MiB: repeat the options that pool was created with\n")
    assert pool_name not in run("dmsetup", "ls").stdout
    assert loops_of(data) == [], "a failed create left a loop device behind"

    # The files of an inactive pool are deleted on request.
    result = dmfs("pool", "destroy", "--name", pool_name, "--loopback", str(scratch_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pool {pool_name} was not active\n")
    assert list(scratch_dir.iterdir()) == []


def test_create_refuses_a_pool_of_that_name_on_other_files(scratch_dir: Path,
                                                           thin_pool: LoopPool) -> None:
    other = scratch_dir / "other"
    other.mkdir()
    result = dmfs("pool", "create", "--loopback", str(other), "--name", thin_pool.name,
                  "--size", "512MiB")
    assert result.returncode == 1
    assert result.stderr.startswith(f"dmfs: error: a pool named {thin_pool.name} exists but "
                                    f"is not backed by the files in {other}: its data device ")
    assert f"is a loop device on {thin_pool.files[0]}" in result.stderr
    assert list(other.iterdir()) == []

    result = dmfs("pool", "destroy", "--name", thin_pool.name, "--loopback", str(other))
    assert result.returncode == 1
    assert f"is backed by {thin_pool.files[0]}, not by {other}" in result.stderr
    assert thin_pool.name in run("dmsetup", "ls").stdout


def test_create_refuses_a_name_taken_by_another_kind_of_device(scratch_dir: Path,
                                                               pool_name: str) -> None:
    run("dmsetup", "create", pool_name, "--table", "0 8 error")
    try:
        result = dmfs("pool", "create", "--loopback", str(scratch_dir), "--name", pool_name,
                      "--size", "64MiB")
        assert result.returncode == 1
        assert result.stderr == (f"dmfs: error: a device named {pool_name} exists and is not "
                                 f"a thin-pool (its table has: error): choose another --name\n")
        assert list(scratch_dir.iterdir()) == []
    finally:
        run("dmsetup", "remove", pool_name)


def test_pool_not_found(scratch_dir: Path) -> None:
    result = dmfs("pool", "destroy", "--name", "dmfs-no-such-pool")
    assert result.returncode == 3
    assert result.stderr.startswith("dmfs: error: thin pool 'dmfs-no-such-pool' not found (no "
                                    "device-mapper device of that name): create it with `dmfs "
                                    "pool create`")
    assert len(result.stderr.splitlines()) == 1


def test_not_a_thin_pool_and_the_lvm_hint(scratch_dir: Path, pool_name: str) -> None:
    create(scratch_dir, pool_name + "-tpool", "--size", "64MiB")
    run("dmsetup", "create", pool_name, "--table",
        f"0 2048 linear /dev/mapper/{pool_name}-tpool 0")
    try:
        result = dmfs("pool", "destroy", "--name", pool_name)
        assert result.returncode == 3
        assert result.stderr == (
            f"dmfs: error: device '{pool_name}' is not a thin-pool (its table has: linear); "
            f"LVM calls the thin-pool device of this pool '{pool_name}-tpool': use that name\n")
    finally:
        run("dmsetup", "remove", pool_name)
    result = dmfs("pool", "destroy", "--name", pool_name + "-tpool", "--loopback",
                  str(scratch_dir))
    assert result.returncode == 0, result.stderr


def run_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run ``dmfs.cli.main(argv)`` in a child that dropped root; (exit status, output).

    The child cannot exec this Python (it lives under root's 0700 home), so it
    forks, drops its groups and ids, and runs the CLI in-process.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 125
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 125
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        output = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), output


def test_not_root(scratch_dir: Path) -> None:
    status, output = run_as_nobody(["pool", "create", "--loopback", str(scratch_dir),
                                    "--size", "64MiB", "--name", "dmfs-as-nobody"])
    assert (status, output) == (3, "dmfs: error: dmfs pool create must run as root "
                                   "(device-mapper, loop devices and mounts need CAP_SYS_ADMIN): "
                                   "run it with sudo\n")
    assert list(scratch_dir.iterdir()) == []
    status, output = run_as_nobody(["pool", "destroy", "--name", "dmfs-as-nobody"])
    assert status == 3 and "dmfs pool destroy must run as root" in output
