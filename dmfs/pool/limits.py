"""What the engine accepts as keys and labels: containerd's limits, as text, and
a name in the tree for every key.

Keys and labels are protobuf strings in containerd's API, so they must be
valid Unicode (a name with undecodable bytes smuggled in as surrogates cannot
be journaled as UTF-8 and is refused here, not where it would crash).

Every snapshot is a node of the tree (DESIGN.md §1), whichever front end made
it, so a new key must have a name there: its percent-encoding (:func:`encode_key`)
at most NAME_MAX bytes, and not ``fs``, which is every node's file link.  The
front ends check the same before they ask (the tree answers ENAMETOOLONG); the
engine's check holds the rule for every client, e.g. a gRPC Prepare of a key
that no directory could show.  containerd's own keys (``<namespace>/<n>/<name>``,
each of those at most 76 characters by its identifier rules, or an unpack's
``extract-<nanos>-<random> sha256:<digest>``) stay far below it.
"""

from __future__ import annotations

from collections.abc import Mapping

from dmfs.pool.errors import InvalidArgument, LabelTooLarge

MAX_LABEL_SIZE = 4096  # containerd: key + value
MAX_KEY_SIZE = 4096
#: a key's name in the tree, in bytes (the kernel's limit for a directory entry)
NAME_MAX = 255
#: keys no snapshot may have: ``fs`` is every node's file link, so a snapshot
#: called ``fs`` could never appear as a child
RESERVED_KEYS = frozenset({"fs"})
#: no limit of its own: what matters for labels is their size together
MAX_TEXT = 2**31
#: characters of a client's text (key, label, filter, field path) that a message
#: or a log line shows
SHOWN_TEXT = 80


def shown(text: str) -> str:
    """``text`` quoted for a message or a log line, cut to SHOWN_TEXT characters:
    grpc lets a client send a 4 MiB key, and the log should not grow by that much."""
    if len(text) <= SHOWN_TEXT:
        return repr(text)
    return f"{text[:SHOWN_TEXT]!r}... ({len(text.encode(errors='replace'))} bytes)"


def check_text(text: object, what: str, limit: int) -> str:
    """``text`` as a non-empty, valid Unicode string without NUL, of at most
    ``limit`` bytes in UTF-8; InvalidArgument otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} must be a non-empty string")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {shown(text)} is not valid UTF-8 text") from None
    if "\0" in text:
        raise InvalidArgument(f"{what} {shown(text)} contains a NUL character")
    if size > limit:
        raise InvalidArgument(f"{what} {shown(text)} is {size} bytes, more than {limit}")
    return text


def encode_key(key: str) -> str:
    """The directory entry name of a snapshot key: ``%`` and ``/`` percent-encoded
    (``%25``, ``%2F``), and a leading ``.`` (``%2E``), which would otherwise hide
    the node or collide with ``.``, ``..`` and ``.dmfs``."""
    name = key.replace("%", "%25").replace("/", "%2F")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


def check_key(key: object, what: str = "snapshot key") -> str:
    """A key a new snapshot may have: valid text with a name in the tree."""
    text = check_text(key, what, MAX_KEY_SIZE)
    if text in RESERVED_KEYS:
        raise InvalidArgument(f"{what} {shown(text)} is reserved: every node in the tree has "
                              "an entry of that name")
    size = len(encode_key(text).encode())
    if size > NAME_MAX:
        raise InvalidArgument(f"{what} {shown(text)} would have a name of {size} bytes in "
                              f"the tree, more than {NAME_MAX}")
    return text


def check_labels(labels: Mapping[str, str | None]) -> None:
    """Label names and values (None: a label to delete) containerd would take."""
    for name, value in labels.items():
        # Text first (any length), then containerd's limit on key and value together.
        check_text(name, "label name", MAX_TEXT)
        if value:
            check_text(value, f"the value of label {shown(name)}", MAX_TEXT)
        size = len(name.encode()) + len((value or "").encode())
        if size > MAX_LABEL_SIZE:
            raise LabelTooLarge(f"label {shown(name)} is {size} bytes with its value, more "
                                f"than {MAX_LABEL_SIZE}")
