"""Create and destroy loop-backed thin pools (what `dmfs pool create` and `dmfs pool destroy` run).

A loop-backed pool is two sparse files in one directory, ``<name>.data`` and
``<name>.metadata``, each on a loop device, under a ``thin-pool`` table made
with ``error_if_no_space`` (a full pool fails writes at once instead of
queueing them for 60 s) and a low-water mark (by default 10% of the data
blocks: the kernel raises a device event when free space falls below it).

Creating is idempotent.  When a pool of that name already runs on those files,
it is reported as it is.  When the files exist but the pool does not (after a
reboot, or after ``destroy`` without deleting the files), they are attached
again and the kernel opens the pool's existing metadata: its thin devices and
their data are back.  ``destroy`` removes the pool and detaches its loop
devices, refusing while any device is stacked on the pool; it deletes the
files only when asked.

What to create is planned and checked first (:mod:`dmfs.pool.geometry`);
device-mapper calls go through :class:`~dmfs.pool.dm.DeviceMapper`, loop devices
through losetup (:mod:`dmfs.pool.blockdev`).  Failures raise PoolAdminError
(a missing pool or one that is not a thin pool: PoolError), with a message
that says what to do.  The text for the terminal is the CLI's
(:mod:`dmfs.cli.pool`).  Pools on real disks are made by hand or with LVM, as
``contrib/PRODUCTION-POOL.md`` describes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmfs.pool import fs
from dmfs.pool.blockdev import (
    LoopDevice,
    attach_loop,
    detach_loop_quietly,
    device_node,
    holders_of,
    is_loop,
    loop_backing_file,
    loop_devices_of,
    losetup,
    sync_loop_capacity,
)
from dmfs.pool.dm import SECTOR_SIZE, DeviceBusy, DeviceMapper, DmError, NoSuchDevice, Target
from dmfs.pool.errors import PoolAdminError
from dmfs.pool.geometry import POOL_FEATURES, LoopPoolSpec
from dmfs.pool.status import PoolStatus, StatusParseError, parse_pool_status
from dmfs.pool.thinpool import PoolTable, find_thin_pool
from dmfs.units import format_size

log = logging.getLogger(__name__)

#: stat(2) counts a file's allocated space (st_blocks) in units of 512 bytes,
#: whatever the filesystem's block size (a fact of its own, not the dm sector)
ST_BLOCKS_UNIT = 512


# ---- reports -----------------------------------------------------------------------


@dataclass
class PoolReport:
    """What ``pool create`` found or made (also what ``--json`` prints)."""

    name: str
    device: str
    #: this call set the pool up (False: it was already there)
    created: bool
    #: set up from files that already held a pool's metadata (its thin devices are back)
    reactivated: bool
    data_file: str | None
    metadata_file: str | None
    data_device: str
    metadata_device: str
    data_size: int
    metadata_size: int | None
    block_size: int
    total_data_blocks: int
    used_data_blocks: int
    low_water_blocks: int
    features: list[str]
    mode: str
    #: the directories this call made for the files (--loopback DIR and its parents)
    created_directories: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class DestroyReport:
    """What ``pool destroy`` did (also what ``--json`` prints)."""

    name: str
    removed: bool
    detached: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    used_data_blocks: int | None = None
    block_size: int | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _pool_status(dm: DeviceMapper, name: str) -> PoolStatus:
    targets = dm.status(name)
    try:
        return parse_pool_status(targets[0].params)
    except (IndexError, StatusParseError) as error:
        raise PoolAdminError(f"pool {name}: unreadable status: {error}") from None


def _report(dm: DeviceMapper, name: str, target: Target, created: bool,
            spec: LoopPoolSpec | None, reactivated: bool = False) -> PoolReport:
    table = PoolTable.parse(target.params)
    status = _pool_status(dm, name)
    metadata_size = spec.metadata_file.stat().st_size if spec else None
    return PoolReport(
        name=name, device=dm.device_path(name), created=created, reactivated=reactivated,
        data_file=str(spec.data_file) if spec else None,
        metadata_file=str(spec.metadata_file) if spec else None,
        data_device=table.data_device, metadata_device=table.metadata_device,
        data_size=target.length * SECTOR_SIZE, metadata_size=metadata_size,
        block_size=table.block_sectors * SECTOR_SIZE, total_data_blocks=status.total_data_blocks,
        used_data_blocks=status.used_data_blocks, low_water_blocks=table.low_water_blocks,
        features=list(table.features), mode="fail" if status.failed else status.mode)


# ---- create ------------------------------------------------------------------------


def _existing_pool(dm: DeviceMapper, spec: LoopPoolSpec) -> PoolReport | None:
    """The report of pool ``spec.name`` if it runs on ``spec``'s files, None if absent."""
    try:
        targets = dm.table(spec.name)
    except NoSuchDevice:
        return None
    if len(targets) != 1 or targets[0].target_type != "thin-pool":
        kinds = ", ".join(sorted({t.target_type for t in targets})) or "no table"
        raise PoolAdminError(f"a device named {spec.name} exists and is not a thin-pool (its "
                             f"table has: {kinds}): choose another --name")
    target = targets[0]
    table = PoolTable.parse(target.params)
    backing = []
    for role, devnum, file in (("data", table.data_device, spec.data_file),
                               ("metadata", table.metadata_device, spec.metadata_file)):
        loops = loop_devices_of(file) if file.exists() else []
        if devnum not in {loop.devnum for loop in loops}:
            behind = loop_backing_file(devnum) if is_loop(devnum) else None
            backing.append(f"its {role} device {devnum} is "
                           + (f"a loop device on {behind}" if behind else "not a loop device")
                           + f", not {file}")
    if backing:
        raise PoolAdminError(f"a pool named {spec.name} exists but is not backed by the files "
                             f"in {spec.directory}: {'; '.join(backing)}")
    wanted = {"size": format_size(spec.size), "block size": format_size(spec.block_size),
              "metadata size": format_size(spec.metadata_size),
              "low-water mark": f"{spec.low_water_blocks} blocks",
              "features": " ".join(POOL_FEATURES)}
    actual = {"size": format_size(target.length * SECTOR_SIZE),
              "block size": format_size(table.block_sectors * SECTOR_SIZE),
              "metadata size": format_size(spec.metadata_file.stat().st_size),
              "low-water mark": f"{table.low_water_blocks} blocks",
              "features": " ".join(table.features)}
    differences = [f"{key} {actual[key]} (asked for {wanted[key]})"
                   for key in wanted if wanted[key] != actual[key]]
    if differences:
        raise PoolAdminError(f"pool {spec.name} exists on these files with "
                             f"{', '.join(differences)}: dmfs does not change an existing "
                             f"pool; repeat the options it was created with")
    return _report(dm, spec.name, target, created=False, spec=spec)


