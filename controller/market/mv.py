"""Measurement and verification (M&V) of curtailment events: what the site gave up, against
what baseline, whether it kept its word, and what it was worth. Pure: no I/O, no clock (the
caller passes unix time).

An event is a stretch of time during which a rail other than ``default`` (full power) sets
the site's target. `EventMeter` is fed once a second by the daemon; samples under the default
rail feed a rolling baseline, and an event's figures come out when it ends:

* baseline: the time-weighted average of the last ``baseline_minutes`` of default-rail
  samples before the event (``recent``; the curtailed time between two events is skipped,
  so a rebound right after an event never makes the whole baseline), or one the daemon
  computed from the journal with `high_4_of_5_baseline` and handed over with
  `EventMeter.set_baseline`. Without any history (an event from the daemon's first
  second) it is the site's power at the event's first sample, before the site moved.
* reduction = baseline - site, per sample (negative when the site drew more than its
  baseline); the energy curtailed counts positive reductions only.
* ramp-in allowance: the first ``ramp_allowance_s`` of an event, and again after the target
  drops by more than the tolerance, are not judged; ``met`` (commitment and peak rails) says
  whether every judged sample stayed at or below target + tolerance, ``met_fraction`` the
  share of judged time that did. The minimum reduction is taken over judged time too (the
  first seconds of any event have none).
* value: the energy cost avoided at the prices received (samples without a price add
  nothing; ``priced_fraction`` says how much of the energy had one) and the revenue given
  up at the revenue per MWh the caller states (mining revenue of the curtailed load).

Consecutive rails (a price curtailment followed by a commitment) make two events; the second
keeps the first's baseline: a curtailed period is never a baseline.
"""

from __future__ import annotations

import array
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Final
from zoneinfo import ZoneInfo

import numpy as np

from drivers.core.state import F64, Bool, Rows

DEFAULT_RAIL: Final = "default"
RAILS: Final = ("failsafe", "frequency", "dispatch", "commitment", "peak", "price")
JUDGED_RAILS: Final = frozenset({"commitment", "peak"})
"""Rails with a promise to keep: their events say whether the site met the target."""

METHOD_RECENT: Final = "recent"
METHOD_HIGH_4_OF_5: Final = "high_4_of_5"
METHOD_HIGH_2_OF_3: Final = "high_2_of_3"
"""A weekend event's like-day baseline (`[mv] baseline = "high_4_of_5"` on a weekend)."""
METHOD_RECENT_FALLBACK: Final = "recent (no like days)"
METHOD_FIRST_SAMPLE: Final = "first sample (no history)"

MAX_EVENT_SAMPLES: Final = 720
"""At most this many (t, site_kw, target_kw) points are kept per event, for its plot."""
MAX_GAP_S: Final = 10.0
"""A sample stands for at most this long: a stalled feed is not integrated over."""
NOMINAL_DT_S: Final = 1.0
_DAY_S: Final = 86400.0
_J_PER_KWH: Final = 3.6e6
_J_PER_MWH: Final = 3.6e9

Sample = tuple[float, float, float]
"""(t unix s, site kW, target kW); NaN where unknown."""


@dataclass(frozen=True, slots=True)
class CurtailmentEvent:
    """One curtailment event's M&V figures (times unix s; units in the field names)."""

    rail: str
    started_at: float
    ended_at: float
    baseline_w: float
    baseline_method: str
    """``recent``, ``high_4_of_5``, ``high_2_of_3``, ``recent (no like days)`` or ``first
    sample (no history)``."""
    target_w: float | None
    """The lowest target the rail asked during the event (None: it never named one)."""
    energy_curtailed_kwh: float
    avg_reduction_kw: float
    """Time-weighted over the whole event (negative stretches included)."""
    min_reduction_kw: float
    """Over the time after the ramp-in allowance (the whole event if it never got there)."""
    met: bool | None
    """Commitment and peak: at or below target + tolerance all the judged time; else None."""
    met_fraction: float | None
    """Commitment and peak: share of the judged time within; None without judged time."""
    cost_avoided_usd: float
    revenue_forgone_usd: float
    priced_fraction: float | None
    """Share of the curtailed energy that had a price (None: nothing curtailed)."""
    samples: tuple[Sample, ...]
    """Downsampled series for the plot, at most `MAX_EVENT_SAMPLES` points."""
    detail: str = ""
    """Why the rail curtailed, in its words (the first reason it gave)."""

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class OngoingEvent:
    """What the meter knows of the event in progress (for the daemon's baseline lookup)."""

    rail: str
    started_at: float
    chain_started_at: float
    """Start of the first of the back-to-back events that share this baseline."""
    baseline_w: float
    baseline_method: str


