"""Dispatch -> the site's target trajectory: ramps, scheduled starts, expiry, failsafe.

Pure logic: no I/O, no clock of its own. The caller passes monotonic time (and, when accepting
a dispatch, the matching unix time, so wall-clock start/expiry can be placed on the monotonic
axis once, at acceptance; later wall-clock jumps do not move them).

Every transition (a scheduled start, an expiry, the failsafe) happens at its exact instant on
the monotonic axis, whatever the caller's polling rate: the trajectory is a function of time,
not of how often it is sampled.

Ramp-rate limits (`[ramp_limits]`) act on a fixed grid of TICK_S on the monotonic axis (not on
the caller's samples, so the limited trajectory is still a function of time): at each tick the
target moves toward the unlimited trajectory by no more than the per-minute rates allow and
stays within `max_change_kw_per_5s` of every target of the last 5 s; between ticks it holds.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Final, Literal

from controller.config import FailsafeConfig, RampLimitsConfig, SiteLimits
from controller.wire.ack import RampLimitName
from controller.wire.dispatch import Dispatch

log = logging.getLogger("rampd.target")

TrackerMode = Literal["normal", "released", "failsafe"]

TICK_S: Final = 0.1
"""The ramp limiter's grid: the target moves at most this often under limits."""
WINDOW_S: Final = 5.0
"""The rolling window of `max_change_kw_per_5s`."""
_WINDOW_TICKS: Final = round(WINDOW_S / TICK_S)
MAX_PREDICT_TICKS: Final = 12_000
"""How far a dispatch's reach time is simulated tick by tick (20 min); beyond, extrapolated."""
_EPS_W: Final = 1e-6


@dataclass(frozen=True, slots=True)
class _Ramp:
    """Linear from (t0, w0) to (t1, w1), flat after t1; t1 <= t0 is a step."""

    t0: float
    w0: float
    t1: float
    w1: float

    def at(self, t: float) -> float:
        if t >= self.t1 or self.t1 <= self.t0:
            return self.w1
        if t <= self.t0:
            return self.w0
        return self.w0 + (self.w1 - self.w0) * (t - self.t0) / (self.t1 - self.t0)


def _rate_w_s(limits: RampLimitsConfig, up: bool) -> float:
    """The per-minute limit in the direction as W/s; inf when none."""
    kw_min = limits.up_kw_per_min if up else limits.down_kw_per_min
    return math.inf if kw_min is None else kw_min * 1e3 / 60.0


def _window_w(limits: RampLimitsConfig) -> float:
    m = limits.max_change_kw_per_5s
    return math.inf if m is None else m * 1e3


def limited_min_s(limits: RampLimitsConfig, delta_w: float) -> float:
    """The least time the limits allow for a change of `delta_w` (positive: up) from a target
    at rest: ramps at the per-minute rate, at most `max_change_kw_per_5s` per 5 s window (a
    step of the window's size, then the next one once the first leaves the window)."""
    d = abs(delta_w)
    if d <= _EPS_W:
        return 0.0
    rate, m = _rate_w_s(limits, delta_w > 0), _window_w(limits)
    if math.isinf(m) or rate * WINDOW_S <= m:
        return d / rate  # the rate alone never fills a window (0 with no limit at all)
    k = math.ceil(d / m - 1e-9) - 1  # whole windows used before the last stretch
    return k * WINDOW_S + (d - k * m) / rate


def allowance_w(limits: RampLimitsConfig, horizon_s: float, up: bool) -> float:
    """The most the limits let the target move within `horizon_s` from rest (inf: no limit):
    what capability within that horizon can promise at most."""
    rate, m = _rate_w_s(limits, up), _window_w(limits)
    windows = max(1, math.ceil(horizon_s / WINDOW_S - 1e-9))
    return min(rate * horizon_s, m * windows)


