"""The snapshot engine: thin pool, devices, metadata journal, udev. Knows nothing of FUSE.

This module is the engine's public API: the front ends (``dmfs.fuse``,
``dmfs.cli``, any later one) import what they use from ``dmfs.pool``, only
names listed in ``__all__``, never a module inside it; modules inside the
engine import each other directly.  ``contrib/check-imports`` (the lint tier)
holds everyone to that, and the engine to importing no front end.

Each name is imported on first use (PEP 562), so that a command that needs
only a little of the engine (``dmfs diff``, ``dmfs --help``, the mount helper's
checks) does not pay for all of it: importing the whole engine costs 0.8 s in
the test guest, most of it trio and pyudev.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the engine module that defines each public name (grouped by what they are for)
_EXPORTS: dict[str, tuple[str, ...]] = {
    # the engine: containerd's snapshotter operations, and what they return
    "snapshotter": ("Snapshotter",),
    "info": ("Info", "Usage", "BlockDevice"),
    "metadata": ("Kind", "DeviceState"),
    # which keys a snapshot may have, and each key's name in the tree
    "limits": ("encode_key", "NAME_MAX", "RESERVED_KEYS", "shown"),
    # its errors, by type (errors.py says what each means)
    "errors": ("SnapshotError", "AlreadyExists", "NotFound", "InvalidArgument",
               "FailedPrecondition", "HasChildren", "InUse", "NoSpace", "PoolError",
               "JournalCorrupt", "LabelTooLarge", "PoolSpecError", "PoolAdminError"),
    # reading a pool and its journal without serving it (dmfs status/tree/check)
    "inspect": ("Inspection", "Finding", "inspect_pool", "tree_of", "journal_in_use"),
    # what differs between two thin devices (dmfs diff)
    "thindelta": ("BlockDelta", "read_delta", "thin_device_of"),
    "blockdev": ("device_node",),
    # device-mapper drivers and the pool
    "dm": ("DeviceMapper", "DmError", "NoSuchDevice", "Target"),
    "drivers": ("open_driver",),
    "thinpool": ("ThinPool", "PoolTable", "find_thin_pool"),
    # loop-backed pools (dmfs pool create/destroy)
    "geometry": ("LowWater", "LoopPoolSpec", "plan_loop_pool", "DEFAULT_BLOCK_SIZE",
                 "DEFAULT_LOW_WATER"),
    "loopback": ("PoolReport", "DestroyReport", "create_loop_pool", "destroy_pool"),
    # mounts
    "fs": ("MountEntry", "mountinfo", "umount", "syncfs"),
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str) -> Any:
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
