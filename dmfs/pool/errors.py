"""Errors of the snapshot engine, named after containerd's errdefs.

Callers (the FUSE view, the CLI) decide by type, never by message; the message
is a sentence for the log that says why.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class SnapshotError(Exception):
    """Base of every error the engine raises on purpose."""


class AlreadyExists(SnapshotError):
    """A snapshot with that key exists (any kind)."""


class NotFound(SnapshotError):
    """No snapshot with that key."""


class InvalidArgument(SnapshotError):
    """A bad key, a parent that is not committed, a reserved label, ..."""


class FailedPrecondition(SnapshotError):
    """The snapshot is not in a state that allows the operation."""


class HasChildren(FailedPrecondition):
    """The snapshot is the parent of other snapshots."""


class InUse(FailedPrecondition):
    """Files under the snapshot are in use (its filesystem is busy)."""


class NoSpace(SnapshotError):
    """The pool has no data or metadata space, or no free device id."""


class PoolError(SnapshotError):
    """The pool is missing, not a thin pool, failed, or needs a check."""


class JournalCorrupt(SnapshotError):
    """A record in the middle of the journal is damaged; start refused."""


class LabelTooLarge(InvalidArgument):
    """A label's key and value together exceed containerd's limit."""


#: errno of a failed kernel or disk operation -> the engine's error for it
_ERRNO_TYPES: dict[int, type[SnapshotError]] = {
    errno.EBUSY: InUse,
    errno.ENOSPC: NoSpace,
    errno.EDQUOT: NoSpace,
}


def as_snapshot_error(error: OSError, doing: str) -> SnapshotError:
    """The engine's error for a failed kernel or disk operation (a DmError, a
    mount, the journal); ``doing`` names the operation and the device."""
    kind = _ERRNO_TYPES.get(error.errno or 0, PoolError)
    return kind(f"{doing}: {error}")


# ---- creating and destroying pools (dmfs.pool.loopback) -----------------------------


class PoolSpecError(ValueError):
    """The requested pool geometry is impossible (a usage error)."""


class PoolAdminError(Exception):
    """Creating or destroying a pool failed; the message says why and what to do."""


def translated(operation: str) -> Callable[[Callable[P, Awaitable[T]]],
                                            Callable[P, Awaitable[T]]]:
    """Let an engine method raise only typed errors: a failed kernel or disk call
    that no step translated becomes InUse / NoSpace / PoolError naming the
    operation and its first argument (the snapshot)."""
    def decorate(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(method)
        async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await method(*args, **kwargs)
            except OSError as error:  # DmError is one
                doing = f"{operation} {args[1]!r}" if len(args) > 1 else operation
                raise as_snapshot_error(error, doing) from error
        return translated
    return decorate
