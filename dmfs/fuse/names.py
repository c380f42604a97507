"""Snapshot keys as directory entry names, and back.

containerd keys may contain ``/``; in the tree ``%`` and ``/`` are
percent-encoded (``%25``, ``%2F``), and so is a leading ``.`` (``%2E``), which
would otherwise hide the node or collide with ``.``, ``..`` and ``.dmfs``.  The
encoding is the engine's (:func:`dmfs.pool.encode_key`: the engine gives no
snapshot a key without a name in the tree).  Decoding is strict: a name is
valid only if encoding its key gives it back, so every key has exactly one
name.  Names reach the daemon as bytes; keys are text (containerd's keys are
protobuf strings), so a name that is not valid UTF-8 names no snapshot: a
lookup finds nothing, a mkdir or rename to it is refused with EINVAL.
"""

from __future__ import annotations

from dmfs.pool import NAME_MAX, RESERVED_KEYS, encode_key, shown

__all__ = ["NAME_MAX", "BadName", "NameTooLong", "check_new_key", "decode_entry",
           "decode_name", "display", "encode_key"]

_ESCAPES = {"25": "%", "2F": "/", "2E": "."}


class BadName(ValueError):
    """A directory entry name that no snapshot key encodes to."""


class NameTooLong(BadName):
    """A name longer than NAME_MAX bytes."""


def display(raw: bytes) -> str:
    """A name from the kernel as text for a log line, whatever its bytes."""
    return raw.decode(errors="backslashreplace")


def decode_entry(raw: bytes) -> str:
    """The snapshot key a directory entry (as the kernel passes it) stands for."""
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise BadName(f"{display(raw)!r} is not valid UTF-8") from None
    return decode_name(name)


def decode_name(name: str) -> str:
    """The snapshot key a directory entry name stands for; BadName when none."""
    if not name or name.startswith("."):
        raise BadName(f"{name!r}: names starting with '.' are reserved")
    parts, i = [], 0
    while i < len(name):
        if name[i] == "%":
            code = name[i + 1:i + 3].upper()
            if code not in _ESCAPES:
                raise BadName(f"{name!r}: '%' must start %25, %2F or %2E")
            parts.append(_ESCAPES[code])
            i += 3
        else:
            parts.append(name[i])
            i += 1
    key = "".join(parts)
    if encode_key(key) != name:
        raise BadName(f"{name!r} is not a valid encoded key (write % as %25 and / as %2F)")
    return key


def check_new_key(key: str) -> None:
    """Refuse keys a user may not create through the tree."""
    if key in RESERVED_KEYS:
        raise BadName(f"{shown(key)} is reserved (every node has an entry of that name)")
    if len(encode_key(key).encode()) > NAME_MAX:
        raise NameTooLong(f"the name of {shown(key)} is longer than {NAME_MAX} bytes")
