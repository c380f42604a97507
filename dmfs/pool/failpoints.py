"""Crash points for tests: ``DMFS_FAILPOINT=<name>`` kills the process there.

The engine calls :func:`failpoint` between the steps of each operation; the
crash-safety tests run every name in :data:`FAILPOINTS` and check what a
restart makes of the pieces.  With the variable unset this costs one
comparison.
"""

from __future__ import annotations

import os
import signal

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
)

_armed = os.environ.get("DMFS_FAILPOINT")


def failpoint(name: str) -> None:
    """Die here, at once and without cleanup, when this failpoint is armed."""
    if _armed is not None and _armed == name:
        assert name in FAILPOINTS, f"undeclared failpoint {name}"
        os.kill(os.getpid(), signal.SIGKILL)
