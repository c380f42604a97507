"""dmfs configuration: what the engine and the daemon need to run.

Key names follow containerd's devmapper snapshotter where it has them
(``pool_name``, ``base_image_size``, ``root_path``, ``fs_type``, ``fs_options``,
``discard_blocks``, ``async_remove``); the rest are dmfs's own.

A configuration file is TOML with exactly one table, spelled ``[dmfs]``, or as
in containerd's config, ``[plugins.devmapper]`` or
``[plugins."io.containerd.snapshotter.v1.devmapper"]``; :func:`load_config`
reads it.  Every problem with a file raises :class:`ConfigError`, whose message
is one line naming the file, the key and what is wrong.  The admin group is
resolved when the file is loaded, so a typo stops dmfs before it touches
anything; a numeric gid is accepted without a lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmfs.filesystems import DEFAULT_FS_TYPE, FILESYSTEMS, FS_TYPES, fs_options_problem
from dmfs.units import SECTOR_SIZE, SIZE_EXAMPLES, format_size, parse_duration, parse_size

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
    #: filesystem made on the base device: "ext4" or "xfs" (dmfs.filesystems.FILESYSTEMS)
    fs_type: str = DEFAULT_FS_TYPE
    #: mkfs arguments (leading "-"), or for ext4 mkfs.ext4's -E list as containerd reads it
    fs_options: str = ""
    #: let mkfs.ext4 initialise inode tables lazily (faster base creation, background writes)
    mkfs_lazy_init: bool = False
    #: discard a snapshot's blocks before deleting its thin device
    discard_blocks: bool = False
    #: answer a remove before the thin device is deleted; the deletion finishes in the background
    async_remove: bool = False
    #: "ioctl" (device-mapper ioctls, default) or "dmsetup" (the command, fallback)
    driver: str = "ioctl"
    #: seconds to wait for a device's udev event on activation
    activation_timeout: float = 10.0
    #: seconds a read-only snapshot mount stays after its last use
    idle_timeout: float = 300.0
    #: where `dmfs mount` puts the tree, when the command line does not say
    mountpoint: Path | None = None
    #: group whose members may mkdir/mv/rmdir (root always may)
    admin_group: str | None = None
    #: let every user browse the tree (FUSE allow_other); dmfs checks who may change
    #: it itself, without the kernel's default_permissions
    allow_other: bool = True
    #: log level name (debug, info, warning, error)
    log_level: str = "info"
    #: unix socket on which `dmfs mount` also serves containerd's snapshots API; None: off
    grpc_address: Path | None = None
    #: where the configuration came from, for messages
    source: Path | None = field(default=None, compare=False)

    @property
    def state_dir(self) -> Path:
        return self.root_path or DEFAULT_STATE_ROOT / self.pool_name

    @property
    def runtime_dir(self) -> Path:
        return self.runtime_path or DEFAULT_RUNTIME_ROOT / self.pool_name

    @property
    def mount_dir(self) -> Path:
        """Where the snapshots' filesystems are mounted (``<id>`` under it)."""
        return self.runtime_dir / "snapshots"

    @property
    def device_prefix(self) -> str:
        """dm name of a snapshot's device, less its thin id: ``<pool>-snap-``."""
        return f"{self.pool_name}-snap-"

    @property
    def base_device_name(self) -> str:
        """dm name of the hidden base device."""
        return f"{self.pool_name}-base"

    def names_a_dmfs_device(self, name: str) -> bool:
        """Whether ``name`` is a dm name dmfs gives its devices on this pool."""
        return name.startswith(self.device_prefix) or name == self.base_device_name


# ---- loading -------------------------------------------------------------------------

#: The spellings of the one table a file holds: TOML key path -> how messages name it.
CONFIG_TABLES: dict[tuple[str, ...], str] = {
    ("dmfs",): "[dmfs]",
    ("plugins", "devmapper"): "[plugins.devmapper]",
    ("plugins", "io.containerd.snapshotter.v1.devmapper"):
        '[plugins."io.containerd.snapshotter.v1.devmapper"]',
}
#: The device-mapper drivers (opened by dmfs.pool.drivers): "ioctl" speaks to
#: /dev/mapper/control directly (default); "dmsetup" runs the command.  Defined
#: here, not in the pool layer, because the pool imports this module.
DRIVERS = ("ioctl", "dmsetup")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Longest pool name accepted.  The kernel allows 127 bytes; the rest is left for
#: the names of the thin devices dmfs derives from the pool's name.
MAX_POOL_NAME = 100
#: Characters libdevmapper and udev keep as they are in /dev/mapper names (others
#: are mangled to \xNN there, so the node would not be /dev/mapper/<name>).
_DM_NAME_RE = re.compile(r"[A-Za-z0-9#+\-.:=@_]+")
_RESERVED_DM_NAMES = (".", "..", "control")
MIN_BASE_IMAGE_SIZE = 1024**2
# Keys of containerd's older devmapper config that made it create the pool itself.
_CONTAINERD_POOL_KEYS = ("data_device", "meta_device", "data_block_size")
_TOML_TYPE_NAMES = {str: "string", int: "integer", float: "float", bool: "boolean",
                    dict: "table", list: "array"}


