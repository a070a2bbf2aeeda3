"""A loop stops when a library swallowed its cancellation (Python 3.11's wait_for)."""

from __future__ import annotations

import asyncio
import contextlib

from drivers.core.cancellation import stop_if_cancelled


async def test_a_loop_stops_when_a_library_swallowed_its_cancellation() -> None:
    turns = 0
    started = asyncio.Event()

    async def swallowing_call() -> None:
        # As wait_for does when its result lands with the cancellation.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)

    async def loop() -> None:
        nonlocal turns
        while True:
            started.set()
            await swallowing_call()
            turns += 1
            stop_if_cancelled()

    task = asyncio.create_task(loop())
    await started.wait()
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 1.0)
    assert task.cancelled() and turns == 1


async def test_an_uncancelled_task_goes_on() -> None:
    stop_if_cancelled()  # no exception: nothing was cancelled