class _Open:
    """An event in progress: its raw samples (8 bytes a value: a day at 1 Hz is ~4 MB)."""

    __slots__ = (
        "allow_until", "detail", "judged", "last_target", "price", "rail", "revenue", "site",
        "started_at", "t", "target",
    )  # fmt: skip

    def __init__(self, rail: str, started_at: float, detail: str) -> None:
        self.rail = rail
        self.started_at = started_at
        self.detail = detail
        self.t = array.array("d")
        self.site = array.array("d")
        self.target = array.array("d")
        self.price = array.array("d")
        self.revenue = array.array("d")
        self.judged = array.array("b")
        self.allow_until = -math.inf
        self.last_target = math.nan


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


class EventMeter:
    """Curtailment events from a once-a-second feed; see the module docstring."""

    def __init__(
        self,
        baseline_minutes: float,
        tol_w: float,
        ramp_allowance_s: float = 60.0,
        *,
        max_gap_s: float = MAX_GAP_S,
    ) -> None:
        if not (baseline_minutes > 0 and tol_w >= 0 and ramp_allowance_s >= 0 and max_gap_s > 0):
            raise ValueError("baseline_minutes and max_gap_s must be > 0, tolerances >= 0")
        self._window_s = baseline_minutes * 60.0
        self.tol_w = tol_w
        self.ramp_allowance_s = ramp_allowance_s
        self._max_gap_s = max_gap_s
        self._hist: deque[tuple[float, float]] = deque()  # (weight s, W), default rail only
        self._hist_s = 0.0
        self._last_t: float | None = None
        self._ev: _Open | None = None
        # The chain of back-to-back events: (its start, baseline W, method).
        self._chain: tuple[float, float, str] | None = None

    # -- the feed ----------------------------------------------------------------------

    def sample(
        self,
        t: float,
        site_w: float,
        governing: str,
        target_w: float,
        *,
        price_usd_per_mwh: float | None,
        revenue_usd_per_mwh: float,
        detail: str = "",
    ) -> CurtailmentEvent | None:
        """One sample (unix s, the site's measured W, the governing rail and its target);
        returns the event this sample ended, if any."""
        step = NOMINAL_DT_S if self._last_t is None else t - self._last_t
        self._last_t = t
        site = _finite(site_w)
        finished: CurtailmentEvent | None = None
        if governing == DEFAULT_RAIL:
            if self._ev is not None:
                finished = self._close(t)
                self._chain = None
            if not math.isnan(site):
                self._remember(min(max(step, 0.0), self._max_gap_s), site)
            return finished
        if self._ev is not None and self._ev.rail != governing:
            finished = self._close(t)
        if self._ev is None:
            if self._chain is None:
                self._chain = (t, *self._recent_baseline(site))
            self._ev = _Open(governing, t, detail)
        ev = self._ev
        if not ev.detail:
            ev.detail = detail
        if self._chain is not None and math.isnan(self._chain[1]) and not math.isnan(site):
            self._chain = (self._chain[0], site, METHOD_FIRST_SAMPLE)
        target = _finite(target_w)
        # A new ramp-in: the event's start, and every drop of the target beyond tolerance.
        if not ev.t or target < ev.last_target - self.tol_w:
            ev.allow_until = t + self.ramp_allowance_s
        if not math.isnan(target):
            ev.last_target = target
        ev.t.append(t)
        ev.site.append(site)
        ev.target.append(target)
        ev.price.append(_finite(price_usd_per_mwh))
        ev.revenue.append(_finite(revenue_usd_per_mwh))
        ev.judged.append(t >= ev.allow_until)
        return finished

    def finish(self, t: float) -> CurtailmentEvent | None:
        """End the event in progress at `t` (the daemon stops); None if there is none."""
        if self._ev is None:
            return None
        ev = self._close(t)
        self._chain = None
        return ev

    def set_baseline(
        self, w: float | None, method: str, *, chain_started_at: float | None = None
    ) -> bool:
        """Replace the baseline of the event in progress (and of the events chained after
        it); `w` None keeps the value and changes the method. With `chain_started_at`, only
        if the chain in progress started then (a lookup that outlived its event is dropped).
        True if applied."""
        if self._ev is None or self._chain is None:
            return False
        start, old_w, _ = self._chain
        if chain_started_at is not None and chain_started_at != start:
            return False
        value = old_w if w is None else float(w)
        if not math.isfinite(value):
            return False
        self._chain = (start, value, method)
        return True

    @property
    def ongoing(self) -> OngoingEvent | None:
        if self._ev is None or self._chain is None:
            return None
        start, w, method = self._chain
        return OngoingEvent(self._ev.rail, self._ev.started_at, start, w, method)

    def recent_baseline_w(self) -> float | None:
        """The `recent` baseline an event starting now would get (None: no history)."""
        w, method = self._recent_baseline(math.nan)
        return None if method != METHOD_RECENT else w

    # -- internals ---------------------------------------------------------------------

    def _remember(self, weight_s: float, w: float) -> None:
        self._hist.append((weight_s, w))
        self._hist_s += weight_s
        # Keep just enough default-rail time to cover the window.
        while len(self._hist) > 1 and self._hist_s - self._hist[0][0] >= self._window_s:
            self._hist_s -= self._hist.popleft()[0]

    def _recent_baseline(self, site_now: float) -> tuple[float, str]:
        total = math.fsum(wt for wt, _ in self._hist)
        if total > 0:
            return math.fsum(wt * w for wt, w in self._hist) / total, METHOD_RECENT
        if self._hist:
            return math.fsum(w for _, w in self._hist) / len(self._hist), METHOD_RECENT
        return site_now, METHOD_FIRST_SAMPLE

    def _close(self, t_end: float) -> CurtailmentEvent:
        ev, chain = self._ev, self._chain
        assert ev is not None and chain is not None
        self._ev = None
        return _figures(ev, t_end, chain[1], chain[2], self.tol_w, self._max_gap_s)


