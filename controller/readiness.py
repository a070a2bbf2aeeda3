"""When the daemon is ready: every device has reported and the site meter is fresh.

Until then systemd's `Type=notify` start is still under way (a unit ordered after rampd waits
for a site under control, not a process). At that moment, once: sd_notify READY, a log line,
and, when the daemon owns its process, the long-lived heap frozen out of garbage collection
(`controller.heap`): by then the fleet's per-device objects exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller import heap
from controller.notify import Notifier

log = logging.getLogger("rampd")


class Readiness:
    def __init__(self, notifier: Notifier, *, settle_heap: bool = False) -> None:
        """`settle_heap`: the daemon owns its process (freezing the heap is process-wide)."""
        self._notifier = notifier
        self._settle_heap = settle_heap
        self.frozen: int | None = None
        """Objects frozen out of garbage collection at readiness; None if not (yet) done."""

    @property
    def ready(self) -> bool:
        return self._notifier.ready_sent

    def check(self, *, all_seen: bool, meter_ok: bool, status: Callable[[], str]) -> bool:
        """Call every cycle; True on the cycle the daemon became ready. `meter_ok`: the meter
        is fresh (or the site has none); `status` is the STATUS= text sent with READY."""
        if self.ready or not (all_seen and meter_ok):
            return False
        self._notifier.ready(status())
        log.info("ready: every device reported and the meter is fresh")
        if self._settle_heap:
            self.frozen = heap.freeze_long_lived()
            log.info("%d long-lived objects frozen out of garbage collection", self.frozen)
        return True
