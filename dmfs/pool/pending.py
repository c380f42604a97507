"""A count of work in flight that others can wait to see drained.

Two users: the store's sequences in worker threads (a compaction waits until
none runs), and the engine's background deletions of removed snapshots' thin
devices (``async_remove``, the socket's Remove), which containerd's Cleanup
waits for.  Work starts while someone waits, so "none left" must wake
every waiter of the time the count last left zero: one event per busy period,
made when the count leaves zero and set when it comes back.  (An event made
anew at every start left a Cleanup waiting on one that nothing would ever set,
and containerd's garbage collector, which sends Cleanup, hung with it.)
"""

from __future__ import annotations

import trio


class Pending:
    """How many pieces of work are in flight; :meth:`drained` waits for none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def start(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def done(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no work is in flight (at once when none is)."""
        await self._idle.wait()
