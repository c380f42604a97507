"""Pending: a Cleanup waiting for background deletions wakes when none is left,
whatever deletions started while it waited."""

from __future__ import annotations

import trio
import trio.testing

from dmfs.pool.pending import Pending


async def test_nothing_pending_is_drained_at_once() -> None:
    with trio.fail_after(1):
        await Pending().drained()


async def test_a_waiter_wakes_when_work_started_while_it_waited_is_done() -> None:
    pending = Pending()
    woken = trio.Event()

    async def waiter() -> None:
        await pending.drained()
        woken.set()

    async with trio.open_nursery() as nursery:
        pending.start()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        pending.start()  # a second removal while the first is in flight
        pending.done()
        await trio.testing.wait_all_tasks_blocked()
        assert not woken.is_set()  # one is still in flight
        pending.done()
        with trio.fail_after(1):
            await woken.wait()
        assert pending.count == 0


async def test_each_busy_period_has_its_own_wait() -> None:
    pending = Pending()
    pending.start()
    pending.done()
    pending.start()  # busy again: a new waiter waits for this one
    waited = False
    async with trio.open_nursery() as nursery:
        async def waiter() -> None:
            nonlocal waited
            await pending.drained()
            waited = True
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited
        pending.done()
    assert waited
