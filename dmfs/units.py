"""Sizes and durations as people write them: ``10GiB``, ``512MB``, ``5m``, ``1h30m``.

Sizes follow containerd's devmapper snapshotter, which reads its sizes with
go-units' ``RAMInBytes``: every unit is a power of 1024 whether or not it has
an ``i``, so ``base_image_size = "10GB"`` is 10 GiB (10 737 418 240 bytes) in
containerd and therefore here too.  ``k``, ``M``, ``G``, ``T`` and ``P`` may be
written as ``k``/``kB``/``KiB``/``kib`` and so on (case does not matter, the
``i`` and the ``B`` are optional); a number without a unit, or with ``B``
alone, counts bytes.  Fractions (``1.5GiB``) are allowed when they come out as
a whole number of bytes.

Durations are a number of seconds, or a Go-style duration made of
number-and-unit parts with the units ``ms``, ``s``, ``m`` and ``h``:
``30s``, ``5m``, ``1h30m``, ``1.5s``, ``250ms``.
"""

from __future__ import annotations

import re

#: The unit of device-mapper table lengths and of block device sizes in sysfs: 512
#: bytes, whatever a device's logical block size (the pool layer reads it from
#: :mod:`dmfs.pool.dm`; it is defined here because the config checks sizes by it).
SECTOR_SIZE = 512
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
SIZE_EXAMPLES = "e.g. 10GiB, 512MiB, 64KiB or a number of bytes"
DURATION_EXAMPLES = "e.g. 30s, 5m, 1h30m or a number of seconds"


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``10GiB``, ``8192MB``, ``512k`` or ``4096``.

    Every unit is binary (1024-based), as in containerd's configuration.
    Raises ValueError with a message that says what is wrong.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative")
        return text
    from fractions import Fraction  # (with decimal: ~10 ms of a command's start in the guest)

    match = _SIZE_RE.match(text)
    if match is None or (match.group(3) and not match.group(2)):
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    number, prefix = Fraction(match.group(1)), match.group(2).lower()
    size = number * SIZE_UNITS[prefix]
    if size.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The shortest exact binary spelling of a size: ``10GiB``, ``1536KiB``, ``100B``."""
    for suffix, factor in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3),
                           ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return f"{size}B"


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h30m``, ``250ms`` or ``300``.

    A bare number (or a string of one) counts seconds.  Raises ValueError.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration ({DURATION_EXAMPLES})")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value} is negative")
        if value != value or value == float("inf"):
            raise ValueError(f"{value} is not a finite number of seconds")
        return float(value)
    text = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    from fractions import Fraction

    position, total_ms = 0, Fraction(0)
    for part in _DURATION_PART_RE.finditer(text):
        if part.start() != position:
            break
        total_ms += Fraction(part.group(1)) * _DURATION_UNIT_MS[part.group(2)]
        position = part.end()
    if not text or position != len(text):
        raise ValueError(f"{value!r} is not a duration ({DURATION_EXAMPLES})")
    return float(total_ms / 1000)
