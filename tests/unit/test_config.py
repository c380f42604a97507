from __future__ import annotations

import grp
import json
import re
from pathlib import Path

import pytest

from dmfs.config import (
    Config,
    ConfigError,
    admin_gid,
    dm_name_problem,
    load_config,
)
from dmfs.filesystems import mkfs_argv, mount_options

REQUIRED = 'pool_name = "pool0"\nbase_image_size = "10GB"\n'
EXAMPLE = Path(__file__).parents[2] / "contrib" / "dmfs.toml.example"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pool0.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return error.value


@pytest.mark.parametrize("header", [
    "[dmfs]",
    "[plugins.devmapper]",
    '[plugins."io.containerd.snapshotter.v1.devmapper"]',
])
def test_each_table_spelling_loads(tmp_path: Path, header: str) -> None:
    config = load_config(write(tmp_path, f"{header}\n{REQUIRED}"))
    assert config == Config(pool_name="pool0", base_image_size=10 * 1024**3)
    assert config.source == tmp_path / "pool0.toml"
    assert config.state_dir == Path("/var/lib/dmfs/pool0")
    assert config.runtime_dir == Path("/run/dmfs/pool0")


def test_the_seed_containerd_table_loads_as_containerd_reads_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[plugins."io.containerd.snapshotter.v1.devmapper"]
  root_path = "/var/lib/containerd/devmapper"
  pool_name = "containerd-pool"
  base_image_size = "8192MB"
  async_remove = true
  discard_blocks = true
  fs_type = "ext4"
  fs_options = "-O ^has_journal"
"""))
    assert config.base_image_size == 8 * 1024**3
    assert config.root_path == Path("/var/lib/containerd/devmapper")
    assert config.async_remove and config.discard_blocks
    assert config.fs_options == "-O ^has_journal"


def test_every_key(tmp_path: Path) -> None:
    group = grp.getgrgid(0).gr_name
    config = load_config(write(tmp_path, f"""
