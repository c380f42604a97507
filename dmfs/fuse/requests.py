"""Counting the FUSE requests that reach the daemon, per request handler.

Round trips are what the tree costs: each one is a context switch to this
Python process and back (about 0.1 ms on the host, several times that in
the test guest).  The counts, shown in ``M/.dmfs/pool``, tell which requests
a workload really makes: they found the per-entry xattr requests of ``ls -l``
and prove that the kernel caches ``fs`` links (N path walks, one READLINK).
A count costs one dict update per request.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

#: every request handler pyfuse3 may call (its Operations' coroutine methods)
HANDLERS = frozenset(name for name, member in vars(pyfuse3.Operations).items()
                     if inspect.iscoroutinefunction(member))

OperationsClass = TypeVar("OperationsClass", bound=type[pyfuse3.Operations])


def counted(cls: OperationsClass) -> OperationsClass:
    """Class decorator: every request handler counts its calls in the
    instance's ``requests`` Counter (which ``__init__`` must create)."""
    for name in HANDLERS:
        setattr(cls, name, _counting(name, getattr(cls, name)))
    return cls


def _counting(name: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def count_and_handle(self: Any, *args: Any) -> Any:
        self.requests[name] += 1
        return await handler(self, *args)

    return count_and_handle


def summary(requests: Counter[str]) -> str:
    """``getattr=12 lookup=3 ...``, by name (for .dmfs/pool)."""
    return " ".join(f"{name}={count}" for name, count in sorted(requests.items())) or "none"