def _arr(a: array.array[float] | array.array[int]) -> F64:
    return np.asarray(a, dtype=np.float64)


def _wmean(x: F64, wt: F64) -> float:
    """Weighted mean over the finite x (unweighted if their weights are all 0); NaN if none."""
    ok = np.isfinite(x)
    if not ok.any():
        return math.nan
    total = float(wt[ok].sum())
    if total > 0:
        return float((x[ok] * wt[ok]).sum() / total)
    return float(x[ok].mean())


def _figures(
    ev: _Open, t_end: float, baseline_w: float, method: str, tol_w: float, max_gap_s: float
) -> CurtailmentEvent:
    t, site, target = _arr(ev.t), _arr(ev.site), _arr(ev.target)
    price, revenue = _arr(ev.price), _arr(ev.revenue)
    judged = _arr(ev.judged) > 0
    # Each sample stands until the next one (the last until the event's end).
    dt = np.clip(np.diff(np.append(t, t_end)), 0.0, max_gap_s)
    red = baseline_w - site  # NaN where the site was not measured
    measured = np.isfinite(red)
    curtailed_j = np.where(measured, np.clip(red, 0.0, None), 0.0) * dt
    energy_j = float(curtailed_j.sum())
    mwh = curtailed_j / _J_PER_MWH
    priced = np.isfinite(price)
    cost = float((mwh[priced] * price[priced]).sum())
    has_rev = np.isfinite(revenue)
    revenue_usd = float((mwh[has_rev] * revenue[has_rev]).sum())
    priced_fraction = float(curtailed_j[priced].sum()) / energy_j if energy_j > 0 else None

    post = judged & measured
    min_red = red[post] if post.any() else red[measured]
    min_reduction_w = float(min_red.min()) if min_red.size else math.nan

    met: bool | None = None
    met_fraction: float | None = None
    if ev.rail in JUDGED_RAILS:
        sel = post & np.isfinite(target)
        if sel.any():
            within = site[sel] <= target[sel] + tol_w
            w = dt[sel]
            met_fraction = float(w[within].sum() / w.sum()) if w.sum() > 0 else float(within.mean())
            met = bool(within.all())
    finite_target = target[np.isfinite(target)]
    return CurtailmentEvent(
        rail=ev.rail,
        started_at=ev.started_at,
        ended_at=t_end,
        baseline_w=baseline_w,
        baseline_method=method,
        target_w=float(finite_target.min()) if finite_target.size else None,
        energy_curtailed_kwh=energy_j / _J_PER_KWH,
        avg_reduction_kw=_wmean(red, dt) / 1e3,
        min_reduction_kw=min_reduction_w / 1e3,
        met=met,
        met_fraction=met_fraction,
        cost_avoided_usd=cost,
        revenue_forgone_usd=revenue_usd,
        priced_fraction=priced_fraction,
        samples=downsample(t, site / 1e3, target / 1e3),
        detail=ev.detail,
    )


