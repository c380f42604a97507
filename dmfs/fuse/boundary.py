"""The view's error boundary: engine errors as errnos, refusals logged, and a
last resort that keeps the daemon serving.

pyfuse3 ends ``pyfuse3.main()`` on any exception from a handler that is not a
``FUSEError``, which takes every user's view down ("Transport endpoint is not
connected").  So every handler is wrapped in :func:`failsafe`: an engine error
the handler did not expect becomes its errno, anything else is logged once
with its traceback and answered EIO, and the daemon goes on.  Only
cancellation (a signal, ``umount``) passes.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, ParamSpec, TypeVar

import pyfuse3

from dmfs.pool import (
    AlreadyExists,
    FailedPrecondition,
    HasChildren,
    InUse,
    InvalidArgument,
    LabelTooLarge,
    NoSpace,
    NotFound,
    SnapshotError,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: The engine's errors and the errno each means in the tree (most specific first).
ERRNOS: list[tuple[type[SnapshotError], int]] = [
    (AlreadyExists, errno.EEXIST), (NotFound, errno.ENOENT), (HasChildren, errno.ENOTEMPTY),
    (InUse, errno.EBUSY), (NoSpace, errno.ENOSPC), (LabelTooLarge, errno.E2BIG),
    (InvalidArgument, errno.EINVAL), (FailedPrecondition, errno.EPERM),
    (SnapshotError, errno.EIO),
]


def errno_of(error: SnapshotError) -> int:
    return next(code for kind, code in ERRNOS if isinstance(error, kind))


def refuse(code: int, operation: str, path: str, why: str) -> NoReturn:
    """Answer ``code`` and log one line saying why."""
    log.warning("%s %s refused (%s): %s", operation, path, errno.errorcode[code], why)
    raise pyfuse3.FUSEError(code)


def failsafe(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """The last resort around a FUSE handler (see the module doc)."""
    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SnapshotError as error:
            refuse(errno_of(error), handler.__name__, "(request)", str(error))
        except Exception:
            log.exception("unexpected error in the %s handler; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return guarded