def prepare_backing_file(path: Path, size: int) -> bool:
    """Make ``path`` a sparse file of ``size`` bytes; True when this call created it.

    An existing file of the right size is kept (it may hold a pool); one of
    another size is resized only if it holds no data at all.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return True
    if not stat.S_ISREG(info.st_mode):
        raise PoolAdminError(f"{path} exists and is not a regular file")
    if info.st_size == size:
        return False
    if info.st_blocks == 0:
        os.truncate(path, size)
        return False
    raise PoolAdminError(f"{path} exists with {format_size(info.st_size)} and holds data, but "
                         f"this pool needs {format_size(size)}: repeat the options the pool was "
                         f"created with, or delete the file")


def _check_free_space(spec: LoopPoolSpec) -> None:
    needed = 0
    for path, size in ((spec.data_file, spec.size), (spec.metadata_file, spec.metadata_size)):
        allocated = path.stat().st_blocks * ST_BLOCKS_UNIT if path.exists() else 0
        needed += max(size - allocated, 0)
    space = os.statvfs(spec.directory)
    free = space.f_bavail * space.f_frsize
    if needed > free:
        raise PoolAdminError(
            f"{spec.directory} has {free / 1024**2:.0f}MiB free but the pool's files can grow "
            f"by {needed / 1024**2:.0f}MiB: when a loop file "
            f"cannot grow, the pool fails and needs thin_check before it works again; use a "
            f"smaller --size, or --overcommit to accept that risk")


#: Mode of a pool directory dmfs makes: the files hold every snapshot's data.
POOL_DIRECTORY_MODE = 0o700


def make_pool_directory(directory: Path) -> list[Path]:
    """Make ``directory`` and its missing parents, as ``mkdir -p -m 0700`` does
    (the parents 0755); the directories made, outermost first."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    made = []
    try:
        for path in reversed(missing):
            mode = POOL_DIRECTORY_MODE if path == directory else 0o755
            os.mkdir(path, mode)
            made.append(path)
            os.chmod(path, mode)  # whatever the umask
    except OSError as error:
        remove_directories(made)
        raise PoolAdminError(f"cannot make the directory {error.filename}: "
                             f"{error.strerror}") from None
    for path in made:
        log.debug("made directory %s", path)
    return made