def _bucket_mean(x: F64, starts: Rows) -> F64:
    ok = np.isfinite(x)
    sums = np.add.reduceat(np.where(ok, x, 0.0), starts)
    counts = np.add.reduceat(ok.astype(np.float64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: F64 = sums / counts
    return out


def _bucket_min(x: F64, starts: Rows) -> F64:
    low = np.minimum.reduceat(np.where(np.isfinite(x), x, np.inf), starts)
    out: F64 = np.where(np.isinf(low), np.nan, low)
    return out


def downsample(
    t: F64, site_kw: F64, target_kw: F64, max_points: int = MAX_EVENT_SAMPLES
) -> tuple[Sample, ...]:
    """At most `max_points` (t, site kW, target kW): per bucket its first time, the mean site
    power and the lowest target (a short deep target stays visible); rounded to 1 ms, 1 W."""
    n = int(t.size)
    if n > max_points:
        starts = np.linspace(0, n, max_points + 1).astype(np.intp)[:-1]
        t, site_kw, target_kw = (
            t[starts],
            _bucket_mean(site_kw, starts),
            _bucket_min(target_kw, starts),
        )
    return tuple(
        (round(float(a), 3), round(float(b), 3), round(float(c), 3))
        for a, b, c in zip(t, site_kw, target_kw, strict=True)
    )


# --- the high 4 of 5 baseline -------------------------------------------------------------


def window_length_s(start_s_of_day: float, end_s_of_day: float) -> float:
    """Length of a time-of-day window; end <= start crosses midnight; equal: a whole day."""
    span = (end_s_of_day - start_s_of_day) % _DAY_S
    return span if span > 0 else _DAY_S


def covered_s(t: F64, max_gap_s: float = MAX_GAP_S) -> float:
    """How much time a series' samples cover: their spacing, gaps counted up to `max_gap_s`,
    the last sample standing for the median spacing. Fewer than 2 samples cover nothing."""
    if t.size < 2:
        return 0.0
    dt = np.clip(np.diff(np.sort(t)), 0.0, max_gap_s)
    return float(dt.sum() + min(float(np.median(dt)), max_gap_s))


def seconds_of_day(t: F64, tz: tzinfo) -> F64:
    """Local time of day of unix times (offsets looked up once per UTC minute: every time
    zone's transitions fall on whole minutes)."""
    minutes = np.floor(t / 60.0)
    uniq, inv = np.unique(minutes, return_inverse=True)
    offsets = np.array(
        [
            (datetime.fromtimestamp(m * 60.0, tz).utcoffset() or timedelta(0)).total_seconds()
            for m in uniq
        ],
        dtype=np.float64,
    )
    out: F64 = np.mod(t + offsets[inv.reshape(-1)], _DAY_S)
    return out


def in_window(tod: F64, start_s_of_day: float, end_s_of_day: float) -> Bool:
    """Which local times of day fall in [start, end) (end <= start: across midnight)."""
    start = start_s_of_day % _DAY_S
    end = start + window_length_s(start_s_of_day, end_s_of_day)
    # Shift so the window starts at 0: one comparison, midnight crossing or not.
    mask: Bool = np.mod(tod - start, _DAY_S) < end - start
    return mask


def high_4_of_5_baseline(
    days: Sequence[tuple[F64, F64]],
    start_s_of_day: float,
    end_s_of_day: float,
    *,
    tz: str | tzinfo | None = None,
    min_coverage: float = 0.5,
) -> float | None:
    """The average of the 4 highest of 5 days' average load (W) over the event's time-of-day
    window: the baseline utilities use for a weekday's events ("high 4 of 5"). None with
    fewer than 5 usable days; see `high_k_of_n_baseline`."""
    return high_k_of_n_baseline(
        days, start_s_of_day, end_s_of_day, k=4, n=5, tz=tz, min_coverage=min_coverage
    )


def high_k_of_n_baseline(
    days: Sequence[tuple[F64, F64]],
    start_s_of_day: float,
    end_s_of_day: float,
    *,
    k: int,
    n: int,
    tz: str | tzinfo | None = None,
    min_coverage: float = 0.5,
) -> float | None:
    """The average of the `k` highest of the `n` latest days' average load (W) over the
    event's time-of-day window: 4 of 5 like weekdays, 2 of 3 like weekend days (PJM's
    customer baseline for weekends and holidays).

    `days`: one (t unix s, W) series per past day, the caller's choice of days (like days
    without events, as `JournalReader.site_power_days` picks them). With `tz`, each series is
    first cut to the local window; None takes them as already cut. A day counts when its
    finite samples cover at least `min_coverage` of the window; of those, the `n` latest are
    used. None with fewer than `n`.
    """
    if not 0 < k <= n:
        raise ValueError(f"high k of n baseline: need 0 < k <= n, got k={k}, n={n}")
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    need_s = min_coverage * window_length_s(start_s_of_day, end_s_of_day)
    scored: list[tuple[float, float]] = []  # (latest sample, the day's average)
    for t_raw, w_raw in days:
        t = np.asarray(t_raw, dtype=np.float64)
        w = np.asarray(w_raw, dtype=np.float64)
        keep = np.isfinite(t) & np.isfinite(w)
        if zone is not None and keep.any():
            keep &= in_window(seconds_of_day(t, zone), start_s_of_day, end_s_of_day)
        t, w = t[keep], w[keep]
        if t.size and covered_s(t) >= need_s:
            scored.append((float(t.max()), float(w.mean())))
    if len(scored) < n:
        return None
    latest = sorted(scored)[-n:]
    top = sorted(avg for _, avg in latest)[n - k :]
    return math.fsum(top) / k
