"""Dispatch -> the site's target trajectory: ramps, scheduled starts, expiry, failsafe.

Pure logic: no I/O, no clock of its own. The caller passes monotonic time (and, when accepting
a dispatch, the matching unix time, so wall-clock start/expiry can be placed on the monotonic
axis once, at acceptance; later wall-clock jumps do not move them).

Every transition (a scheduled start, an expiry, the failsafe) happens at its exact instant on
the monotonic axis, whatever the caller's polling rate: the trajectory is a function of time,
not of how often it is sampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

from controller.config import FailsafeConfig, SiteLimits
from controller.wire.dispatch import Dispatch

log = logging.getLogger("rampd.target")

TrackerMode = Literal["normal", "released", "failsafe"]


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
      * release, and any dispatch's `expires_at`: mode "released", ramp to the site maximum
        (release over its own `ramp_s`, expiry over `failsafe.ramp_s`).
      * Before the first dispatch the tracker holds `initial_w` (a bumpless start), mode
        "normal" with no active dispatch.

    Failsafe: no dispatch and no heartbeat for `failsafe.dispatch_timeout_s` (counted from
    construction if given `now_mono`, else from the first call; then from the last message)
    -> mode "failsafe" and the policy:
      * hold: the trajectory in force goes on (an ongoing ramp completes, a scheduled start
        still starts, an expiry still releases to the site maximum).
      * baseline / min: ramp over `failsafe.ramp_s` to `baseline_kw` / `min_kw`; the active
        and any scheduled dispatch are dropped.
    Ending it:
      * any accepted dispatch ends the failsafe.
      * a heartbeat alone ends it only under `hold`, where the site is still doing what the
        dispatcher last asked. Under `baseline` / `min` the site has moved on its own, so the
        dispatcher must re-dispatch (release counts) before the mode leaves "failsafe"; the
        heartbeat still restarts the silence timer.

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
    ) -> None:
        """`now_mono` starts the silence timer; without it, the first call of any method does.
        `announce=False` keeps transitions out of the log (a replay, not the site)."""
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
        self._released = False

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
    def ramp_end_w(self) -> float:
        """Where the current ramp is heading (the final value), for telemetry."""
        return self._ramp.w1

    @property
    def failsafe_reason(self) -> str:
        """Why the failsafe is on, for the status; "" when it is not."""
        if not self._failsafe:
            return ""
        fs = self._fs
        return f"no dispatch or heartbeat for {fs.dispatch_timeout_s:g} s; policy {fs.policy}"

    def failsafe_at(self) -> float | None:
        """Monotonic instant the failsafe will start if nothing arrives; None if latched."""
        if self._failsafe or self._last_msg is None:
            return None
        return self._last_msg + self._fs.dispatch_timeout_s

    # -- inputs ---------------------------------------------------------------------------

    def target_w(self, now_mono: float) -> float:
        now = self._advance(now_mono)
        return self._ramp.at(now)

    def heartbeat(self, now_mono: float) -> None:
        now = self._advance(now_mono)
        self._last_msg = now
        if self._failsafe and self._fs.policy == "hold":
            self._failsafe = False
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

    # -- internals ------------------------------------------------------------------------

    def _log(self, level: int, msg: str, *args: object) -> None:
        if self._announce:
            log.log(level, msg, *args)

    def _clamp(self, w: float) -> float:
        return min(self._max_w, max(self._min_w, w))

    def _ramp_to(self, t: float, w: float, ramp_s: float) -> None:
        self._ramp = _Ramp(t, self._ramp.at(t), t + ramp_s, self._clamp(w))

    def _start(self, d: Dispatch, t: float, expires: float | None) -> None:
        was = self.mode
        self._in_force = d
        if d.mode == "release":
            self._active, self._active_expires = None, None
            self._released = True
            self._ramp_to(t, self._max_w, d.ramp_s)
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
            if kind == 0:
                self._start_pending(t)
            elif kind == 1:
                self._expire(t)
            else:
                self._enter_failsafe(t)
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
        self._ramp_to(t, self._max_w, self._fs.ramp_s)
        name = f"{d.id} (seq {d.seq})" if d is not None else "dispatch"
        self._log(logging.INFO, "%s expired; released to site maximum", name)

    def _enter_failsafe(self, t: float) -> None:
        self._failsafe = True
        policy = self._fs.policy
        self._log(logging.WARNING, "failsafe: %s", self.failsafe_reason)
        if policy == "hold":
            return
        self._active, self._active_expires, self._pending = None, None, None
        self._in_force = None
        self._released = False
        goal = (self._fs.baseline_kw or 0.0) * 1e3 if policy == "baseline" else self._min_w
        self._ramp_to(t, goal, self._fs.ramp_s)
