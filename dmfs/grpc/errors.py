"""The service's error boundary: engine errors as the gRPC status codes that
containerd's ``errdefs.FromGRPC`` turns back into its own errors, one log line
per refused request, and a last resort for everything else.

containerd decides by code: its unpacker treats NotFound from Stat as "not
unpacked yet" and AlreadyExists from Prepare or Commit as "someone else did
it", and its garbage collector goes on after FailedPrecondition.  The message
is the sentence the tree logs for the same refusal (the engine's), so that
``ctr`` prints why.  An exception the engine does not raise on purpose is a bug:
logged once with its traceback and answered INTERNAL, and the daemon goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from dmfs.pool import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotFound,
    PoolError,
    SnapshotError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The engine's errors and the code each is answered with (most specific first).
#: containerd's errdefs knows InvalidArgument, NotFound, AlreadyExists,
#: FailedPrecondition, Unavailable, Unimplemented, Canceled and DeadlineExceeded;
#: RESOURCE_EXHAUSTED (a full pool) reaches it as ErrUnknown with the message, which
#: is what its devmapper snapshotter gives for a full pool too.
STATUS_CODES: list[tuple[type[SnapshotError], grpc.StatusCode]] = [
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),  # LabelTooLarge is one
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),  # HasChildren, InUse
    (NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PoolError, grpc.StatusCode.UNAVAILABLE),  # the pool failed or is gone, the journal fails
    (SnapshotError, grpc.StatusCode.UNKNOWN),
]


def status_code_of(error: SnapshotError) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_CODES if isinstance(error, kind))


class Refusal(Exception):
    """A request answered with a status other than OK (and logged)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: characters of a refusal's message at most: it travels back in the status trailer,
#: which grpc clients cap (8 KiB by default in grpc's C core)
MAX_MESSAGE = 1024


def cut(message: str) -> str:
    """A refusal's message of at most about MAX_MESSAGE characters (the engine's
    sentences quote what the client sent, which may be megabytes)."""
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}... (cut: {len(message)} characters)"


def refuse(code: grpc.StatusCode, method: str, subject: str, why: str) -> Refusal:
    """Log one line saying why, and the Refusal to raise."""
    why = cut(why)
    log.warning("grpc %s %s refused (%s): %s", method, subject, code.name, why)
    return Refusal(code, why)


def answered(method: str, subject: Callable[[Any], str]
             ) -> Callable[[Callable[[Any, Any], Awaitable[T]]],
                           Callable[[Any, Any], Awaitable[T]]]:
    """The boundary around one handler (``handler(self, request)``): an engine error
    becomes its status code, anything else INTERNAL after its traceback is
    logged; ``subject`` names what the request is about in the log line."""
    def decorate(handler: Callable[[Any, Any], Awaitable[T]]
                 ) -> Callable[[Any, Any], Awaitable[T]]:
        @functools.wraps(handler)
        async def guarded(self: Any, request: Any) -> T:
            try:
                return await handler(self, request)
            except Refusal:
                raise
            except SnapshotError as error:
                raise refuse(status_code_of(error), method, subject(request),
                             str(error)) from None
            except Exception as error:
                log.exception("unexpected error in the grpc %s handler; answering INTERNAL",
                              method)
                raise Refusal(grpc.StatusCode.INTERNAL,
                              cut(f"internal error in dmfs ({type(error).__name__}: {error}); "
                                  "the daemon's log has the details")) from None
        return guarded
    return decorate
