"""The garbage collector, set for a daemon that holds a task per device.

A site's daemon keeps hundreds of thousands of long-lived objects (per device a task, its
coroutine frame, its wake event; the profile ladders and sessions of miners), and a
fleet-wide command allocates a few short-lived ones per device within a second. With
CPython's defaults (a young collection every 700 allocations, an older one every 10 of
those) the command's allocations set off collections that walk the whole long-lived heap,
with pauses of tens of milliseconds in the middle of a burst. So once the fleet is up, what
lives long is frozen out of collection, and the young generation is collected every 20,000
allocations (`rampd bench fanout` runs its driver with these settings too; the figures that
chose them are in docs/performance-history.md). Our own code makes few reference cycles
(asyncio's exceptions make some), so the larger young generation costs little memory.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Net allocations between young collections (CPython's default: 700)."""
MIDDLE_THRESHOLD = 20
"""Young collections between collections of the middle generation (default 10)."""


def tune() -> None:
    """Collect less often: at start, for the process."""
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, gc.get_threshold()[2])


def freeze_long_lived() -> int:
    """Once the fleet is up: move every object alive now out of reach of collection (they
    live as long as the process). The young generations are collected first, so the garbage
    of start-up is not kept; what the old one holds is kept, once. Returns how many objects
    are frozen."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give frozen objects back to collection (a bench between its runs)."""
    gc.unfreeze()


__all__ = ["freeze_long_lived", "thaw", "tune"]