def remove_directories(made: list[Path]) -> None:
    """Undo :func:`make_pool_directory` (innermost first; only empty directories)."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()


def create_loop_pool(dm: DeviceMapper, spec: LoopPoolSpec, *,
                     overcommit: bool = False) -> PoolReport:
    """Create (or find, or re-activate) the loop-backed pool ``spec`` describes.

    Raises PoolAdminError when a different device has the name, the files do not
    fit, or the kernel refuses the table; what this call created is undone.
    """
    existing = _existing_pool(dm, spec)
    if existing is not None:
        log.debug("pool %s already runs on %s; nothing to do", spec.name, spec.data_file)
        return existing
    made_directories = make_pool_directory(spec.directory)
    if not overcommit:
        try:
            _check_free_space(spec)
        except PoolAdminError:
            remove_directories(made_directories)
            raise

    # Metadata the kernel has written to is a pool to re-open, not a new one; the
    # kernel would quietly grow or refuse it on a data file of another size.
    reactivated = spec.metadata_file.exists() and spec.metadata_file.stat().st_blocks > 0
    if reactivated:
        data_size = spec.data_file.stat().st_size if spec.data_file.exists() else None
        if data_size != spec.size:
            has = "is missing" if data_size is None else f"has {format_size(data_size)}"
            raise PoolAdminError(
                f"{spec.metadata_file} holds an earlier pool whose data file {spec.data_file} "
                f"{has}, not {format_size(spec.size)}: repeat the options that pool was "
                f"created with" + (", or delete the metadata file" if data_size is None else ""))
    created_files: list[Path] = []
    attached: list[LoopDevice] = []
    try:
        loops = {}
        for role, path, size in (("data", spec.data_file, spec.size),
                                 ("metadata", spec.metadata_file, spec.metadata_size)):
            if prepare_backing_file(path, size):
                created_files.append(path)
            found = loop_devices_of(path)
            if found:
                users = holders_of(found[0].devnum)
                if users:
                    raise PoolAdminError(f"{path} is already in use through {found[0].path} by "
                                         f"{', '.join(users)}: is it another pool's file?")
                log.info("reusing %s, already attached to %s", found[0].path, path)
                loops[role] = found[0]
                sync_loop_capacity(found[0], path)
            else:
                loops[role] = attach_loop(path)
                attached.append(loops[role])
                log.debug("attached %s to %s", loops[role].path, path)
        table = spec.table(loops["metadata"].devnum, loops["data"].devnum)
        target = Target(0, spec.size // SECTOR_SIZE, "thin-pool", table.params())
        try:
            dm.create(spec.name, [target])
        except DmError as error:
            reused = "" if not reactivated else (
                "; if the metadata file holds an earlier pool, repeat that pool's --block-size")
            raise PoolAdminError(f"the kernel refused the thin-pool table "
                                 f"'{target.line()}': {error} (see dmesg){reused}") from None
    except BaseException:
        for loop in attached:
            detach_loop_quietly(loop.path)
        for path in created_files:
            path.unlink(missing_ok=True)
        remove_directories(made_directories)
        raise
    log.debug("created pool %s on %s and %s", spec.name, loops["data"].path,
             loops["metadata"].path)
    report = _report(dm, spec.name, dm.table(spec.name)[0], created=True, spec=spec,
                     reactivated=reactivated)
    report.created_directories = [str(path) for path in made_directories]
    # A re-activated full pool is legitimately out_of_data_space; ro or fail is damage.
    if report.mode in ("ro", "fail"):
        raise PoolAdminError(f"pool {spec.name} is active but in mode {report.mode}: see dmesg; "
                             f"deactivate it (dmfs pool destroy) and repair its metadata with "
                             f"thin_check/thin_repair")
    return report


# ---- destroy -----------------------------------------------------------------------


def _users_of_pool(dm: DeviceMapper, name: str, pool_devnum: str) -> str | None:
    """Why pool ``name`` cannot be removed now, or None when nothing uses it."""
    holders = holders_of(pool_devnum)
    if holders:
        mounted: dict[tuple[int, int], list[str]] = {}
        for mount in fs.mountinfo():
            mounted.setdefault(mount.devnum, []).append(str(mount.mountpoint))
        described = []
        for holder in holders:
            try:
                info = dm.info(holder)
                places = mounted.get(info.devnum, [])
            except DmError:
                places = []
            described.append(f"{holder} (mounted on {', '.join(places)})" if places else holder)
        return (f"devices on it are active: {', '.join(described)}; stop dmfs, unmount them "
                f"and remove them (dmsetup remove) first")
    open_count = dm.info(name).open_count
    if open_count:
        return (f"it is held open {open_count} time(s) by a process (fuser -v "
                f"{dm.device_path(name)} may tell which)")
    return None


def destroy_pool(dm: DeviceMapper, name: str, *,
                 loopback_dir: Path | None = None) -> DestroyReport:
    """Remove pool ``name`` and detach its loop devices; delete its files with ``loopback_dir``.

    Refuses (PoolAdminError) while any device is stacked on the pool or a
    process holds it, and when ``loopback_dir`` does not hold the pool's files.
    If the pool is not active but ``loopback_dir`` holds its files, they are
    detached and deleted; if there is neither, PoolError (not found); also
    PoolError when ``name`` is a device but not a thin pool.
    """
    files = ([loopback_dir / f"{name}.data", loopback_dir / f"{name}.metadata"]
             if loopback_dir else [])
    report = DestroyReport(name, removed=False)
    try:
        dm.info(name)
    except NoSuchDevice:
        if not any(path.exists() for path in files):
            find_thin_pool(dm, name)  # raises PoolError: not found
        _forget_files(files, report)
        return report

    target = find_thin_pool(dm, name)
    table = PoolTable.parse(target.params)
    info = dm.info(name)
    pool_devnum = f"{info.major}:{info.minor}"
    busy = _users_of_pool(dm, name, pool_devnum)
    if busy:
        raise PoolAdminError(f"pool {name} is in use, not removed: {busy}")
    pool_loops = [devnum for devnum in (table.data_device, table.metadata_device)
                  if is_loop(devnum)]
    if files:
        for path, devnum in zip(files, (table.data_device, table.metadata_device), strict=True):
            if not path.exists() or devnum not in {loop.devnum for loop in loop_devices_of(path)}:
                behind = loop_backing_file(devnum) or f"device {devnum}"
                raise PoolAdminError(f"pool {name} is backed by {behind}, not by {path}: "
                                     f"nothing removed")

    status = _pool_status(dm, name)
    report.used_data_blocks = None if status.failed else status.used_data_blocks
    report.block_size = table.block_sectors * SECTOR_SIZE
    try:
        dm.remove(name)
    except DeviceBusy:
        raise PoolAdminError(f"pool {name} became busy while being removed; "
                             f"nothing removed") from None
    report.removed = True
    log.debug("removed pool %s", name)
    for devnum in pool_loops:
        path = device_node(devnum)
        losetup("--detach", path)
        report.detached.append(path)
    for path in files:
        path.unlink()
        report.deleted.append(str(path))
    return report


def _forget_files(files: list[Path], report: DestroyReport) -> None:
    """Detach the loop devices of a pool's leftover files and delete them."""
    for path in files:
        if not path.exists():
            continue
        for loop in loop_devices_of(path):
            users = holders_of(loop.devnum)
            if users:
                raise PoolAdminError(f"{path} is in use through {loop.path} by "
                                     f"{', '.join(users)}: not deleted")
            losetup("--detach", loop.path)
            report.detached.append(loop.path)
        path.unlink()
        report.deleted.append(str(path))
