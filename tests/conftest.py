"""Test tiers: unit tests run anywhere; tests under tests/guest need dm-thin.

Guest tests are skipped where the kernel has no device-mapper thin provisioning
(this is the normal case on a development host), with a reason that names the
command that runs them in the test guest.  With DMFS_REQUIRE_GUEST=1 (set by
contrib/run-tests inside the guest) a missing dm-thin fails them instead, so a
broken guest can never pass as "all skipped".
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).parent / "guest"
RUN_IN_GUEST = "contrib/run-tests --guest"


@functools.cache
def dm_thin_missing() -> str | None:
    """Why this kernel cannot run guest tests, or None when it can."""
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/dev/mapper/control").exists():
        return "the kernel has no device-mapper (/dev/mapper/control)"
    try:
        targets = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return f"dmsetup targets failed: {error}"
    if "thin-pool" not in targets.split():
        return "the dm-thin target is not loaded (modprobe dm_thin_pool)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if GUEST_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.guest)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("guest") is None:
        return
    missing = dm_thin_missing()
    if missing is None:
        return
    if os.environ.get("DMFS_REQUIRE_GUEST") == "1":
        pytest.fail(f"guest test cannot run: {missing}", pytrace=False)
    pytest.skip(f"{missing}; run the guest tier with `{RUN_IN_GUEST}`")
