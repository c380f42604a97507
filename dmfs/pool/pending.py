"""A count of work in flight that others can wait to see drained.

The engine deletes removed snapshots' thin devices in the background
(``async_remove``, and the socket's Remove); containerd's Cleanup waits until
none is left.  Deletions start while a Cleanup waits, so "none left" must wake
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