class _Limiter:
    """The ramp limits on the tick grid: the limited target and the history the 5 s window
    needs (at most one window of ticks, plus the last tick before it: the value held at the
    window's start). Exempt moves shift the whole history (`base`), so they are not counted.
    """

    __slots__ = ("base", "binding", "down", "highs", "hist", "k", "lows", "m", "up", "y")

    def __init__(self, limits: RampLimitsConfig, k: int, w: float) -> None:
        self.up = _rate_w_s(limits, True) * TICK_S
        self.down = _rate_w_s(limits, False) * TICK_S
        self.m = _window_w(limits)
        self.k = k
        self.y = w
        self.base = 0.0
        # (tick, value - base): all ticks of the window; lows/highs: monotonic deques of them.
        self.hist: deque[tuple[int, float]] = deque([(k, w)])
        self.lows: deque[tuple[int, float]] = deque([(k, w)])
        self.highs: deque[tuple[int, float]] = deque([(k, w)])
        self.binding: Literal["rate", "window"] | None = None

    def copy(self) -> _Limiter:
        c = object.__new__(_Limiter)
        for name in _Limiter.__slots__:
            v = getattr(self, name)
            setattr(c, name, deque(v) if isinstance(v, deque) else v)
        return c

    def _push(self, k: int, v: float) -> None:
        self.hist.append((k, v))
        while self.lows and self.lows[-1][1] >= v:
            self.lows.pop()
        self.lows.append((k, v))
        while self.highs and self.highs[-1][1] <= v:
            self.highs.pop()
        self.highs.append((k, v))

    def step(self, k: int, r: float, exempt: bool) -> None:
        """Tick `k` with the unlimited target `r`."""
        hist = self.hist
        while len(hist) >= 2 and hist[1][0] <= k - _WINDOW_TICKS:
            hist.popleft()
        first = hist[0][0]
        while self.lows[0][0] < first:
            self.lows.popleft()
        while self.highs[0][0] < first:
            self.highs.popleft()
        y_prev = self.y
        self.k = k
        if exempt:
            self.base += r - y_prev
            self.y, self.binding = r, None
            self._push(k, r - self.base)
            return
        lo, hi = y_prev - self.down, y_prev + self.up
        lo_by: Literal["rate", "window"] = "rate"
        hi_by: Literal["rate", "window"] = "rate"
        if self.m < math.inf:
            w_lo = self.highs[0][1] + self.base - self.m
            w_hi = self.lows[0][1] + self.base + self.m
            if w_lo > lo:
                lo, lo_by = w_lo, "window"
            if w_hi < hi:
                hi, hi_by = w_hi, "window"
        if r > hi:
            self.y, self.binding = hi, hi_by
        elif r < lo:
            self.y, self.binding = lo, lo_by
        else:
            self.y, self.binding = r, None
        self._push(k, self.y - self.base)

    def settled(self) -> bool:
        """Every target of the window equals the current one: nothing left to count."""
        return self.highs[0][1] - self.lows[0][1] <= _EPS_W

    def rest(self, k: int) -> None:
        """Jump to tick `k` holding the current target (settled, unlimited target flat)."""
        v = self.y - self.base
        self.k = k
        self.binding = None
        for d in (self.hist, self.lows, self.highs):
            d.clear()
            d.append((k, v))

    def advance(self, k_end: int, ramp: _Ramp, exempt: bool) -> None:
        """Every tick up to `k_end` under `ramp`; a settled stretch is skipped at once."""
        while self.k < k_end:
            k = self.k + 1
            t = k * TICK_S
            r = ramp.at(t)
            if t >= ramp.t1 and abs(self.y - r) <= _EPS_W and self.settled():
                self.rest(k_end)
                return
            self.step(k, r, exempt)


def _tick_of(t: float) -> int:
    """The last tick at or before `t`."""
    return math.floor(t / TICK_S + 1e-9)


