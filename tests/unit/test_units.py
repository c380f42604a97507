from __future__ import annotations

import pytest

from dmfs.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096),
    (4096, 4096),
    ("512B", 512),
    ("64k", 64 * 1024),
    ("64KiB", 64 * 1024),
    ("512KiB", 512 * 1024),
    ("128MB", 128 * 1024**2),
    ("128mb", 128 * 1024**2),
    ("8192MB", 8 * 1024**3),
    # containerd reads base_image_size with go-units' RAMInBytes: "GB" is 1024-based.
    ("10GB", 10 * 1024**3),
    ("10GiB", 10 * 1024**3),
    ("10G", 10 * 1024**3),
    ("10 GiB", 10 * 1024**3),
    ("1.5GiB", 3 * 1024**3 // 2),
    ("2TB", 2 * 1024**4),
    ("1P", 1024**5),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "GB", "10XB", "10 G B", "-5G", "1.5", "0.3k", "10iB", "ten", "10GiBs", "1e9", "1,5G",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole number"):
        parse_size(text)


def test_parse_size_rejects_negative_integers_and_booleans() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)


@pytest.mark.parametrize(("size", "text"), [
    (10 * 1024**3, "10GiB"), (1536 * 1024, "1536KiB"), (100, "100B"), (0, "0B"),
    (64 * 1024, "64KiB"), (3 * 1024**4, "3TiB"),
])
def test_format_size_round_trips(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(("value", "seconds"), [
    (300, 300.0), (2.5, 2.5), ("300", 300.0), ("30s", 30.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), ("1m30s", 90.0), ("0", 0.0),
    (" 5m ", 300.0),
])
def test_parse_duration(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    "", "m", "5 minutes", "5x", "-5s", "1h 30m", "5m3", "s5", "1d", "5M",
])
def test_parse_duration_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, float("inf"), float("nan"), True])
def test_parse_duration_rejects_bad_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
