"""Stopping a loop whose cancellation a library swallowed.

Python 3.11's `asyncio.wait_for`, which pymodbus and aiomqtt await every transaction and
publish with, returns the result when a cancellation lands as its future completes: the
cancellation is lost, `Task.cancelling()` stays above zero and a `while True` loop that
called it runs on, so whoever cancelled it waits forever. Loops that await such libraries
call `stop_if_cancelled()` once per turn.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise CancelledError when the running task was cancelled and something swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