def _predict(
    lim: _Limiter, ramp: _Ramp, limits: RampLimitsConfig
) -> tuple[float | None, RampLimitName | None]:
    """When the limited target reaches `ramp`'s end (monotonic s) and the limit that governs,
    by running a copy of the limiter forward; (None, None) when no limit slows the move."""
    goal = ramp.w1
    up = goal > lim.y
    if abs(goal - lim.y) <= _EPS_W:
        return None, None
    sim = lim.copy()
    k0 = sim.k
    rate_tick = sim.up if up else sim.down
    # From a full window of its own rate-limited motion on, the window cannot bind.
    window_idle = sim.m == math.inf or rate_tick * (_WINDOW_TICKS + 1) <= sim.m
    by_rate = by_window = False
    raw_end = max(k0, math.ceil(ramp.t1 / TICK_S - 1e-9))
    while abs(sim.y - goal) > _EPS_W:
        if window_idle and (sim.m == math.inf or sim.k - k0 > _WINDOW_TICKS):
            # The rest is a ramp at the rate toward the unlimited trajectory: closed form.
            need = math.ceil(abs(goal - sim.y) / rate_tick - 1e-9) if rate_tick < math.inf else 0
            k_rate = sim.k + need
            by_rate = by_rate or k_rate > raw_end
            sim.k = max(raw_end, k_rate)
            break
        if sim.k - k0 >= MAX_PREDICT_TICKS:
            sim.k += math.ceil(abs(goal - sim.y) / sim.m) * _WINDOW_TICKS  # a window a step
            by_window = True
            break
        sim.step(sim.k + 1, ramp.at((sim.k + 1) * TICK_S), False)
        by_rate = by_rate or sim.binding == "rate"
        by_window = by_window or sim.binding == "window"
    if not (by_rate or by_window) or sim.k <= raw_end:
        return None, None
    rate_name: RampLimitName = "up_kw_per_min" if up else "down_kw_per_min"
    # Both bound: the window governs when its pace (one window's change per 5 s) is slower.
    window_slower = sim.m / WINDOW_S < _rate_w_s(limits, up)
    name: RampLimitName = (
        "max_change_kw_per_5s" if by_window and (window_slower or not by_rate) else rate_name
    )
    return sim.k * TICK_S, name


def _began(d: Dispatch) -> float:
    """When `d`'s ramp began: `issued_at` (or a later `start_at`). The journal's payload
    carries no acceptance time, and the two differ by the delivery latency only."""
    return max(d.issued_at, d.start_at if d.start_at is not None else d.issued_at)


def _goal_w(d: Dispatch) -> float:
    """What a setpoint or regulation dispatch asks for: regulation adds its signal's share
    of the band to the base."""
    if d.mode == "regulation":
        return d.target_w + (d.signal or 0.0) * (d.band_w or 0.0)
    return d.target_w


def resumed(d: Dispatch, now_unix: float) -> Dispatch:
    """`d` as put back in force after a restart at `now_unix`: a ramp already under way keeps
    its original end instead of starting over (one already over becomes a step)."""
    began = _began(d)
    if d.ramp_s <= 0.0 or began > now_unix:
        return d  # a step, or not started yet: its ramp is still all ahead
    return replace(d, ramp_s=max(0.0, began + d.ramp_s - now_unix))


def resume_from_w(d: Dispatch, sample_at: float, sample_w: float, now_unix: float) -> float:
    """The target to restart from at `now_unix` with `d` in force, given the last journaled
    target (`sample_w` at `sample_at`): where `d`'s ramp stands now.

    The journal samples the target once a second, so mid-ramp the sample trails the ramp by up
    to a second of its slope; restarting from it would push the site back the way it came.
    The ramp is linear and the sample lies on it (or, taken before it began, at its start),
    so the line from the sample to the ramp's end is the ramp. A step, a ramp not begun or
    already over, and a release start from the sample.
    """
    began = _began(d)
    end = began + d.ramp_s
    if d.mode == "release" or d.ramp_s <= 0.0 or not began <= now_unix < end:
        return sample_w
    t_from = min(max(sample_at, began), now_unix)
    return sample_w + (_goal_w(d) - sample_w) * (now_unix - t_from) / (end - t_from)


