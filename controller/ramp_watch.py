"""The daemon's ramp records: one per setpoint dispatch that comes into force, in the journal.

A setpoint dispatch coming into force (on acceptance, at its scheduled start) opens a ramp
toward where the tracker's trajectory is heading, scored on the site meter by
`controller.ramp_score.RampScorer`; anything else taking over (a release, an expiry, a
failsafe drop) or the daemon stopping closes it. Finished records go to the journal.

Given a monotonic clock (the daemon's), ramps are timed on it: a wall-clock step during a ramp
neither stretches nor shrinks its settle time, confirmation or timeout. The record still
carries wall-clock times, each the ramp's start on the wall clock plus the monotonic time
elapsed since.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

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
        mono: Callable[[], float] | None = None,
    ) -> None:
        """`physical_min_s(target_w)`: the fleet's fastest time to the target's band (None when
        out of reach), recorded beside the settle time. `mono`: the monotonic clock to time
        ramps on (None: on the `now_unix` given, as a replay does)."""
        self._journal = journal
        self._tracker = tracker
        self._site_max_w = site_max_w
        self._physical_min_s = physical_min_s
        self.scorer = scorer or RampScorer()
        self._dispatch: Dispatch | None = None
        self._mono = mono
        self._offset = 0.0  # wall clock minus the scorer's axis, at the open ramp's start

    def _t(self, now_unix: float) -> float:
        """The scorer's time for `now_unix`."""
        return now_unix if self._mono is None else self._mono()

    def check(self, now_unix: float, meter_w: float | None) -> None:
        """After anything that may change the dispatch in force (an acceptance, a cycle: a
        scheduled start, an expiry, a failsafe drop). `meter_w`: the fresh site meter, or
        None (stale; the ramp's start is then unknown)."""
        active = self._tracker.active
        if active is self._dispatch:
            return
        self._dispatch = active
        t = self._t(now_unix)
        if active is None or active.mode != "setpoint":
            self._record(self.scorer.stop(t))
            return
        target_w = self._tracker.ramp_end_w
        prev = self.scorer.start(
            t,
            active.id,
            from_w=meter_w,
            target_w=target_w,
            tol_w=tolerance_w(target_w, self._site_max_w),
            physical_min_s=max(active.ramp_s or 0.0, self._physical_min_s(target_w) or 0.0),
        )
        self._record(prev)  # on the previous ramp's offset
        self._offset = now_unix - t

    def tick(self, now_unix: float, meter_w: float | None) -> None:
        """Every control cycle, with the fresh site meter or None when stale."""
        self.check(now_unix, meter_w)
        if meter_w is not None:
            self._record(self.scorer.observe(self._t(now_unix), meter_w))

    def stop(self, now_unix: float) -> None:
        """The daemon stops: the open ramp is recorded as it stands."""
        self._record(self.scorer.stop(self._t(now_unix)))

    def _record(self, rec: RampRecord | None) -> None:
        if rec is None:
            return
        if self._offset:  # back on the wall clock
            o = self._offset
            settled = None if rec.settled_at is None else rec.settled_at + o
            rec = replace(
                rec, started_at=rec.started_at + o, settled_at=settled, ended_at=rec.ended_at + o
            )
        self._journal.record_ramp(rec)
