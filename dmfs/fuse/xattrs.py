"""A node's extended attributes: labels (``user.label.<key>``, read-write: that
is containerd's Update) and read-only information (``user.dmfs.<field>``).

Attribute names and values reach the daemon as bytes; labels are text, so a
name or value that is not valid UTF-8 is refused (EINVAL), as is a label too
big for containerd (E2BIG, from the engine).  setxattr's flags are pyfuse3's:
it asks getxattr first, so XATTR_CREATE of an existing label is EEXIST and
XATTR_REPLACE of a missing one ENODATA.
"""

from __future__ import annotations

import errno

import pyfuse3

from dmfs.fuse.names import display
from dmfs.pool import Info, Snapshotter

LABEL_PREFIX = "user.label."
INFO_PREFIX = "user.dmfs."
INFO_ATTRIBUTES = ("kind", "parent", "id", "state", "usage", "created", "updated")


class Refused(Exception):
    """A label change the view refuses: the errno and the reason."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def names_of(node: Info) -> list[bytes]:
    """Every attribute a node has (listxattr)."""
    return ([f"{INFO_PREFIX}{field}".encode() for field in INFO_ATTRIBUTES]
            + [f"{LABEL_PREFIX}{label}".encode() for label in sorted(node.labels)])


async def value_of(engine: Snapshotter, node: Info, raw_name: bytes) -> bytes:
    """One attribute's value (getxattr); ENODATA for any other name."""
    try:
        name = raw_name.decode()
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.ENODATA) from None
    if name.startswith(LABEL_PREFIX):
        value = node.labels.get(name[len(LABEL_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value.encode()
    field = name[len(INFO_PREFIX):] if name.startswith(INFO_PREFIX) else None
    if field not in INFO_ATTRIBUTES:
        raise pyfuse3.FUSEError(errno.ENODATA)
    if field == "usage":
        return str((await engine.usage(node.key)).size).encode()
    value = {"kind": node.kind.value, "parent": node.parent or "", "id": node.device_id,
             "state": node.state.value, "created": node.created, "updated": node.updated}[field]
    return str(value).encode()


def label_change(node: Info, raw_name: bytes, raw_value: bytes | None
                 ) -> tuple[str, str | None]:
    """The label and new value (None: remove it) a setxattr / removexattr asks
    for; :class:`Refused` when it cannot be done."""
    try:
        name = raw_name.decode()
    except UnicodeDecodeError:
        raise Refused(errno.EINVAL, "attribute names must be UTF-8 text") from None
    if name.startswith(INFO_PREFIX):
        raise Refused(errno.EPERM, "user.dmfs.* attributes are read-only")
    if not name.startswith(LABEL_PREFIX) or len(name) == len(LABEL_PREFIX):
        raise Refused(errno.ENOTSUP, f"labels are {LABEL_PREFIX}<key>; nothing else can be set")
    label = name[len(LABEL_PREFIX):]
    if raw_value is None:
        if label not in node.labels:
            raise Refused(errno.ENODATA, f"there is no label {label!r}")
        return label, None
    try:
        return label, raw_value.decode()
    except UnicodeDecodeError:
        raise Refused(errno.EINVAL, f"label values must be UTF-8 text, not "
                      f"{display(raw_value[:40])!r}") from None
