"""The snapshot engine: thin pool, devices, metadata journal, udev. Knows nothing of FUSE.

This module is the engine's public API: the front ends (``dmfs.fuse``,
``dmfs.cli``, any later one) import what they use from ``dmfs.pool``, only
names listed in ``__all__``, never a module inside it; modules inside the
engine import each other directly.  ``contrib/check-imports`` (the lint tier)
holds everyone to that, and the engine to importing no front end.
"""

from dmfs.pool.blockdev import device_node
from dmfs.pool.dm import DeviceMapper, DmError, NoSuchDevice, Target
from dmfs.pool.drivers import open_driver
from dmfs.pool.errors import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    InUse,
    InvalidArgument,
    JournalCorrupt,
    LabelTooLarge,
    NoSpace,
    NotFound,
    PoolAdminError,
    PoolError,
    PoolSpecError,
    SnapshotError,
)
from dmfs.pool.fs import MountEntry, mountinfo, syncfs, umount
from dmfs.pool.geometry import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LOW_WATER,
    LoopPoolSpec,
    LowWater,
    plan_loop_pool,
)
from dmfs.pool.info import Info, Usage
from dmfs.pool.inspect import Finding, Inspection, inspect_pool, journal_in_use, tree_of
from dmfs.pool.loopback import DestroyReport, PoolReport, create_loop_pool, destroy_pool
from dmfs.pool.metadata import DeviceState, Kind
from dmfs.pool.snapshotter import Snapshotter
from dmfs.pool.thindelta import BlockDelta, read_delta, thin_device_of
from dmfs.pool.thinpool import PoolTable, ThinPool, find_thin_pool

__all__ = [  # noqa: RUF022 (grouped by what the names are for, not sorted)
    # the engine: containerd's snapshotter operations, and what they return
    "Snapshotter", "Info", "Usage", "Kind", "DeviceState",
    # its errors, by type (errors.py says what each means)
    "SnapshotError", "AlreadyExists", "NotFound", "InvalidArgument", "FailedPrecondition",
    "HasChildren", "InUse", "NoSpace", "PoolError", "JournalCorrupt", "LabelTooLarge",
    # reading a pool and its journal without serving it (dmfs status/tree/check)
    "Inspection", "Finding", "inspect_pool", "tree_of", "journal_in_use",
    # what differs between two thin devices (dmfs diff)
    "BlockDelta", "read_delta", "thin_device_of", "ThinPool", "device_node",
    # device-mapper drivers
    "DeviceMapper", "DmError", "NoSuchDevice", "Target", "open_driver",
    "PoolTable", "find_thin_pool",
    # loop-backed pools (dmfs pool create/destroy)
    "LowWater", "LoopPoolSpec", "plan_loop_pool", "DEFAULT_BLOCK_SIZE", "DEFAULT_LOW_WATER",
    "PoolReport", "DestroyReport", "create_loop_pool", "destroy_pool",
    "PoolSpecError", "PoolAdminError",
    # mounts
    "MountEntry", "mountinfo", "umount", "syncfs",
]
