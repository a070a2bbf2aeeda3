"""Connection slots: commands overtake queued adoptions and polls; cancellation loses none."""

from __future__ import annotations

import asyncio

from drivers.slots import ADOPTION, COMMAND, POLL, ExchangeSlots


async def _queue(slots: ExchangeSlots, order: list[str], name: str, priority: int) -> None:
    await slots.acquire(priority)
    order.append(name)
    slots.release()


async def test_a_freed_slot_goes_to_the_most_urgent_waiter_then_in_arrival_order() -> None:
    slots = ExchangeSlots(1)
    await slots.acquire(POLL)  # the wire is busy
    order: list[str] = []
    waiters = [
        asyncio.create_task(_queue(slots, order, name, priority))
        for name, priority in [
            ("poll-1", POLL),
            ("poll-2", POLL),
            ("adopt", ADOPTION),
            ("command-1", COMMAND),
            ("command-2", COMMAND),
        ]
    ]
    await asyncio.sleep(0)  # every waiter queued
    assert slots.waiting == 5
    slots.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    assert order == ["command-1", "command-2", "adopt", "poll-1", "poll-2"]
    assert slots.waiting == 0


async def test_a_free_slot_is_not_taken_past_a_more_urgent_waiter() -> None:
    slots = ExchangeSlots(2)
    await slots.acquire(POLL)
    await slots.acquire(POLL)
    order: list[str] = []
    command = asyncio.create_task(_queue(slots, order, "command", COMMAND))
    await asyncio.sleep(0)
    slots.release()  # handed to the waiting command, not left free for the next poll
    poll = asyncio.create_task(_queue(slots, order, "poll", POLL))
    await asyncio.wait_for(asyncio.gather(command, poll), 1.0)
    assert order == ["command", "poll"]


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    slots = ExchangeSlots(1)
    await slots.acquire(POLL)
    order: list[str] = []
    cancelled = asyncio.create_task(_queue(slots, order, "cancelled", COMMAND))
    waiting = asyncio.create_task(_queue(slots, order, "poll", POLL))
    await asyncio.sleep(0)
    slots.release()  # the command's future is resolved ...
    cancelled.cancel()  # ... and it is cancelled before it runs: the slot goes on
    await asyncio.wait_for(asyncio.gather(cancelled, waiting, return_exceptions=True), 1.0)
    assert order == ["poll"]
    # Every slot is back: one can be taken at once.
    await asyncio.wait_for(slots.acquire(POLL), 0.1)


async def test_a_waiter_cancelled_in_the_queue_leaves_it() -> None:
    slots = ExchangeSlots(1)
    await slots.acquire(POLL)
    task = asyncio.create_task(slots.acquire(COMMAND))
    await asyncio.sleep(0)
    assert slots.waiting == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert slots.waiting == 0
    slots.release()
    await asyncio.wait_for(slots.acquire(POLL), 0.1)
