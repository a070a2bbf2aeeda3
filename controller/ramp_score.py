"""How well the site followed one ramp: settle time, overshoot and integral error, SI units.

One set of definitions, two ways in:

* online, `RampScorer`: the daemon feeds the site meter sample by sample (O(1) each) and gets
  a `RampRecord` for the journal when the ramp settles, is superseded, times out or the
  daemon stops;
* offline, `score_series`: a recorded series (the simulator's ground truth, a meter log)
  over a window, for the benches, the demo, `rampd report` and the end-to-end tests. It feeds
  the samples through a `RampScorer`, so both judge a ramp alike by construction.

Definitions: the band is `tol_w` either side of the target. A ramp has settled once the power
entered the band for good (online: and stayed `confirm_s`; offline: until the window ends);
`settle_s` counts from the start to the first sample of that last stay. Overshoot is the
largest excursion beyond the target, away from where the ramp started (>= 0; 0 when the
start is unknown). The integral of |power - target| is a trapezoid over the samples, in J.
Samples before the start and NaN readings are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from drivers.core.state import F64

RampOutcome = Literal["settled", "superseded", "timeout", "interrupted"]


def tolerance_w(target_w: float, site_max_w: float) -> float:
    """The settle band: +-2% of the target or +-0.5% of the site maximum, whichever is larger."""
    return max(0.02 * abs(target_w), 0.005 * site_max_w)


@dataclass(frozen=True, slots=True)
class RampRecord:
    """The outcome of one ramp (W, s; times as given to the scorer, unix seconds in the
    daemon)."""

    started_at: float
    dispatch_id: str | None
    from_w: float | None
    target_w: float
    tol_w: float
    settled_at: float | None
    """When the power entered the band for good (None: it did not)."""
    settle_s: float | None
    overshoot_w: float
    """Largest excursion beyond the target, away from where the ramp started (>= 0)."""
    iae_j: float
    """Integral of |power - target| from the start to `ended_at`, J (W s)."""
    physical_min_s: float | None
    outcome: RampOutcome
    ended_at: float

    @property
    def ratio(self) -> float | None:
        """Settle time over the physical minimum, when both are known."""
        if self.settle_s is None or not self.physical_min_s:
            return None
        return self.settle_s / self.physical_min_s


class RampScorer:
    """Scores ramps online, O(1) per sample.

    `start()` when a ramp begins, `observe()` with each power sample, `stop()` when the
    daemon stops or `end()` when a recorded window ends; each returns the finished ramp's
    record, if one finished. Outcomes: "settled" once in the band for `confirm_s`; a ramp
    still open when the next starts is "settled" if inside the band then, else
    "superseded"; one not settled within `timeout_s` is "timeout"; one open at `stop()` is
    "interrupted" (or "settled" if inside the band); at `end()` "settled" or "timeout".
    """

    def __init__(self, *, confirm_s: float = 10.0, timeout_s: float = 600.0) -> None:
        self.confirm_s = confirm_s
        self.timeout_s = timeout_s
        self._open = False
        self._t0 = 0.0
        self._id: str | None = None
        self._from: float | None = None
        self._target = 0.0
        self._tol = 0.0
        self._phys: float | None = None
        self._dir = 0.0
        self._in_since: float | None = None
        self._overshoot = 0.0
        self._iae = 0.0
        self._last: tuple[float, float] | None = None  # (t, |err|)

    @property
    def active(self) -> bool:
        return self._open

    def start(
        self,
        at: float,
        dispatch_id: str | None,
        *,
        from_w: float | None,
        target_w: float,
        tol_w: float,
        physical_min_s: float | None = None,
    ) -> RampRecord | None:
        """Begin a ramp at `at`; returns the previous ramp's record if it was open."""
        prev = self._finish(at, "superseded") if self._open else None
        self._open = True
        self._t0, self._id, self._target, self._tol = at, dispatch_id, target_w, tol_w
        self._from = None if from_w is None or math.isnan(from_w) else from_w
        self._phys = physical_min_s
        if self._from is None or target_w == self._from:
            self._dir = 0.0
        else:
            self._dir = 1.0 if target_w > self._from else -1.0
        self._in_since, self._overshoot, self._iae, self._last = None, 0.0, 0.0, None
        return prev

    def observe(self, at: float, power_w: float) -> RampRecord | None:
        if not self._open:
            return None
        if at - self._t0 >= self.timeout_s:
            return self._finish(at, "timeout")
        if math.isnan(power_w) or at < self._t0:
            return None
        err = power_w - self._target
        if self._last is not None:
            t_prev, e_prev = self._last
            self._iae += 0.5 * (e_prev + abs(err)) * max(0.0, at - t_prev)
        self._last = (at, abs(err))
        self._overshoot = max(self._overshoot, err * self._dir)
        if abs(err) <= self._tol:
            if self._in_since is None:
                self._in_since = at
            if at - self._in_since >= self.confirm_s:
                return self._finish(at, "settled")
        else:
            self._in_since = None
        return None

    def stop(self, at: float) -> RampRecord | None:
        """The daemon stops: close the open ramp, if any."""
        return self._finish(at, "interrupted") if self._open else None

    def end(self, at: float) -> RampRecord | None:
        """A recorded window ends: close the open ramp, settled if inside the band."""
        if not self._open:
            return None
        return self._finish(at, "settled" if self._in_since is not None else "timeout")

    def _finish(self, at: float, outcome: RampOutcome) -> RampRecord:
        settled_at = self._in_since
        if outcome in ("superseded", "interrupted") and settled_at is not None:
            outcome = "settled"
        if outcome == "timeout":
            settled_at = None
        self._open = False
        return RampRecord(
            started_at=self._t0,
            dispatch_id=self._id,
            from_w=self._from,
            target_w=self._target,
            tol_w=self._tol,
            settled_at=settled_at,
            settle_s=None if settled_at is None else settled_at - self._t0,
            overshoot_w=self._overshoot,
            iae_j=self._iae,
            physical_min_s=self._phys,
            outcome=outcome,
            ended_at=at,
        )


def score_series(
    t: F64,
    w: F64,
    *,
    t0: float,
    t_end: float,
    target_w: float,
    tol_w: float,
    dispatch_id: str | None = None,
    physical_min_s: float | None = None,
) -> RampRecord:
    """The response in [t0, t_end] of the series (t, w) (time-ordered) to a ramp toward
    `target_w` that began at t0.

    It started from the last sample before t0 (else the first in the window). Settled means
    inside the band at `t_end` (so for good), with no confirmation time and no timeout: the
    window is the judge.
    """
    before = w[t < t0]
    sel = (t >= t0) & (t <= t_end)
    ts, ws = t[sel], w[sel]
    start = before[-1] if before.size else (ws[0] if ws.size else math.nan)
    scorer = RampScorer(confirm_s=math.inf, timeout_s=math.inf)
    scorer.start(
        t0,
        dispatch_id,
        from_w=float(start),
        target_w=target_w,
        tol_w=tol_w,
        physical_min_s=physical_min_s,
    )
    for ti, wi in zip(ts.tolist(), ws.tolist(), strict=True):
        scorer.observe(ti, wi)
    rec = scorer.end(t_end)
    assert rec is not None
    return rec
