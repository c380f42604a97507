"""dmfs configuration: what the engine and the daemon need to run.

Key names follow containerd's devmapper snapshotter where it has them
(``pool_name``, ``base_image_size``, ``root_path``, ``fs_type``, ``fs_options``,
``discard_blocks``, ``async_remove``); the rest are dmfs's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_ROOT = Path("/var/lib/dmfs")
DEFAULT_RUNTIME_ROOT = Path("/run/dmfs")


@dataclass
class Config:
    """Settings of one dmfs instance (one thin pool)."""

    #: name of the thin-pool device under /dev/mapper (required)
    pool_name: str
    #: virtual size in bytes of the base device every parentless snapshot copies (required)
    base_image_size: int
    #: directory of the metadata journal; default /var/lib/dmfs/<pool_name>
    root_path: Path | None = None
    #: directory of the snapshot mountpoints; default /run/dmfs/<pool_name>
    runtime_path: Path | None = None
    #: filesystem made on the base device (only ext4 for now)
    fs_type: str = "ext4"
    #: extra mkfs options, as one shell-style string
    fs_options: str = ""
    #: let mkfs initialise inode tables lazily (faster base creation, background writes)
    mkfs_lazy_init: bool = False
    #: discard a snapshot's blocks before deleting its thin device
    discard_blocks: bool = False
    #: answer a remove before the thin device is deleted; the deletion finishes in the background
    async_remove: bool = False
    #: "ioctl" (device-mapper ioctls, default) or "dmsetup" (the command, fallback)
    driver: str = "dmsetup"
    #: seconds to wait for a device's udev event on activation
    activation_timeout: float = 10.0
    #: seconds a read-only snapshot mount stays after its last use
    idle_timeout: float = 300.0
    #: where `dmfs mount` puts the tree, when the command line does not say
    mountpoint: Path | None = None
    #: group whose members may mkdir/mv/rmdir (root always may)
    admin_group: str | None = None
    #: let every user browse the tree (FUSE allow_other + default_permissions)
    allow_other: bool = True
    #: log level name (debug, info, warning, error)
    log_level: str = "info"
    #: where the configuration came from, for messages
    source: Path | None = field(default=None, compare=False)

    @property
    def state_dir(self) -> Path:
        return self.root_path or DEFAULT_STATE_ROOT / self.pool_name

    @property
    def runtime_dir(self) -> Path:
        return self.runtime_path or DEFAULT_RUNTIME_ROOT / self.pool_name