class ConfigError(ValueError):
    """A configuration file that cannot be used; ``str()`` is one line saying why."""

    def __init__(self, path: Path | str, problem: str, *, table: str | None = None,
                 key: str | None = None) -> None:
        self.path = Path(path)
        self.table = table
        self.key = key
        self.problem = problem
        where = f"{table} {key}: " if table and key else f"{key}: " if key else ""
        super().__init__(f"{path}: {where}{problem}".replace("\n", " "))


def dm_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a device-mapper device name for dmfs, or None."""
    if not name:
        return "is empty"
    if len(name) > MAX_POOL_NAME:
        return f"is {len(name)} characters long; at most {MAX_POOL_NAME} are allowed"
    if "/" in name:
        return f"{name!r} contains '/'; a device-mapper name is a name, not a path"
    if name in _RESERVED_DM_NAMES:
        return f"{name!r} is reserved in /dev/mapper"
    if not _DM_NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _DM_NAME_RE.fullmatch(c))
        return (f"{name!r} contains {bad!r}; use letters, digits and #+-.:=@_ "
                f"(udev mangles other characters in /dev/mapper names)")
    return None


def admin_gid(group: str) -> int:
    """The gid of ``group`` (a group name, or a numeric gid taken as it is).

    Raises KeyError when no group has that name.
    """
    import grp  # (with difflib and tomllib, imported where used: see load_config)

    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def _type_name(value: Any) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


def _suggestion(word: str, choices: tuple[str, ...] | list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Invalid(Exception):
    """A bad value; the loader adds the file, table and key."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)} {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def _absolute_path(value: Any) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise _Invalid(f"{text!r} is not an absolute path")
    return Path(text)


def _root_path(value: Any) -> Path | None:
    # containerd treats an empty root_path as "use the default"; so does dmfs.
    if value == "":
        return None
    return _absolute_path(value)


