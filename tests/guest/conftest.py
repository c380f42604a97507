"""Fixtures for guest tests: scratch space on tmpfs and a fresh thin pool per test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.loop_pool import LoopPool, loop_pool


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A private directory on tmpfs (pool files, mountpoints)."""
    path = Path(tempfile.mkdtemp(prefix="dmfs-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def thin_pool(scratch_dir: Path) -> Iterator[LoopPool]:
    """A fresh 512 MiB loop-backed thin pool with error_if_no_space."""
    with loop_pool(scratch_dir) as pool:
        yield pool
