from __future__ import annotations

import pytest

from dmfs.pool.status import StatusParseError, parse_pool_status, parse_thin_status


def test_pool_status_with_low_watermark() -> None:
    status = parse_pool_status(
        "5 17/4096 300/8192 - rw no_discard_passdown error_if_no_space - 1024")
    assert status.transaction_id == 5
    assert (status.used_metadata_blocks, status.total_metadata_blocks) == (17, 4096)
    assert (status.used_data_blocks, status.total_data_blocks) == (300, 8192)
    assert status.free_data_blocks == 7892
    assert status.held_metadata_root is None
    assert status.mode == "rw"
    assert not status.discard_passdown
    assert status.error_if_no_space
    assert not status.needs_check
    assert status.metadata_low_watermark == 1024
    assert not status.failed


def test_pool_status_out_of_space_needs_check_held_root() -> None:
    status = parse_pool_status(
        "9 20/4096 8192/8192 123 out_of_data_space discard_passdown queue_if_no_space needs_check")
    assert status.mode == "out_of_data_space"
    assert status.held_metadata_root == 123
    assert status.discard_passdown
    assert not status.error_if_no_space
    assert status.needs_check
    assert status.metadata_low_watermark is None


def test_pool_status_fail() -> None:
    assert parse_pool_status("Fail").failed


@pytest.mark.parametrize("line", [
    "",
    "5 17/4096 300/8192 - rw",
    "x 17/4096 300/8192 - rw no_discard_passdown error_if_no_space -",
    "5 17-4096 300/8192 - rw no_discard_passdown error_if_no_space -",
    "5 17/4096 300/8192 - weird no_discard_passdown error_if_no_space -",
])
def test_pool_status_malformed(line: str) -> None:
    with pytest.raises(StatusParseError):
        parse_pool_status(line)


def test_thin_status() -> None:
    assert parse_thin_status("2048 4095").mapped_sectors == 2048
    assert parse_thin_status("2048 4095").highest_mapped_sector == 4095
    assert parse_thin_status("0 -").highest_mapped_sector is None
    assert parse_thin_status("Fail").failed
    with pytest.raises(StatusParseError):
        parse_thin_status("12")