def _choice(choices: tuple[str, ...], what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _string(value)
        if text.lower() in choices:
            return text.lower()
        allowed = ", ".join(repr(choice) for choice in choices)
        raise _Invalid(f"unknown {what} {text!r}{_suggestion(text.lower(), choices)}; "
                       f"expected one of {allowed}")
    return parse


def _fs_type(value: Any) -> str:
    text = _string(value)
    if text not in FS_TYPES:
        allowed = " or ".join(repr(name) for name in FS_TYPES)
        raise _Invalid(f"{text!r} is not supported{_suggestion(text, FS_TYPES)}; dmfs makes "
                       f"{allowed} filesystems")
    return text


def _pool_name(value: Any) -> str:
    text = _string(value)
    problem = dm_name_problem(text)
    if problem:
        raise _Invalid(problem)
    return text


def _base_image_size(value: Any) -> int:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _Invalid(f"expected a size such as \"10GiB\" or a number of bytes, "
                       f"got {_type_name(value)} {value!r}")
    try:
        size = parse_size(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None
    if size < MIN_BASE_IMAGE_SIZE:
        raise _Invalid(f"{value!r} means {size} bytes, less than the minimum "
                       f"{format_size(MIN_BASE_IMAGE_SIZE)} (a number without a unit counts "
                       f"bytes; {SIZE_EXAMPLES})")
    if size % SECTOR_SIZE:
        raise _Invalid(f"{value!r} is not a multiple of {SECTOR_SIZE} bytes (one sector)")
    return size


def _duration(minimum_exclusive: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise _Invalid(f"expected seconds or a duration such as \"5m\", "
                           f"got {_type_name(value)} {value!r}")
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise _Invalid(str(error)) from None
        if minimum_exclusive and seconds == 0:
            raise _Invalid(f"{value!r} must be longer than zero")
        return seconds
    return parse


def _admin_group(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Invalid(f"gid {value} is negative")
        return str(value)
    text = _string(value)
    try:
        admin_gid(text)
    except KeyError:
        raise _Invalid(f"no group named {text!r} on this system "
                       f"(create it with groupadd, or give a numeric gid)") from None
    return text


#: sockaddr_un's sun_path holds 108 bytes, the terminating NUL included
MAX_SOCKET_PATH = 107


def socket_path_problem(text: str) -> str | None:
    """Why ``text`` cannot be the path of a unix socket to serve, or None."""
    if not text.startswith("/"):
        return (f"{text!r} is not an absolute path (the path of a unix socket, e.g. "
                "/run/dmfs/pool0/grpc/snapshots.sock)")
    size = len(text.encode())
    if size > MAX_SOCKET_PATH:
        return (f"{text!r} is {size} bytes long; a unix socket's path holds at most "
                f"{MAX_SOCKET_PATH}")
    if text.endswith("/"):
        return f"{text!r} names a directory; give the socket's file name"
    return None


def _grpc_address(value: Any) -> Path | None:
    # containerd writes socket addresses as paths, some tools as unix:// URLs: both work.
    text = _string(value).removeprefix("unix://")
    if text == "":
        return None
    problem = socket_path_problem(text)
    if problem:
        raise _Invalid(problem)
    return Path(text)


#: Every key a table may hold, with the function that checks and converts its value.
#: The key is also the name of the Config field it sets.
_KEYS: dict[str, Callable[[Any], Any]] = {
    "pool_name": _pool_name,
    "base_image_size": _base_image_size,
    "root_path": _root_path,
    "runtime_path": _absolute_path,
    "fs_type": _fs_type,
    "fs_options": _string,
    "mkfs_lazy_init": _boolean,
    "discard_blocks": _boolean,
    "async_remove": _boolean,
    "driver": _choice(DRIVERS, "driver"),
    "activation_timeout": _duration(minimum_exclusive=True),
    "idle_timeout": _duration(minimum_exclusive=False),
    "mountpoint": _absolute_path,
    "admin_group": _admin_group,
    "allow_other": _boolean,
    "log_level": _choice(LOG_LEVELS, "log level"),
    "grpc_address": _grpc_address,
}
REQUIRED_KEYS = ("pool_name", "base_image_size")
CONFIG_KEYS = tuple(_KEYS)


def _find_table(document: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """The one dmfs table of a parsed file, and how messages name it."""
    found = []
    for keys, label in CONFIG_TABLES.items():
        node: Any = document
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            found.append((label, node))
    if len(found) > 1:
        labels = " and ".join(label for label, _ in found)
        raise ConfigError(path, f"both {labels} are present; keep exactly one")

    containerd_hint = ("; this looks like a containerd config.toml: copy its devmapper table "
                       "into a file of its own (dmfs and containerd must never share a pool)")
    top_level = [key for key in document if key not in ("dmfs", "plugins")]
    plugins = document.get("plugins", {})
    other_plugins = [key for key in plugins if ("plugins", key) not in CONFIG_TABLES] \
        if isinstance(plugins, dict) else []
    if top_level or other_plugins:
        looks_like_containerd = "version" in top_level or bool(other_plugins)
        unknown = (f"top-level key {top_level[0]!r}" if top_level
                   else f"table [plugins.{other_plugins[0]}]")
        hint = containerd_hint if looks_like_containerd else (
            _suggestion(top_level[0], ["dmfs", "plugins"]) if top_level else "")
        raise ConfigError(path, f"unknown {unknown}{hint}")
    if not found:
        spellings = ", ".join(CONFIG_TABLES.values())
        raise ConfigError(path, f"no configuration table; expected one of {spellings}")
    label, table = found[0]
    if not isinstance(table, dict):
        raise ConfigError(path, f"{label} must be a table, got {_type_name(table)}")
    return label, table


def config_from_table(table: dict[str, Any], path: Path, label: str = "[dmfs]") -> Config:
    """Check every key of one parsed table and build the Config it describes."""
    for key in table:
        if key in _KEYS:
            continue
        if key in _CONTAINERD_POOL_KEYS:
            raise ConfigError(path, "is a containerd key for creating the pool, which dmfs "
                              "does not do from its config: create the pool first (dmfs pool "
                              "create, or contrib/PRODUCTION-POOL.md) and remove this key",
                              table=label, key=key)
        raise ConfigError(path, f"unknown key{_suggestion(key, CONFIG_KEYS)}",
                          table=label, key=key)
    for key in REQUIRED_KEYS:
        if key not in table:
            raise ConfigError(path, "is required", table=label, key=key)
    values: dict[str, Any] = {}
    for key, value in table.items():
        try:
            values[key] = _KEYS[key](value)
        except _Invalid as invalid:
            raise ConfigError(path, str(invalid), table=label, key=key) from None
    config = Config(**values, source=path)
    _check_filesystem(config, path, label)
    return config


def _check_filesystem(config: Config, path: Path, label: str) -> None:
    """The settings that only make sense together: fs_type with fs_options,
    mkfs_lazy_init and the smallest base_image_size its mkfs accepts."""
    problem = fs_options_problem(config.fs_type, config.fs_options,
                                 lazy_init=config.mkfs_lazy_init)
    if problem:
        raise ConfigError(path, problem, table=label, key="fs_options")
    filesystem = FILESYSTEMS[config.fs_type]
    if config.base_image_size < filesystem.min_size:
        raise ConfigError(path, f"{format_size(config.base_image_size)} is less than the "
                          f"smallest {config.fs_type} filesystem {filesystem.mkfs} makes, "
                          f"{format_size(filesystem.min_size)} (a thin device is sparse: a "
                          f"bigger size costs nothing until written)", table=label,
                          key="base_image_size")


def load_config(path: Path | str) -> Config:
    """Read and check a dmfs configuration file.

    Raises ConfigError (one line: file, key, problem) for a file that cannot be
    read, is not TOML, lacks or duplicates the table, has an unknown key, lacks
    a required key or has a bad value.
    """
    # tomllib, difflib and grp are imported when a file is read, not with this
    # module: every dmfs command imports it for its constants (DRIVERS,
    # LOG_LEVELS), and most commands read no file (dmfs diff, dmfs --help).
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(path, f"cannot read: {error.strerror or error}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(path, f"not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, f"invalid TOML: {error}") from None
    label, table = _find_table(document, path)
    return config_from_table(table, path, label)
