"""The daemon's ramp records: one per setpoint dispatch that comes into force, in the journal.

A setpoint dispatch coming into force (on acceptance, at its scheduled start) opens a ramp
toward where the tracker's trajectory is heading, scored on the site meter by
`controller.ramp_score.RampScorer`; anything else taking over (a release, an expiry, a
failsafe drop) or the daemon stopping closes it. Finished records go to the journal.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.journal import Journal, RampRecord
from controller.ramp_score import RampScorer, tolerance_w
from controller.target import TargetTracker
from controller.wire import Dispatch


class RampWatch:
    def __init__(
        self,
        journal: Journal,
        tracker: TargetTracker,
        *,
        site_max_w: float,
        physical_min_s: Callable[[float], float | None],
        scorer: RampScorer | None = None,
    ) -> None:
        """`physical_min_s(target_w)`: the fleet's fastest time to the target's band (None when
        out of reach), recorded beside the settle time."""
        self._journal = journal
        self._tracker = tracker
        self._site_max_w = site_max_w
        self._physical_min_s = physical_min_s
        self.scorer = scorer or RampScorer()
        self._dispatch: Dispatch | None = None

    def check(self, now_unix: float, meter_w: float | None) -> None:
        """After anything that may change the dispatch in force (an acceptance, a cycle: a
        scheduled start, an expiry, a failsafe drop). `meter_w`: the fresh site meter, or
        None (stale; the ramp's start is then unknown)."""
        active = self._tracker.active
        if active is self._dispatch:
            return
        self._dispatch = active
        if active is None or active.mode != "setpoint":
            self._record(self.scorer.stop(now_unix))
            return
        target_w = self._tracker.ramp_end_w
        self._record(
            self.scorer.start(
                now_unix,
                active.id,
                from_w=meter_w,
                target_w=target_w,
                tol_w=tolerance_w(target_w, self._site_max_w),
                physical_min_s=max(active.ramp_s or 0.0, self._physical_min_s(target_w) or 0.0),
            )
        )

    def tick(self, now_unix: float, meter_w: float | None) -> None:
        """Every control cycle, with the fresh site meter or None when stale."""
        self.check(now_unix, meter_w)
        if meter_w is not None:
            self._record(self.scorer.observe(now_unix, meter_w))

    def stop(self, now_unix: float) -> None:
        """The daemon stops: the open ramp is recorded as it stands."""
        self._record(self.scorer.stop(now_unix))

    def _record(self, rec: RampRecord | None) -> None:
        if rec is not None:
            self._journal.record_ramp(rec)