class TargetTracker:
    """The target in force at any monotonic instant, from the accepted dispatches.

    Trajectory:
      * setpoint / regulation: linear ramp over `ramp_s` from the target in force at acceptance
        (or at `start_at`, if later) to the new one; `ramp_s = 0` is a step. Regulation asks for
        `target_w + signal * band_w`. Everything is bounded to [min_kw, max_kw].
      * A dispatch with a future `start_at` waits; until then the trajectory in force goes on.
        The latest accepted dispatch supersedes anything not yet started.
      * release, and any dispatch's `expires_at`: mode "released", ramp to the lower rails'
        level (`set_base`: commitments, peaks, price; the site maximum by default)
        (release over its own `ramp_s`, expiry over `failsafe.ramp_s`).
      * Before the first dispatch the tracker holds `initial_w` (a bumpless start), mode
        "normal" with no active dispatch.

    Failsafe: no dispatch and no heartbeat for `failsafe.dispatch_timeout_s` (counted from
    construction if given `now_mono`, else from the first call; then from the last message;
    after a restart, `restore` carries the timer and a failsafe that was on over the outage)
    -> mode "failsafe" and the policy:
      * hold: the trajectory in force goes on (an ongoing ramp completes, a scheduled start
        still starts, an expiry still releases to the lower rails).
      * baseline / min: ramp over `failsafe.ramp_s` to `baseline_kw` / `min_kw`; the active
        and any scheduled dispatch are dropped.
    Ending it:
      * any accepted dispatch ends the failsafe.
      * a heartbeat alone ends it only under `hold`, where the site is still doing what the
        dispatcher last asked. Under `baseline` / `min` the site has moved on its own, so the
        dispatcher must re-dispatch (release counts) before the mode leaves "failsafe"; the
        heartbeat still restarts the silence timer.

    Ramp limits (`ramp_limits`, optional): every trajectory above (setpoints with or without
    `ramp_s`, regulation, however fast its signal, release, expiry, restoration after a
    failsafe) is limited so the target never moves faster than `up_kw_per_min` /
    `down_kw_per_min` nor by more than `max_change_kw_per_5s` within any rolling 5 s window; a
    new ramp starts from the limited target. Exempt, and not counted against the window: the
    failsafe's own target (baseline / min: at once or over `failsafe.ramp_s`, as without
    limits) and the exempt offset (`set_exempt_offset`, for frequency deployments).
    `limit_state` says which limit slows the move in force and when its end is reached.

    `target_w(now)` advances the state to `now`; `mode`, `active`, `in_force` and `pending`
    report the state as of the latest call (of any method). Time never runs backwards: an
    earlier `now` is treated as the latest one seen.

    The journal's resume drives a tracker of its own over the journaled dispatches (with
    `announce=False`), so these rules are the only statement of which dispatch is in force.
    """

    def __init__(
        self,
        limits: SiteLimits,
        failsafe: FailsafeConfig,
        initial_w: float,
        *,
        now_mono: float | None = None,
        announce: bool = True,
        ramp_limits: RampLimitsConfig | None = None,
    ) -> None:
        """`now_mono` starts the silence timer; without it, the first call of any method does.
        `announce=False` keeps transitions out of the log (a replay, not the site).
        `ramp_limits`: None, or none of them set, leaves the trajectory unlimited."""
        self._announce = announce
        self._min_w = limits.min_kw * 1e3
        self._max_w = limits.max_kw * 1e3
        self._fs = failsafe
        self._now: float | None = now_mono
        w = self._clamp(initial_w)
        self._ramp = _Ramp(0.0, w, 0.0, w)
        self._active: Dispatch | None = None
        self._in_force: Dispatch | None = None
        self._active_expires: float | None = None
        self._pending: Dispatch | None = None
        self._pending_start = 0.0
        self._pending_expires: float | None = None
        self._last_seq: int | None = None
        self._last_msg: float | None = now_mono  # None until the first call fixes the origin
        self._failsafe = False
        self._failsafe_since: float | None = None
        self._failsafe_note = ""  # said after the reason: a failsafe restored at a restart
        self._released = False
        lims = ramp_limits
        self._limits = lims if lims is not None and lims != RampLimitsConfig() else None
        self._lim: _Limiter | None = None  # built at the first tick, on the grid of `now`
        self._reach_at: float | None = None
        self._limited_by: RampLimitName | None = None
        self._exempt_w = 0.0
        self._base_w = self._max_w

    # -- reporting ------------------------------------------------------------------------

    @property
    def mode(self) -> TrackerMode:
        if self._failsafe:
            return "failsafe"
        return "released" if self._released else "normal"

    @property
    def active(self) -> Dispatch | None:
        """The dispatch whose target is in force, None when released, failsafe-imposed or
        before the first dispatch."""
        return self._active

    @property
    def in_force(self) -> Dispatch | None:
        """The dispatch that set the trajectory in force: `active`, or the release that
        released the site; None after an expiry, a failsafe drop, or before the first."""
        return self._in_force

    @property
    def pending(self) -> Dispatch | None:
        """An accepted dispatch waiting for its start_at."""
        return self._pending

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    @property
    def ramp_limits(self) -> RampLimitsConfig | None:
        """The limits in force; None without any."""
        return self._limits

    def limit_state(self) -> tuple[RampLimitName | None, float | None]:
        """(the limit slowing the move in force, the monotonic instant its end is reached),
        as of the latest call; (None, None) when no limit slows it (or it has arrived)."""
        if self._reach_at is None or self._now is None or self._now >= self._reach_at:
            return None, None
        return self._limited_by, self._reach_at

    def limited_min_s(self, target_w: float) -> float:
        """The least time the limits allow the target in force (as of the latest call) to
        take to reach `target_w`: until the move in force arrives if that is where it is
        heading, else from rest; 0 without limits."""
        if self._limits is None or self._lim is None or self._now is None:
            return 0.0
        by, reach = self.limit_state()
        if by is not None and reach is not None and abs(target_w - self._ramp.w1) <= 1.0:
            return reach - self._now
        return limited_min_s(self._limits, target_w - self._lim.y)

    @property
    def base_governed(self) -> bool:
        """No grid dispatch sets the target (none yet, released or expired) and no failsafe
        imposes its own: the lower rails' level (`set_base`) is followed."""
        return self._active is None and not self._exempt()

    @property
    def base_w(self) -> float:
        return self._base_w

    def set_base(self, goal_w: float, ramp_s: float, now_mono: float) -> None:
        """The lower rails' level (commitments, peaks, price; the site maximum by default),
        reached over `ramp_s` under the ramp limits whenever no grid dispatch sets the target.
        A release and an expiry go back to it instead of the site maximum."""
        now = self._advance(now_mono)
        goal = self._clamp(goal_w)
        if abs(goal - self._base_w) < 1.0 and (ramp_s <= 0.0 or not self.base_governed):
            return
        self._base_w = goal
        if self.base_governed and abs(goal - self._ramp.w1) >= 1.0:
            self._ramp_to(now, goal, ramp_s, announce=False)

    @property
    def exempt_offset_w(self) -> float:
        return self._exempt_w

    def set_exempt_offset(self, offset_w: float) -> None:
        """The hook for frequency deployments: `offset_w` (negative: less load) is added to
        the target from the next `target_w` on, at once, outside the ramp limits and not
        counted against their windows (the limited trajectory goes on as if it were 0). The
        sum stays within the site's bounds. 0 withdraws it, also at once."""
        self._exempt_w = offset_w

    @property
    def ramp_end_w(self) -> float:
        """Where the current ramp is heading (the final value), for telemetry."""
        return self._ramp.w1

    @property
    def failsafe_reason(self) -> str:
        """Why the failsafe is on, for the status; "" when it is not."""
        if not self._failsafe:
            return ""
        fs = self._fs
        return (
            f"no dispatch or heartbeat for {fs.dispatch_timeout_s:g} s{self._failsafe_note}; "
            f"policy {fs.policy}"
        )

    @property
    def failsafe_since(self) -> float | None:
        """Monotonic instant the failsafe began (before this tracker existed, if restored);
        None when it is off."""
        return self._failsafe_since if self._failsafe else None

    @property
    def last_heard(self) -> float | None:
        """Monotonic instant the silence timer counts from: the last dispatch or heartbeat,
        else the timer's origin (construction, or what `restore` set); None before the
        first call."""
        return self._last_msg

    def failsafe_at(self) -> float | None:
        """Monotonic instant the failsafe will start if nothing arrives; None if latched."""
        if self._failsafe or self._last_msg is None:
            return None
        return self._last_msg + self._fs.dispatch_timeout_s

    # -- inputs ---------------------------------------------------------------------------

    def target_w(self, now_mono: float) -> float:
        now = self._advance(now_mono)
        # Limited: held between ticks; the failsafe's own target goes on unlimited.
        lim = self._lim
        w = self._ramp.at(now) if lim is None or self._exempt() else lim.y
        return w if self._exempt_w == 0.0 else self._clamp(w + self._exempt_w)

    def heartbeat(self, now_mono: float) -> None:
        now = self._advance(now_mono)
        self._last_msg = now
        if self._failsafe and self._fs.policy == "hold":
            self._failsafe = False
            self._failsafe_note = ""
            self._log(logging.INFO, "failsafe ended by heartbeat (policy hold); mode %s", self.mode)

    def accept(self, d: Dispatch, now_mono: float, now_unix: float) -> None:
        """Put a validated dispatch in force (or schedule it). Its seq must be new."""
        if self._last_seq is not None and d.seq <= self._last_seq:
            raise ValueError(f"seq {d.seq} not above last accepted {self._last_seq}")
        now = self._advance(now_mono)
        self._last_seq = d.seq
        self._last_msg = now
        if self._failsafe:
            self._failsafe = False
            self._failsafe_note = ""
            self._log(logging.INFO, "failsafe ended by dispatch %s (seq %d)", d.id, d.seq)
        if not d.sets_target:  # a recall: the target stays as it is
            return

        def to_mono(unix: float | None) -> float | None:
            return None if unix is None else now + (unix - now_unix)

        start = to_mono(d.start_at)
        expires = to_mono(d.expires_at)
        if start is not None and start > now:
            self._pending = d
            self._pending_start = start
            self._pending_expires = expires
            self._log(
                logging.DEBUG, "dispatch %s (seq %d) scheduled in %.1f s", d.id, d.seq, start - now
            )
            return
        self._pending = None  # the latest word supersedes anything not yet started
        self._start(d, now, expires)

    def start_failsafe(self, now_mono: float) -> None:
        """Enter the failsafe at `now_mono` as if the dispatcher had fallen silent then (the
        journal's resume replays a recorded failsafe this way); no-op if already in it."""
        now = self._advance(now_mono)
        if not self._failsafe:
            self._enter_failsafe(now)

    def restore(
        self,
        now_mono: float,
        *,
        last_heard_ago_s: float | None,
        failsafe_for_s: float | None = None,
    ) -> None:
        """Carry the failsafe's state over a restart (after resumed dispatches are accepted:
        their acceptance is not the dispatcher speaking, so the timer is set again here).

        `last_heard_ago_s`: how long ago, on the wall clock, the dispatcher was last heard
        (or the silence timer of the previous run began); the outage counts as silence, so
        the timer goes on from there and trips when it would have without the restart, at
        once if that instant passed during the outage. `failsafe_for_s`: how long the
        failsafe has been on, when it was on at the stop: it stays on, with the policy's
        effect (baseline / min: what is in force is dropped; a failsafe ramp still under way
        ends when it would have, from the target in force now). Negative durations (the
        wall clock stepped back across the restart) count as 0.
        """
        now = self._advance(now_mono)
        if last_heard_ago_s is not None:
            self._last_msg = now - max(0.0, last_heard_ago_s)
        if failsafe_for_s is not None:
            since = now - max(0.0, failsafe_for_s)
            self._failsafe_note = " (since before the restart)"
            if self._failsafe:
                self._failsafe_since = min(since, self._failsafe_since or now)
            else:
                ramp_s = max(0.0, since + self._fs.ramp_s - now)
                self._enter_failsafe(now, ramp_s=ramp_s, since=since)
            return
        heard = self._last_msg
        if not self._failsafe and heard is not None and heard + self._fs.dispatch_timeout_s <= now:
            # The timer ran out during the outage: the failsafe starts now, not at that
            # instant (a ramp begun in the past would make the target jump).
            self._failsafe_note = " (across the restart)"
            self._enter_failsafe(now)

    # -- internals ------------------------------------------------------------------------

    def _log(self, level: int, msg: str, *args: object) -> None:
        if self._announce:
            log.log(level, msg, *args)

    def _clamp(self, w: float) -> float:
        return min(self._max_w, max(self._min_w, w))

    def _exempt(self) -> bool:
        """The failsafe's own target (baseline / min) goes outside the limits."""
        return self._failsafe and self._fs.policy != "hold"

    def _ramp_to(self, t: float, w: float, ramp_s: float, *, announce: bool = True) -> None:
        lim = self._lim
        if lim is None:
            self._ramp = _Ramp(t, self._ramp.at(t), t + ramp_s, self._clamp(w))
            return
        # From the limited target: the site is there, not where the unlimited one would be.
        self._ramp = _Ramp(t, lim.y, t + ramp_s, self._clamp(w))
        self._reach_at, self._limited_by = (
            (None, None) if self._exempt() else _predict(lim, self._ramp, self._limits_cfg())
        )
        if announce and self._limited_by is not None and self._reach_at is not None:
            self._log(
                logging.INFO,
                "target %.1f kW limited by %s: reached in %.1f s",
                self._ramp.w1 / 1e3,
                self._limited_by,
                self._reach_at - t,
            )

    def _limits_cfg(self) -> RampLimitsConfig:
        assert self._limits is not None
        return self._limits

    def _limit_to(self, t: float) -> None:
        """Run the limiter's ticks up to `t` under the trajectory in force (before it
        changes at `t`, so each tick sees the trajectory of its own instant)."""
        if self._limits is None:
            return
        if self._lim is None:
            self._lim = _Limiter(self._limits, _tick_of(t), self._ramp.at(t))
            return
        self._lim.advance(_tick_of(t), self._ramp, self._exempt())

    def _start(self, d: Dispatch, t: float, expires: float | None) -> None:
        was = self.mode
        self._in_force = d
        if d.mode == "release":
            self._active, self._active_expires = None, None
            self._released = True
            self._ramp_to(t, self._base_w, d.ramp_s)
        else:
            self._active, self._active_expires = d, expires
            self._released = False
            self._ramp_to(t, _goal_w(d), d.ramp_s)
        if self.mode != was:
            self._log(
                logging.INFO, "mode %s -> %s by dispatch %s (seq %d)", was, self.mode, d.id, d.seq
            )

    def _advance(self, now_mono: float) -> float:
        """Apply every timed transition up to now, each at its own instant, in order."""
        if self._now is None:
            self._now = now_mono
        if self._last_msg is None:
            self._last_msg = self._now  # the silence timer counts from the first sight
        now = max(now_mono, self._now)
        while True:
            events: list[tuple[float, int]] = []
            if self._pending is not None:
                events.append((self._pending_start, 0))
            if self._active_expires is not None:
                events.append((self._active_expires, 1))
            if not self._failsafe:
                events.append((self._last_msg + self._fs.dispatch_timeout_s, 2))
            due = [e for e in events if e[0] <= now]
            if not due:
                break
            t, kind = min(due)
            self._limit_to(t)
            if kind == 0:
                self._start_pending(t)
            elif kind == 1:
                self._expire(t)
            else:
                self._enter_failsafe(t)
        self._limit_to(now)
        self._now = now
        return now

    def _start_pending(self, t: float) -> None:
        d = self._pending
        assert d is not None
        self._pending = None
        self._start(d, t, self._pending_expires)

    def _expire(self, t: float) -> None:
        d = self._active
        self._active, self._active_expires, self._in_force = None, None, None
        self._released = True
        self._ramp_to(t, self._base_w, self._fs.ramp_s)
        name = f"{d.id} (seq {d.seq})" if d is not None else "dispatch"
        self._log(logging.INFO, "%s expired; released to the lower rails", name)

    def _enter_failsafe(
        self, t: float, *, ramp_s: float | None = None, since: float | None = None
    ) -> None:
        """The failsafe from `t` (it began at `since`, default `t`), its ramp over `ramp_s`
        (default `failsafe.ramp_s`)."""
        self._failsafe = True
        self._failsafe_since = t if since is None else since
        policy = self._fs.policy
        self._log(logging.WARNING, "failsafe: %s", self.failsafe_reason)
        if policy == "hold":
            return
        self._active, self._active_expires, self._pending = None, None, None
        self._in_force = None
        self._released = False
        goal = (self._fs.baseline_kw or 0.0) * 1e3 if policy == "baseline" else self._min_w
        self._ramp_to(t, goal, self._fs.ramp_s if ramp_s is None else ramp_s)
