"""Fixtures for guest tests: scratch space on tmpfs, a fresh thin pool, the engine."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dmfs.config import Config
from dmfs.filesystems import DEFAULT_FS_TYPE, FILESYSTEMS
from dmfs.pool.snapshotter import Snapshotter
from tests.support.loop_pool import LoopPool, loop_pool
from tests.support.torture import SEED_VARIABLE, choose_seed
from tests.support.tree import MountedTree, write_config

#: device-mapper drivers the engine suite runs on
DRIVERS = ["dmsetup"] + (["ioctl"] if importlib.util.find_spec("dmfs.pool.dmioctl") else [])
BASE_IMAGE_SIZE = 64 * 2**20


def base_image_size(fs_type: str) -> int:
    """The test pools' base device: small, but not below what mkfs makes (xfs: 300MiB)."""
    return max(BASE_IMAGE_SIZE, FILESYSTEMS[fs_type].min_size)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A private directory on tmpfs (pool files, mountpoints)."""
    path = Path(tempfile.mkdtemp(prefix="dmfs-test-", dir="/dev/shm"))
    path.chmod(0o755)  # tests act as other users under it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def thin_pool(scratch_dir: Path) -> Iterator[LoopPool]:
    """A fresh 512 MiB loop-backed thin pool with error_if_no_space."""
    with loop_pool(scratch_dir) as pool:
        yield pool


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The device-mapper driver under test."""
    return request.param


@pytest.fixture
def fs_type() -> str:
    """The filesystem of the test pool's snapshots; a test runs on others with
    ``@pytest.mark.parametrize("fs_type", [...])``, which overrides this."""
    return DEFAULT_FS_TYPE


@pytest.fixture
def engine_config(thin_pool: LoopPool, scratch_dir: Path, driver: str, fs_type: str) -> Config:
    """Config for an engine on the test pool, state and mounts in scratch."""
    return Config(pool_name=thin_pool.name, base_image_size=base_image_size(fs_type),
                  root_path=scratch_dir / "state", runtime_path=scratch_dir / "run",
                  driver=driver, idle_timeout=3600, fs_type=fs_type)


@pytest.fixture
async def engine(engine_config: Config) -> AsyncIterator[Snapshotter]:
    """A running engine on a fresh pool."""
    async with Snapshotter.open(engine_config) as snapshotter:
        yield snapshotter


@pytest.fixture
def tree_config(thin_pool: LoopPool, scratch_dir: Path, fs_type: str) -> Path:
    """A config file for dmfs on the test pool (default driver)."""
    settings = {} if fs_type == DEFAULT_FS_TYPE else {
        "fs_type": fs_type, "base_image_size": base_image_size(fs_type)}
    return write_config(scratch_dir, thin_pool.name, **settings)


@pytest.fixture
def unmounted_tree(tree_config: Path, scratch_dir: Path) -> Iterator[MountedTree]:
    """A tree not mounted yet; whatever happens, no daemon or mount is left."""
    tree = MountedTree(tree_config, scratch_dir / "mnt", scratch_dir / "run")
    try:
        yield tree
    finally:
        tree.cleanup()


@pytest.fixture
def tree(unmounted_tree: MountedTree) -> MountedTree:
    """dmfs mounted on the test pool with `dmfs mount`, as root."""
    unmounted_tree.mount()
    return unmounted_tree


#: the seeds randomized tests used in this session and what they report, shown at
#: the end of the run
_NOTES: list[str] = []


@pytest.fixture
def torture_seed(request: pytest.FixtureRequest) -> int:
    """The seed of a randomized test: DMFS_TORTURE_SEED, or a fresh one.  It is
    printed with the test's output and in the session's closing summary."""
    seed = choose_seed()
    _NOTES.append(f"{request.node.nodeid}: {SEED_VARIABLE}={seed}")
    print(f"seed {seed} (replay with {SEED_VARIABLE}={seed})")
    return seed


@pytest.fixture
def session_note() -> Callable[[str], None]:
    """Add a line to the session's closing summary (e.g. a torture run's numbers)."""
    return _NOTES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _NOTES:
        terminalreporter.section("seeds of randomized tests")
        for line in _NOTES:
            terminalreporter.write_line(line)


#: the quick tier's guest tests (``contrib/run-tests quick``), by node id under
#: tests/guest/: one or a few of each part of the contract, so that a developer
#: learns in a minute or two whether a change broke something that matters; the
#: full tiers run everything
QUICK = (
    "test_stack_smoke.py",
    "test_engine.py::test_layers_with_every_kind_of_file_change[ioctl]",
    "test_engine.py::test_state_survives_restart[ioctl]",
    "test_tree_contract.py::test_mkdir_under_committed_prepares_a_child_with_its_content",
    "test_tree_contract.py::test_mv_of_an_active_node_commits_it",
    "test_tree_contract.py::test_rmdir_of_a_node_in_use_is_ebusy_and_removes_nothing",
    "test_tree_contract.py::test_labels_are_extended_attributes",
    "test_tree_contract.py::test_control_files",
    "test_tree_lifecycle.py::test_after_kill_9_the_next_mount_recovers",
    "test_crash_safety.py::test_killed_during_commit[ioctl-commit:after-suspend-resume]",
    "test_fuzz_names.py",
    "test_fuzz_grpc.py",
    "test_grpc.py::test_every_method_through_the_socket_as_the_tree_sees_it",
    "test_diff.py::test_diff_equals_the_model_across_three_layers",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under udevd the dmsetup driver's turn of a ``udev_default_driver_only``
    test is left to the guest tier (marked ``no_udev_only``); the tests QUICK
    names are marked ``quick``, and when the quick tier runs, each of its names
    must name a test (a renamed test would leave the tier silently)."""
    found = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (callspec is not None and callspec.params.get("driver") == "dmsetup"
                and item.get_closest_marker("udev_default_driver_only")):
            item.add_marker(pytest.mark.no_udev_only)
        node = item.nodeid.removeprefix("tests/guest/")
        for name in QUICK:
            if node == name or node.startswith(name + "::"):
                item.add_marker(pytest.mark.quick)
                found.add(name)
    if "quick" in (config.getoption("markexpr") or "") and set(QUICK) - found:
        raise pytest.UsageError("the quick tier names tests that do not exist: "
                                + ", ".join(sorted(set(QUICK) - found)))
