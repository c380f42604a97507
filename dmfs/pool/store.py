"""The one store (journal + in-memory metadata) and the one way to change it.

The trio thread owns every piece of in-memory state: the metadata, the mount
table, the set of foreign thin ids.  Kernel work runs in worker threads, a
whole sequence per hand-off (a hand-off costs about 1 ms in the test guest,
more than most dm ioctls).  A sequence writes its journal records as it goes,
durable ones fsync'd before the dm operation they announce, so the journal
and its fsyncs never hold up the trio loop; but it changes nothing in memory.
It collects what it did in an :class:`Effects`, and :meth:`Store.run` applies
those on the trio thread when the sequence returns or fails, in the order the
sequence produced them.

Sequences on different devices may run at once, and their records interleave
in the journal.  That is safe because every record changes objects that one
lock protects (a device by its device lock, the snapshot tree by the engine
lock), so applying each sequence's records in its own order gives the state
that a replay of the journal gives.  A checkpoint must include every record up
to its sequence number, so compaction runs only while no sequence is running.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from dmfs.pool.errors import PoolError
from dmfs.pool.journal import Journal
from dmfs.pool.metadata import Metadata
from dmfs.pool.pending import Pending

log = logging.getLogger(__name__)

T = TypeVar("T")


class Effects:
    """What one worker-thread sequence did to the store and the tables: journal
    records already written, and changes to in-memory state still to apply.

    A record that could not be made durable (its fsync failed) is retracted:
    it is not applied, and the checkpoint that :meth:`Store.run` then writes
    (the whole state, at a sequence number past it) makes replay skip it.  So
    an operation whose records do not reach the disk fails and leaves no
    trace, rather than answering an error and happening anyway."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._pending: list[Callable[[], None]] = []
        self._undurable: list[int] = []  # our records written since our last sync
        self._meta: Metadata | None = None

    def record(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Journal ``record`` now (on disk before this returns if ``durable``);
        apply it to the metadata later, on the trio thread.  OSError when it
        cannot be written or made durable (then it and the records before it
        that were not durable yet are retracted)."""
        self._journal.write(record)
        self._undurable.append(len(self._pending))
        self._pending.append(lambda: self._apply(record))
        if durable:
            self.sync()

    def sync(self) -> None:
        """Make this sequence's records durable; OSError (and retract them) if
        the fsync fails."""
        try:
            self._journal.sync()
        except OSError:
            for index in self._undurable:
                self._pending[index] = _retracted
            raise
        finally:
            self._undurable = []

    def later(self, change: Callable[[], None]) -> None:
        """Run ``change`` on the trio thread once the sequence is over."""
        self._pending.append(change)

    def _apply(self, record: dict[str, Any]) -> None:
        assert self._meta is not None
        self._meta.apply(record)

    def apply(self, meta: Metadata) -> None:
        """Apply everything, in order (trio thread)."""
        self._meta = meta
        pending, self._pending = self._pending, []
        for change in pending:
            change()


def _retracted() -> None:
    """A record whose fsync failed: nothing to apply."""


class Store:
    """The journal and the metadata it describes, with the count of sequences
    running in worker threads."""

    def __init__(self, journal: Journal, meta: Metadata | None = None) -> None:
        self.journal = journal
        self.meta = meta or Metadata()
        self._running = Pending()  # sequences in worker threads
        #: set, and replaced, whenever a sequence's effects have been applied
        self._applied = trio.Event()

    async def run(self, sequence: Callable[..., T], *args: Any) -> T:
        """Run ``sequence(effects, *args)`` in a worker thread and make its
        records durable there; apply its effects on this (trio) thread
        afterwards, whether it returned or raised.

        Not cancellable while the thread runs: a dm sequence is never cut in
        the middle, and its effects are always applied.  A sequence journals
        the intent of each dm operation durably before it (an fsync failure
        there stops the sequence before the kernel acts); the records that
        complete it become durable at the end.  A record whose fsync failed
        is retracted (see :class:`Effects`) and the error raised; the whole
        state is then written again as a checkpoint before this returns (and
        PoolError is raised if that fails too), so that replay agrees with
        memory.  An operation answers success only once what it did is on disk."""
        effects = Effects(self.journal)
        self._running.start()
        try:
            return await trio.to_thread.run_sync(self._in_worker, sequence, effects, args)
        finally:
            try:
                effects.apply(self.meta)
            finally:
                self._running.done()
                self._applied.set()
                self._applied = trio.Event()
            if self.journal.needs_rewrite:
                with trio.CancelScope(shield=True):
                    await self.rewrite()

    def _in_worker(self, sequence: Callable[..., T], effects: Effects,
                   args: tuple[Any, ...]) -> T:
        try:
            result = sequence(effects, *args)
        except BaseException:
            with contextlib.suppress(OSError):  # the error that matters is on its way
                effects.sync()
            raise
        effects.sync()  # the records that complete the operation
        return result

    async def write(self, *records: dict[str, Any]) -> None:
        """Journal records durably (in a worker thread), then apply them."""
        def sequence(effects: Effects) -> None:
            for record in records:
                effects.record(record)

        await self.run(sequence)

    async def wait_change(self, version: int) -> int:
        """Wait until the metadata's version is no longer ``version``; the new one."""
        while self.meta.version == version:
            await self._applied.wait()
        return self.meta.version

    async def rewrite(self) -> None:
        """After a failed fsync: write the whole state as a checkpoint again."""
        log.warning("an fsync of the journal in %s failed: writing the whole state as a "
                    "fresh checkpoint", self.journal.directory)
        await self.compact(force=True)

    @property
    def busy(self) -> bool:
        """Some sequence is running in a worker thread."""
        return self._running.count > 0

    async def wait_quiet(self) -> None:
        """Wait until no sequence runs."""
        await self._running.drained()

    async def compact(self, *, force: bool = False) -> None:
        """Write a checkpoint of the state if the journal is long (or ``force``,
        or an fsync failed and the state must be written whole again); only
        while no sequence runs, so the state includes every record written."""
        if not (force or self.journal.wants_compaction or self.journal.needs_rewrite):
            return
        if self.busy and not (force or self.journal.needs_rewrite):
            return  # a later operation compacts
        while self.busy:
            await self.wait_quiet()
        # The state and its sequence number are taken together on this thread;
        # records written while the worker writes the checkpoint follow it.
        state, seq = self.meta.dump(), self.journal.seq
        self._running.start()
        try:
            await trio.to_thread.run_sync(self.journal.compact, state, seq)
        except OSError as error:
            raise PoolError(f"writing a checkpoint of the journal in "
                            f"{self.journal.directory} failed: {error}") from error
        finally:
            self._running.done()