[dmfs]
pool_name = "vg-pool-tpool"
base_image_size = 1073741824
root_path = "/var/lib/dmfs/x"
runtime_path = "/run/dmfs/x"
fs_type = "ext4"
fs_options = "-E lazy_journal_init=1"
mkfs_lazy_init = true
discard_blocks = true
async_remove = true
driver = "dmsetup"
activation_timeout = 2.5
idle_timeout = "1h30m"
mountpoint = "/srv/snapshots"
admin_group = "{group}"
allow_other = false
log_level = "DEBUG"
grpc_address = "unix:///run/dmfs/x/grpc/snapshots.sock"
"""))
    assert config == Config(
        pool_name="vg-pool-tpool", base_image_size=1024**3,
        root_path=Path("/var/lib/dmfs/x"), runtime_path=Path("/run/dmfs/x"),
        fs_type="ext4", fs_options="-E lazy_journal_init=1", mkfs_lazy_init=True,
        discard_blocks=True, async_remove=True, driver="dmsetup", activation_timeout=2.5,
        idle_timeout=5400.0, mountpoint=Path("/srv/snapshots"), admin_group=group,
        allow_other=False, log_level="debug",
        grpc_address=Path("/run/dmfs/x/grpc/snapshots.sock"))


def test_empty_root_path_means_the_default_as_in_containerd(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'[dmfs]\n{REQUIRED}root_path = ""\n'))
    assert config.root_path is None
    assert config.state_dir == Path("/var/lib/dmfs/pool0")


def test_an_empty_grpc_address_is_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, f'[dmfs]\n{REQUIRED}grpc_address = ""\n')
                       ).grpc_address is None
    assert load_config(write(tmp_path, f"[dmfs]\n{REQUIRED}")).grpc_address is None


def test_numeric_admin_group_is_a_gid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"[dmfs]\n{REQUIRED}admin_group = 4242\n"))
    assert config.admin_group == "4242"
    assert admin_gid(config.admin_group) == 4242
    assert admin_gid(grp.getgrgid(0).gr_name) == 0


def test_the_shipped_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.pool_name == "pool0"
    assert config.base_image_size == 10 * 1024**3


def test_the_shipped_example_documents_every_key() -> None:
    from dmfs.config import CONFIG_KEYS
    text = EXAMPLE.read_text()
    for key in CONFIG_KEYS:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key


@pytest.mark.parametrize(("text", "key", "problem"), [
    # structure
    ("", None, "no configuration table"),
    ('pool_name = "x"\n', None, "unknown top-level key 'pool_name'"),
    (f"[dmfs]\n{REQUIRED}[plugins.devmapper]\n{REQUIRED}", None,
     "both [dmfs] and [plugins.devmapper] are present"),
    (f'[plugins.devmapper]\n{REQUIRED}[plugins."io.containerd.snapshotter.v1.devmapper"]\n'
     f"{REQUIRED}", None, "keep exactly one"),
    (f"[dmf]\n{REQUIRED}", None, "unknown top-level key 'dmf' (did you mean 'dmfs'?)"),
    (f"version = 2\n[plugins.devmapper]\n{REQUIRED}", None, "looks like a containerd config"),
    (f'[plugins.devmapper]\n{REQUIRED}[plugins."io.containerd.grpc.v1.cri"]\nx = 1\n', None,
     "unknown table [plugins.io.containerd.grpc.v1.cri]"),
    ("dmfs = 5\n", None, "[dmfs] must be a table, got integer"),
    # required keys
    ('[dmfs]\nbase_image_size = "1G"\n', "pool_name", "is required"),
    ('[dmfs]\npool_name = "x"\n', "base_image_size", "is required"),
    # unknown keys
    (f"[dmfs]\n{REQUIRED}idle_timout = 5\n", "idle_timout",
     "unknown key (did you mean 'idle_timeout'?)"),
    (f"[dmfs]\n{REQUIRED}colour = 5\n", "colour", "unknown key"),
    (f'[dmfs]\n{REQUIRED}data_device = "/dev/sdb"\n', "data_device", "dmfs pool create"),
    (f"[dmfs]\n{REQUIRED}[dmfs.extra]\nx = 1\n", "extra", "unknown key"),
    # wrong types
    ('[dmfs]\npool_name = 5\nbase_image_size = "1G"\n', "pool_name",
     "expected a string, got integer 5"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = true\n', "base_image_size",
     "got boolean True"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = 1.5\n', "base_image_size", "got float 1.5"),
    (f'[dmfs]\n{REQUIRED}discard_blocks = "true"\n', "discard_blocks",
     "expected true or false, got string 'true'"),
    (f"[dmfs]\n{REQUIRED}allow_other = 1\n", "allow_other", "expected true or false"),
    (f"[dmfs]\n{REQUIRED}async_remove = []\n", "async_remove", "got array"),
    (f"[dmfs]\n{REQUIRED}mkfs_lazy_init = {{}}\n", "mkfs_lazy_init", "got table"),
    (f"[dmfs]\n{REQUIRED}fs_options = [\"-q\"]\n", "fs_options", "expected a string"),
    (f"[dmfs]\n{REQUIRED}idle_timeout = true\n", "idle_timeout", "expected seconds"),
    (f"[dmfs]\n{REQUIRED}admin_group = true\n", "admin_group", "expected a string"),
    # sizes
    ('[dmfs]\npool_name = "x"\nbase_image_size = "10XB"\n', "base_image_size",
     "'10XB' is not a size"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = ""\n', "base_image_size", "is not a size"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = 10\n', "base_image_size",
     "means 10 bytes, less than the minimum 1MiB"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = -1\n', "base_image_size", "negative"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = 1048577\n', "base_image_size",
     "not a multiple of 512 bytes"),
    # durations
    (f'[dmfs]\n{REQUIRED}idle_timeout = "5 minutes"\n', "idle_timeout", "not a duration"),
    (f'[dmfs]\n{REQUIRED}idle_timeout = "1d"\n', "idle_timeout", "not a duration"),
    (f"[dmfs]\n{REQUIRED}idle_timeout = -5\n", "idle_timeout", "negative"),
    (f"[dmfs]\n{REQUIRED}activation_timeout = 0\n", "activation_timeout",
     "must be longer than zero"),
    (f'[dmfs]\n{REQUIRED}activation_timeout = "soon"\n', "activation_timeout",
     "not a duration"),
    # paths
    (f'[dmfs]\n{REQUIRED}root_path = "var/lib/dmfs"\n', "root_path",
     "'var/lib/dmfs' is not an absolute path"),
    (f'[dmfs]\n{REQUIRED}runtime_path = "./run"\n', "runtime_path", "not an absolute path"),
    (f'[dmfs]\n{REQUIRED}mountpoint = "srv"\n', "mountpoint", "not an absolute path"),
    (f'[dmfs]\n{REQUIRED}mountpoint = ""\n', "mountpoint", "not an absolute path"),
    (f'[dmfs]\n{REQUIRED}grpc_address = "dmfs.sock"\n', "grpc_address",
     "'dmfs.sock' is not an absolute path"),
    (f'[dmfs]\n{REQUIRED}grpc_address = "unix://run/dmfs.sock"\n', "grpc_address",
     "not an absolute path"),
    (f'[dmfs]\n{REQUIRED}grpc_address = "/{"s" * 110}"\n', "grpc_address",
     "a unix socket's path holds at most 107"),
    (f"[dmfs]\n{REQUIRED}grpc_address = 5\n", "grpc_address", "expected a string"),
    # choices
    (f'[dmfs]\n{REQUIRED}fs_type = "btrfs"\n', "fs_type",
     "'btrfs' is not supported; dmfs makes 'ext4' or 'xfs' filesystems"),
    (f'[dmfs]\n{REQUIRED}fs_type = "xf"\n', "fs_type", "(did you mean 'xfs'?)"),
    (f'[dmfs]\n{REQUIRED}driver = "dmsteup"\n', "driver",
     "unknown driver 'dmsteup' (did you mean 'dmsetup'?)"),
    (f'[dmfs]\n{REQUIRED}driver = "lvm"\n', "driver", "expected one of 'ioctl', 'dmsetup'"),
    (f'[dmfs]\n{REQUIRED}log_level = "warn"\n', "log_level",
     "unknown log level 'warn' (did you mean 'warning'?)"),
    (f'[dmfs]\n{REQUIRED}log_level = "trace"\n', "log_level", "unknown log level"),
    # other values
    (f'[dmfs]\n{REQUIRED}fs_options = "-L \'unclosed"\n', "fs_options",
     "cannot be split into mkfs arguments"),
    # filesystem settings that do not go together
    (f'[dmfs]\n{REQUIRED}fs_options = "nodiscard, lazy_itable_init=1"\n', "fs_options",
     "read as mkfs.ext4's -E list, as containerd reads it"),
    (f'[dmfs]\n{REQUIRED}fs_options = "lazy_itable_init=1"\nmkfs_lazy_init = true\n',
     "fs_options", "add lazy_itable_init=1,lazy_journal_init=1 to fs_options instead"),
    (f'[dmfs]\n{REQUIRED}fs_type = "xfs"\nfs_options = "nodiscard"\n', "fs_options",
     "for xfs, fs_options are mkfs.xfs arguments starting with '-'"),
    (f'[dmfs]\n{REQUIRED}fs_type = "xfs"\nmkfs_lazy_init = true\n', "fs_options",
     "mkfs_lazy_init applies to ext4 only"),
    ('[dmfs]\npool_name = "x"\nbase_image_size = "299MiB"\nfs_type = "xfs"\n',
     "base_image_size", "299MiB is less than the smallest xfs filesystem mkfs.xfs makes, 300MiB"),
    (f'[dmfs]\n{REQUIRED}admin_group = "no-such-group-dmfs"\n', "admin_group",
     "no group named 'no-such-group-dmfs'"),
    (f"[dmfs]\n{REQUIRED}admin_group = -3\n", "admin_group", "negative"),
])
def test_bad_files(tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert problem in str(error)
    if key is not None:
        assert f"] {key}: " in str(error)


@pytest.mark.parametrize(("name", "problem"), [
    ("", "is empty"),
    ("a/b", "contains '/'"),
    ("x" * 101, "101 characters long; at most 100"),
    ("control", "reserved"),
    ("..", "reserved"),
    ("my pool", "contains ' '"),
    ("pool\n", "contains '\\n'"),
    ("pööl", "contains 'ö'"),
])
def test_bad_pool_names(tmp_path: Path, name: str, problem: str) -> None:
    assert problem in (dm_name_problem(name) or "")
    # A JSON string is a valid TOML basic string.
    error = load_error(tmp_path, f'[dmfs]\npool_name = {json.dumps(name)}\n'
                       f'base_image_size = "1G"\n')
    assert error.key == "pool_name"
    assert problem in str(error)


@pytest.mark.parametrize("name", ["pool0", "vg-pool-tpool", "a" * 100, "x_y.z:1@2+3=4#5"])
def test_good_pool_names(name: str) -> None:
    assert dm_name_problem(name) is None


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, f'[dmfs]\n{REQUIRED}idle_timeout = 5m\n')
    assert "invalid TOML" in str(error)
    assert "line 4" in str(error)


def test_duplicate_table_is_a_toml_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, f"[dmfs]\n{REQUIRED}[dmfs]\n")
    assert "invalid TOML" in str(error) and "line 4" in str(error)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'[dmfs]\npool_name = "p\xf6ol"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin1.toml")


def test_the_example_shows_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every key of the example changes nothing it claims is a default."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        match = re.match(r"^# (\w+ = .*)$", line)
        if match and not match.group(1).startswith(("admin_group", "mountpoint",
                                                    "grpc_address")):
            line = match.group(1)
        lines.append(line)
    uncommented = load_config(write(tmp_path, "\n".join(lines)))
    commented = load_config(EXAMPLE)
    assert uncommented.state_dir == commented.state_dir
    assert uncommented.runtime_dir == commented.runtime_dir
    uncommented.root_path = uncommented.runtime_path = None
    assert uncommented == commented


@pytest.mark.parametrize(("settings", "argv"), [
    ("", ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
          "/dev/d"]),
    ("mkfs_lazy_init = true",
     ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
      "/dev/d"]),
    # containerd's meaning: the whole -E list
    ('fs_options = "lazy_itable_init=1,packed_meta_blocks=1"',
     ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,packed_meta_blocks=1", "/dev/d"]),
    # dmfs's own: mkfs arguments after its defaults
    ('fs_options = "-O ^has_journal -L \'my base\'"',
     ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
      "-O", "^has_journal", "-L", "my base", "/dev/d"]),
    ('fs_type = "xfs"', ["mkfs.xfs", "-q", "-f", "-K", "/dev/d"]),
    ('fs_type = "xfs"\nfs_options = "-m reflink=0"',
     ["mkfs.xfs", "-q", "-f", "-K", "-m", "reflink=0", "/dev/d"]),
])
def test_mkfs_command_line(tmp_path: Path, settings: str, argv: list[str]) -> None:
    config = load_config(write(tmp_path, f"[dmfs]\n{REQUIRED}{settings}\n"))
    assert mkfs_argv(config.fs_type, "/dev/d", config.fs_options,
                     lazy_init=config.mkfs_lazy_init) == argv


def test_xfs_snapshots_mount_with_nouuid_and_ext4_with_nothing_extra() -> None:
    assert mount_options("xfs") == "nouuid"
    assert mount_options("ext4") == ""
