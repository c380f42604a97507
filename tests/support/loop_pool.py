"""Loop-backed thin pools for guest tests, torn down whatever happens.

Data and metadata live in sparse files on a tmpfs; the pool is made with
``error_if_no_space`` so a full pool fails writes at once.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
_counter = itertools.count()


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its stderr in the message."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class LoopPool:
    """A thin pool on two loop devices."""

    name: str
    data_loop: str
    metadata_loop: str
    data_sectors: int
    block_sectors: int
    files: tuple[Path, Path]
    #: a linear dm device between the data loop and the pool, when asked for:
    #: suspending it makes every data I/O wait (a stalled disk)
    data_linear: str | None = None

    @property
    def device(self) -> str:
        return f"/dev/mapper/{self.name}"

    @property
    def devnum(self) -> str:
        st = os.stat(self.device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    @property
    def total_data_blocks(self) -> int:
        return self.data_sectors // self.block_sectors

    def message(self, text: str) -> None:
        run("dmsetup", "message", self.name, "0", text)

    def status_params(self) -> str:
        """The pool's status line after ``start length thin-pool``."""
        line = run("dmsetup", "status", self.name).stdout.strip()
        _start, _length, target, params = line.split(maxsplit=3)
        assert target == "thin-pool", line
        return params


def _mounts_of(devnums: set[str]) -> list[str]:
    """Mountpoints of the given major:minor devices, innermost first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[2] in devnums:
            points.append(fields[4].replace("\\040", " "))
    return sorted(points, key=len, reverse=True)


def _thin_devices_of(pool: LoopPool) -> list[tuple[str, str]]:
    """(name, major:minor) of every dm device whose table maps onto the pool.

    Device numbers come from dmsetup, not from /dev/mapper nodes, which a test
    may not have made.  Usually the code under test removed its devices, so
    the one ``dmsetup table`` call is all this costs."""
    pool_devnum = pool.devnum
    names = []
    for line in run("dmsetup", "table", check=False).stdout.splitlines():
        name, _, table = line.partition(": ")
        fields = table.split()
        if len(fields) >= 4 and fields[2] == "thin" and fields[3] in (pool_devnum, pool.device):
            names.append(name)
    if not names:
        return []
    numbers = {}
    for line in run("dmsetup", "info", "-c", "--noheadings", "--separator", " ",
                    "-o", "name,major,minor", check=False).stdout.splitlines():
        fields = line.split()
        if len(fields) == 3:
            numbers[fields[0]] = f"{fields[1]}:{fields[2]}"
    return [(name, numbers[name]) for name in names if name in numbers]


def destroy_pool(pool: LoopPool) -> None:
    """Unmount, deactivate and remove everything on the pool, then the pool."""
    with suppress(FileNotFoundError):
        thins = _thin_devices_of(pool)
        for point in _mounts_of({devnum for _, devnum in thins}):
            run("umount", "-l", point, check=False)
        for name, _ in thins:
            run("dmsetup", "remove", "--retry", name, check=False)
        run("dmsetup", "remove", "--retry", pool.name, check=False)
        if pool.data_linear:
            run("dmsetup", "resume", pool.data_linear, check=False)
            run("dmsetup", "remove", "--retry", pool.data_linear, check=False)
    run("losetup", "-d", pool.data_loop, pool.metadata_loop, check=False)
    for path in pool.files:
        with suppress(FileNotFoundError):
            path.unlink()


@contextmanager
def loop_pool(workdir: Path, data_mib: int = 512, metadata_mib: int = 16,
              block_kib: int = 64, low_water_blocks: int = 0,
              name: str | None = None, linear_data: bool = False) -> Iterator[LoopPool]:
    """Create a loop-backed thin pool; remove it and its devices on exit.

    With ``linear_data`` the data loop sits under a linear dm device
    (``<name>-data``) that a test can suspend to stall data I/O."""
    name = name or f"dmfs-test-{os.getpid()}-{next(_counter)}"
    data_file, metadata_file = workdir / f"{name}.data", workdir / f"{name}.meta"
    for path, mib in ((data_file, data_mib), (metadata_file, metadata_mib)):
        with open(path, "wb") as f:
            f.truncate(mib * 2**20)
    loops: list[str] = []
    try:
        for path in (data_file, metadata_file):
            loops.append(run("losetup", "--find", "--show", str(path)).stdout.strip())
        data_sectors = data_mib * 2**20 // SECTOR
        block_sectors = block_kib * 1024 // SECTOR
        data_device, linear = loops[0], None
        if linear_data:
            linear = f"{name}-data"
            run("dmsetup", "create", linear, "--table", f"0 {data_sectors} linear {loops[0]} 0")
            data_device = f"/dev/mapper/{linear}"
        table = (f"0 {data_sectors} thin-pool {loops[1]} {data_device} {block_sectors} "
                 f"{low_water_blocks} 1 error_if_no_space")
        pool = LoopPool(name, loops[0], loops[1], data_sectors, block_sectors,
                        (data_file, metadata_file), linear)
        run("dmsetup", "create", name, "--table", table)
    except BaseException:
        if linear_data:
            run("dmsetup", "remove", f"{name}-data", check=False)
        for loop in loops:
            run("losetup", "-d", loop, check=False)
        for path in (data_file, metadata_file):
            path.unlink(missing_ok=True)
        raise
    try:
        yield pool
    finally:
        destroy_pool(pool)
