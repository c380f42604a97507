"""The bounded CI slice of the seeded random crash test (tests/torture/crash.py).

Its seed is DMFS_TORTURE_SEED or a fresh one, printed and shown in the session
summary with the run's numbers.  DMFS_CRASH_BUDGET (seconds; default 30, 20
under systemd-udevd, where every restart is slower) bounds its rounds; the
round under way when it runs out finishes (10-20 s).  Replay
a failure, or run longer, with
``contrib/guest/run -- .venv/bin/python -m tests.torture.crash --seed N --budget S``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dmfs.pool.udev import udevd_running
from tests.torture.crash import run_on_fresh_pool

BUDGET = float(os.environ.get("DMFS_CRASH_BUDGET", "20" if udevd_running() else "30"))


def test_random_kills_lose_nothing_and_every_restart_succeeds(
        torture_seed: int, session_note: Callable[[str], None]) -> None:
    report = run_on_fresh_pool(torture_seed, BUDGET)
    session_note(report.summary())
    assert report.kill_points > 0
