"""Connection slots shared by one driver's devices, handed out most urgent first.

A driver holds at most `limit` exchanges on the wire at once. When a fleet-wide command
meets polls already queued for a slot, a plain FIFO semaphore would send every queued poll
before the first command; here a freed slot goes to a command first, then an adoption (a
miner's session and profile ladder, set up ahead of its first command), then a poll.
The priority is the device task's own (a `ContextVar`, so each task sets it for itself).
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import suppress
from contextvars import ContextVar

COMMAND, ADOPTION, POLL = 0, 1, 2
"""Priorities of exchanges, most urgent first."""

exchange_priority: ContextVar[int] = ContextVar("exchange_priority", default=POLL)
"""Set while a device task sends a command (or adopts its device); polls are the default."""


class ExchangeSlots:
    """At most `limit` exchanges at once; a freed slot goes to the most urgent waiter."""

    def __init__(self, limit: int) -> None:
        self._free = max(1, limit)
        self._queues: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque(), deque())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues)

    async def acquire(self, priority: int) -> None:
        # A free slot means nobody waits: `release` hands a slot to a waiter before it
        # frees one, and a cancelled waiter leaves its queue.
        if self._free > 0:
            self._free -= 1
            return
        queue = self._queues[priority]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            else:
                with suppress(ValueError):
                    queue.remove(fut)
            raise

    def release(self) -> None:
        for queue in self._queues:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self._free += 1
