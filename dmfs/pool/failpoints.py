"""Fault injection for tests: ``DMFS_FAILPOINT`` kills or stops the process, or raises
an error, at a named point.

The engine and its drivers call :func:`failpoint` between the steps of each
operation (kill points) and just before the system calls that can fail (raise
points: ``fs:mount``, ``fs:umount``, ``dm:suspend``, ``journal:fsync``).  Every
name is declared in :data:`FAILPOINTS`; tests that go through failpoints read
that tuple, so a new name is covered as soon as it is declared.

``DMFS_FAILPOINT`` holds comma-separated specs, each one of::

    NAME            kill the process there (SIGKILL: no cleanup, like a crash)
    NAME=kill       the same
    NAME=stop       stop the process there (SIGSTOP), for a test to act on from
                    outside at a known step: kill it (a crash whose moment the
                    test chose, not the code) or let it go on (SIGCONT)
    NAME=ERRNO      raise OSError(ERRNO, "injected fault at NAME"), ERRNO being a
                    name from the errno module: EIO, EBUSY, ENOSPC, ...
    ...*N           (suffix) fire only the first N times, then do nothing

e.g. ``DMFS_FAILPOINT=fs:mount=EIO*1,commit:after-intent``.  The variable is read
once, at import; a spec that names no declared failpoint or no errno stops the
program there with :class:`FailpointSpecError`, rather than testing nothing.
With the variable unset a failpoint costs one comparison.

Each firing logs one warning first (``failpoint NAME: ...``), so a test can tell
from the daemon's log which points fired.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "DMFS_FAILPOINT"

FAILPOINTS = (
    "prepare:after-intent",
    "prepare:after-create-snap",
    "prepare:after-activate",
    "prepare:after-mount",
    "prepare:after-record",
    "commit:after-unmount",
    "commit:after-intent",
    "commit:after-suspend-resume",
    "commit:after-deactivate",
    "commit:after-record",
    "remove:after-unmount",
    "remove:after-record",
    "remove:after-deactivate",
    "remove:after-delete",
    "base:after-intent",
    "base:after-create",
    "base:after-mkfs",
    "thin_ls:reserved",
    "reconcile:after-observe",
    "reconcile:after-delete",
    "reconcile:after-mark-faulty",
    "reconcile:after-roll-back",
    "reconcile:after-resume",
    "reconcile:after-activate",
    "reconcile:after-mount",
    # raise points: just before the real call, so an injected errno looks like its failure
    "fs:mount",
    "fs:umount",
    "dm:suspend",
    "journal:fsync",
)

#: builds the exception a raise point throws, from (errno, message); a call site
#: passes its own when the real call fails with a subclass (e.g. DmError)
ErrorFactory = Callable[[int, str], OSError]

KILL = "kill"
STOP = "stop"


class FailpointSpecError(ValueError):
    """``DMFS_FAILPOINT`` says something that cannot be done."""


@dataclass
class Action:
    """What one armed failpoint does: send the signal ``sends`` to the process
    (SIGKILL or SIGSTOP), or raise ``errno``; ``remaining`` firings left (None: every time)."""

    errno: int | None  # None: send ``sends``
    remaining: int | None = None
    sends: int = signal.SIGKILL

    @property
    def kills(self) -> bool:
        return self.errno is None and self.sends == signal.SIGKILL

    @property
    def stops(self) -> bool:
        return self.errno is None and self.sends == signal.SIGSTOP


def parse(text: str) -> dict[str, Action]:
    """The failpoints a ``DMFS_FAILPOINT`` value arms, by name."""
    armed: dict[str, Action] = {}
    for spec in (part.strip() for part in text.split(",")):
        if not spec:
            continue
        body, star, count_text = spec.partition("*")
        remaining = None
        if star:
            if not count_text.isdigit() or int(count_text) < 1:
                raise FailpointSpecError(
                    f"{ENVIRONMENT_VARIABLE}: {spec!r}: the count after '*' must be a "
                    "whole number of at least 1")
            remaining = int(count_text)
        name, equals, what = (part.strip() for part in body.partition("="))
        if name not in FAILPOINTS:
            raise FailpointSpecError(
                f"{ENVIRONMENT_VARIABLE}: unknown failpoint {name!r}; the declared ones are "
                f"{', '.join(FAILPOINTS)}")
        if name in armed:
            raise FailpointSpecError(f"{ENVIRONMENT_VARIABLE}: failpoint {name!r} is given "
                                     "twice")
        sent = signal.SIGKILL
        if not equals or what == KILL:
            code = None
        elif what == STOP:
            code, sent = None, signal.SIGSTOP
        else:
            code = getattr(errno, what, None) if what.startswith("E") else None
            if not isinstance(code, int):
                raise FailpointSpecError(
                    f"{ENVIRONMENT_VARIABLE}: {spec!r}: {what!r} is neither 'kill', 'stop' "
                    "nor an errno name (EIO, EBUSY, ENOSPC, ...)")
        armed[name] = Action(code, remaining, sent)
    return armed


def _from_environment() -> dict[str, Action] | None:
    text = os.environ.get(ENVIRONMENT_VARIABLE)
    return parse(text) if text else None


_armed = _from_environment()
_count_lock = threading.Lock()


def failpoint(name: str, error: ErrorFactory = OSError) -> None:
    """Kill or stop the process, or raise an injected error, here if ``name`` is armed."""
    if _armed is not None:
        _fire(name, error)


def _fire(name: str, error: ErrorFactory) -> None:
    if name not in FAILPOINTS:
        raise FailpointSpecError(f"failpoint({name!r}) is not declared in FAILPOINTS")
    assert _armed is not None
    action = _armed.get(name)
    if action is None:
        return
    with _count_lock:  # raise points run in worker threads
        if action.remaining is not None:
            if action.remaining == 0:
                return
            action.remaining -= 1
    if action.errno is None:
        log.warning("failpoint %s: %s the process", name,
                    "stopping" if action.stops else "killing")
        os.kill(os.getpid(), action.sends)
        return
    assert action.errno is not None
    log.warning("failpoint %s: raising %s", name, errno.errorcode[action.errno])
    raise error(action.errno, f"injected fault at {name}")
