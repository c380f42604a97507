"""Parse the status lines of the ``thin-pool`` and ``thin`` targets.

Formats from the kernel's Documentation/admin-guide/device-mapper/thin-provisioning.rst:

pool: ``<transaction id> <used meta>/<total meta> <used data>/<total data>
<held metadata root> ro|rw|out_of_data_space [no_]discard_passdown
error|queue_if_no_space needs_check|- [metadata_low_watermark]``, or ``Fail``.

thin: ``<nr mapped sectors> <highest mapped sector>``, or ``Fail``
(the highest sector is ``-`` while nothing is mapped).
"""

from __future__ import annotations

from dataclasses import dataclass


class StatusParseError(ValueError):
    """A status line that does not have the documented format."""


@dataclass(frozen=True)
class PoolStatus:
    """The state of a thin pool, as reported by its status line."""

    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None
    mode: str  # "rw", "ro" or "out_of_data_space"
    discard_passdown: bool
    error_if_no_space: bool
    needs_check: bool
    metadata_low_watermark: int | None
    failed: bool = False

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks


FAILED_POOL = PoolStatus(0, 0, 0, 0, 0, None, "fail", False, False, True, None, failed=True)


def _fraction(text: str, what: str) -> tuple[int, int]:
    used, sep, total = text.partition("/")
    if not sep:
        raise StatusParseError(f"{what}: expected used/total, got {text!r}")
    try:
        return int(used), int(total)
    except ValueError:
        raise StatusParseError(f"{what}: expected used/total, got {text!r}") from None


def parse_pool_status(params: str) -> PoolStatus:
    """Parse the parameters of a thin-pool status line (after the target type)."""
    fields = params.split()
    if fields == ["Fail"]:
        return FAILED_POOL
    if len(fields) < 8:
        raise StatusParseError(f"thin-pool status has {len(fields)} fields: {params!r}")
    try:
        transaction_id = int(fields[0])
    except ValueError:
        raise StatusParseError(f"thin-pool transaction id {fields[0]!r}") from None
    used_meta, total_meta = _fraction(fields[1], "metadata blocks")
    used_data, total_data = _fraction(fields[2], "data blocks")
    held_root = None if fields[3] == "-" else int(fields[3])
    mode = fields[4]
    if mode not in ("rw", "ro", "out_of_data_space"):
        raise StatusParseError(f"thin-pool mode {mode!r}")
    low_watermark = int(fields[8]) if len(fields) > 8 else None
    return PoolStatus(
        transaction_id=transaction_id,
        used_metadata_blocks=used_meta,
        total_metadata_blocks=total_meta,
        used_data_blocks=used_data,
        total_data_blocks=total_data,
        held_metadata_root=held_root,
        mode=mode,
        discard_passdown=fields[5] == "discard_passdown",
        error_if_no_space=fields[6] == "error_if_no_space",
        needs_check=fields[7] == "needs_check",
        metadata_low_watermark=low_watermark,
    )


@dataclass(frozen=True)
class ThinStatus:
    """The state of one thin device, as reported by its status line."""

    mapped_sectors: int
    highest_mapped_sector: int | None
    failed: bool = False


def parse_thin_status(params: str) -> ThinStatus:
    """Parse the parameters of a thin status line (after the target type)."""
    fields = params.split()
    if fields == ["Fail"]:
        return ThinStatus(0, None, failed=True)
    if len(fields) != 2:
        raise StatusParseError(f"thin status has {len(fields)} fields: {params!r}")
    try:
        mapped = int(fields[0])
        highest = None if fields[1] == "-" else int(fields[1])
    except ValueError:
        raise StatusParseError(f"thin status {params!r}") from None
    return ThinStatus(mapped, highest)
