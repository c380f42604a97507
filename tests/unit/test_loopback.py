"""The parts of pool administration that need no kernel: geometry, tables, files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from dmfs.pool.errors import PoolAdminError, PoolSpecError
from dmfs.pool.geometry import (
    MAX_METADATA_SIZE,
    LowWater,
    default_metadata_size,
    plan_loop_pool,
)
from dmfs.pool.loopback import prepare_backing_file
from dmfs.pool.thinpool import PoolTable

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(("text", "expected"), [
    ("10%", LowWater(percent=Fraction(10))),
    ("2.5%", LowWater(percent=Fraction(5, 2))),
    ("0%", LowWater(percent=Fraction(0))),
    ("512MiB", LowWater(size=512 * MiB)),
    ("0", LowWater(size=0)),
])
def test_low_water_parses(text: str, expected: LowWater) -> None:
    assert LowWater.parse(text) == expected


@pytest.mark.parametrize("text", ["100%", "150%", "-1%", "x%", "%", "ten", "5 blocks"])
def test_low_water_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        LowWater.parse(text)


def test_low_water_in_blocks() -> None:
    assert LowWater.parse("10%").blocks(4096, 64 * KiB) == 409
    assert LowWater.parse("2.5%").blocks(1000, 64 * KiB) == 25
    assert LowWater.parse("1MiB").blocks(4096, 64 * KiB) == 16
    assert LowWater.parse("100KiB").blocks(4096, 64 * KiB) == 1
    assert str(LowWater.parse("2.5%")) == "2.5%"
    assert str(LowWater.parse("1024MiB")) == "1GiB"


def test_pool_table_round_trip() -> None:
    params = "7:1 7:0 128 409 1 error_if_no_space"
    table = PoolTable.parse(params)
    assert table == PoolTable("7:1", "7:0", 128, 409, ("error_if_no_space",))
    assert table.params() == params
    assert PoolTable.parse("253:1 253:2 2048 0").features == ()
    assert PoolTable("a", "b", 128, 0).params() == "a b 128 0"
    # The kernel prints a trailing space after the features.
    assert PoolTable.parse(params + " ").params() == params


@pytest.mark.parametrize("params", ["", "7:1 7:0", "7:1 7:0 x 0", "7:1 7:0 128 0 two x"])
def test_pool_table_rejects(params: str) -> None:
    with pytest.raises(ValueError, match="not a thin-pool table"):
        PoolTable.parse(params)


def test_default_metadata_size() -> None:
    assert default_metadata_size(512 * MiB, 64 * KiB) == 16 * MiB  # the floor
    assert default_metadata_size(100 * GiB, 64 * KiB) == 150 * MiB  # 96 bytes per block
    assert default_metadata_size(100 * GiB, 1 * MiB) == 16 * MiB
    assert default_metadata_size(1024 * 1024 * GiB, 64 * KiB) == MAX_METADATA_SIZE


def test_plan_loop_pool(tmp_path: Path) -> None:
    spec = plan_loop_pool("pool0", tmp_path, GiB)
    assert spec.data_file == tmp_path / "pool0.data"
    assert spec.metadata_file == tmp_path / "pool0.metadata"
    assert (spec.block_size, spec.total_blocks, spec.low_water_blocks) == (64 * KiB, 16384, 1638)
    assert spec.metadata_size == 16 * MiB
    table = spec.table("7:1", "7:0")
    assert table.params() == "7:1 7:0 128 1638 1 error_if_no_space"
    custom = plan_loop_pool("p", tmp_path, GiB, metadata_size=4 * MiB, block_size=MiB,
                            low_water=LowWater.parse("100MiB"))
    assert (custom.metadata_size, custom.total_blocks, custom.low_water_blocks) == (
        4 * MiB, 1024, 100)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"size": GiB, "block_size": 32 * KiB}, "must be a multiple of 64KiB between"),
    ({"size": GiB, "block_size": 96 * KiB}, "must be a multiple of 64KiB"),
    ({"size": 4 * GiB, "block_size": 2 * GiB}, "must be a multiple of 64KiB"),
    ({"size": 512 * KiB}, "too small: a pool needs at least 16 blocks of 64KiB"),
    ({"size": GiB + 512}, "is not a whole number of 64KiB blocks"),
    ({"size": GiB, "metadata_size": MiB}, "metadata size 1MiB must be"),
    ({"size": GiB, "metadata_size": 17 * GiB}, "metadata size 17GiB must be"),
    ({"size": GiB, "metadata_size": 4 * MiB + 512}, "multiple of 4KiB"),
    ({"size": GiB, "low_water": LowWater(size=GiB)}, "low-water mark 1GiB is not below"),
])
def test_impossible_pools(tmp_path: Path, kwargs: dict, problem: str) -> None:
    with pytest.raises(PoolSpecError, match=problem):
        plan_loop_pool("p", tmp_path, **kwargs)


def test_prepare_file_creates_keeps_and_protects(tmp_path: Path) -> None:
    path = tmp_path / "p.data"
    assert prepare_backing_file(path, MiB) is True
    assert path.stat().st_size == MiB
    assert path.stat().st_blocks == 0, "the file must be sparse"
    assert path.stat().st_mode & 0o777 == 0o600
    assert prepare_backing_file(path, MiB) is False  # same size: kept as it is
    assert prepare_backing_file(path, 2 * MiB) is False  # empty: resized
    assert path.stat().st_size == 2 * MiB
    with path.open("r+b") as f:
        f.write(b"data")
    with pytest.raises(PoolAdminError, match=r"exists with 2MiB and holds data, but this pool "
                                             r"needs 1MiB"):
        prepare_backing_file(path, MiB)
    assert path.stat().st_size == 2 * MiB
    with pytest.raises(PoolAdminError, match="not a regular file"):
        prepare_backing_file(tmp_path, MiB)
