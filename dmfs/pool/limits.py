"""What the engine accepts as keys and labels: containerd's limits, as text.

Keys and labels are protobuf strings in containerd's API, so they must be
valid Unicode (a name with undecodable bytes smuggled in as surrogates cannot
be journaled as UTF-8 and is refused here, not where it would crash).
"""

from __future__ import annotations

from collections.abc import Mapping

from dmfs.pool.errors import InvalidArgument, LabelTooLarge

MAX_LABEL_SIZE = 4096  # containerd: key + value
MAX_KEY_SIZE = 4096
#: no limit of its own: what matters for labels is their size together
MAX_TEXT = 2**31


def check_text(text: object, what: str, limit: int) -> str:
    """``text`` as a non-empty, valid Unicode string without NUL, of at most
    ``limit`` bytes in UTF-8; InvalidArgument otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} must be a non-empty string")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {text!r} is not valid UTF-8 text") from None
    if "\0" in text:
        raise InvalidArgument(f"{what} {text[:40]!r} contains a NUL character")
    if size > limit:
        raise InvalidArgument(f"{what} {text[:40]!r}... is {size} bytes, more than {limit}")
    return text


def check_key(key: object, what: str = "snapshot key") -> str:
    return check_text(key, what, MAX_KEY_SIZE)


def check_labels(labels: Mapping[str, str | None]) -> None:
    """Label names and values (None: a label to delete) containerd would take."""
    for name, value in labels.items():
        # Text first (any length), then containerd's limit on key and value together.
        check_text(name, "label name", MAX_TEXT)
        if value:
            check_text(value, f"the value of label {name!r}", MAX_TEXT)
        size = len(name.encode()) + len((value or "").encode())
        if size > MAX_LABEL_SIZE:
            raise LabelTooLarge(f"label {name!r} is {size} bytes with its value, more than "
                                f"{MAX_LABEL_SIZE}")
