"""The physical minimum: the least time in which the fleet could bring the site into a band.

A benchmark needs a yardstick that no controller can beat: how long the site's physics alone
needs to move its power from where it is into ``[target - tol, target + tol]``. This module
computes that lower bound from the same arrays the control step uses, with the dynamics of
`drivers/sim/physics.py` (the simulator is the truth the bound must hold against):

- ON row at power ``p``: after its dead time it moves at most ``ramp_up``/``ramp_down`` W/s
  within ``[p_min, p_hi]`` (``p_hi``: ``p_max``, or a lower per-row cap such as a GPU rack's
  workload demand)::

      hi(t) = min(p_hi, p + ru * max(0, t - dead))
      lo(t) = max(p_min, p - rd * max(0, t - dead))

  A row already outside its bounds keeps its present power as the edge on that side (a row
  above ``p_hi`` can still go down, one below ``p_min`` can still go up).
- Sleepable ON row (`FleetParams.sleepable`): a sleep command also takes the dead time, then
  the row draws its power for ``sleep_s`` and then ``p_idle``: ``lo(t) = p_idle`` for
  ``t >= dead + sleep_s``.
- SLEEPING row: draws ``p_idle``; a wake command takes the dead time, then ``wake_s`` at
  ``p_idle``, then the row ramps up from ``p_idle`` at ``ramp_up`` toward ``p_hi``. A WAKING row
  has already acted on its command: it ramps after ``wake_left_s``. Neither can go below
  ``p_idle`` (a sleep command aborts a wake).
- FAULT / UNKNOWN rows are fixed at their present power; the non-flexible load (``other_w``)
  is taken as constant.

What the bound leaves out, each of which only widens the reachable range (so a lower bound
stays a lower bound): power quantization (``step_w``: the simulator rounds targets down into
``[p_min, p_hi]``, never past the ramp), and the gap between ``p_idle`` and ``p_min`` (the
total's reachable set is a union of intervals; we use its hull ``[LO(t), HI(t)]``).

What the bound assumes: the fleet is at rest. A command already issued but not yet acted on
(inside a device's dead-time buffer), a row still ramping toward an earlier setpoint, or a row
counting down to sleep moves before this model lets it, and can beat the bound by that head
start. Benchmarks call this right when they publish a dispatch, with the site settled. The
simulator's discrete step also ramps a row in the very step its wake completes, so a waking row
there can run ahead of this continuous model by one physics step (20 ms at 50 Hz).

Method: each row's ``lo_i(t)`` is non-increasing and ``hi_i(t)`` non-decreasing, and both start
at the present power, so the present total ``P0`` lies in ``[LO(t), HI(t)]`` for every ``t``.
If ``P0 + other`` is above the band only ``LO`` matters (``HI`` never drops below ``P0``); below
it, only ``HI``. The one relevant sum is monotone in ``t``, so we bisect on ``t`` until the
bracket is ``resolution_s`` wide (22 passes for an hour at 1 ms) and return the bracket's lower
end: never later than the exact answer, at most ``resolution_s`` earlier. Each pass is a handful
of vectorized operations over the rows that can move; no per-row Python loop. An exact
piecewise-linear solve would need a sort of every row's breakpoints (and the sleep jumps);
bisection is simpler to get right and fast enough for its callers (the daemon once per
telemetry message and per ramp record, the simulator once per bench dispatch): well under a
millisecond for a site of a few thousand rows. Gathering the movable rows costs about as
much as the 22 passes, so ``reachable_w`` alone is about as dear as a whole ``physical_min_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.core.params import FleetParams
from drivers.core.state import F64, DeviceState

ON = int(DeviceState.ON)
SLEEPING = int(DeviceState.SLEEPING)
WAKING = int(DeviceState.WAKING)

_RATE_MAX = 1e15
"""Ramp rates above this (incl. inf) are clipped so ``rate * 0`` stays 0, not NaN."""


@dataclass(frozen=True, slots=True)
class _Rows:
    """The caller's arrays, checked once."""

    p: F64
    state: npt.NDArray[np.integer[Any]]
    cap: F64
    """Upper bound of a running row: min(p_max, p_hi), not below p_min."""
    left: F64
    """Remaining wake time of WAKING rows (0 elsewhere)."""


@dataclass(frozen=True, slots=True)
class _Rise:
    """``HI(t) = fixed + sum(max(p, min(cap, base + rate * max(0, t - t0))))`` over the rows
    that can rise (ON, SLEEPING, WAKING); the others stay at their power (``fixed``)."""

    p: F64
    base: F64
    rate: F64
    t0: F64
    cap: F64
    fixed: float

    def at(self, t: float, buf: F64 | None = None) -> float:
        x = _ramp(t, self.t0, self.rate, buf)
        np.add(x, self.base, out=x)
        np.minimum(x, self.cap, out=x)
        np.maximum(x, self.p, out=x)
        return self.fixed + float(x.sum())


@dataclass(frozen=True, slots=True)
class _Fall:
    """``LO(t) = fixed + sum(min(p, max(floor, p - rate * max(0, t - t0))))`` over the ON rows,
    each replaced by ``min(p, p_idle)`` from ``t_sleep`` (inf: cannot sleep); a SLEEPING or
    WAKING row contributes ``min(p, p_idle)`` to ``fixed``, the others their power."""

    p: F64
    rate: F64
    t0: F64
    floor: F64
    t_sleep: F64
    asleep: F64
    fixed: float

    def at(self, t: float, buf: F64 | None = None) -> float:
        x = _ramp(t, self.t0, self.rate, buf)
        np.subtract(self.p, x, out=x)
        np.maximum(x, self.floor, out=x)
        np.minimum(x, self.p, out=x)
        # copyto: a masked ufunc (minimum(..., where=)) is several times slower here.
        np.copyto(x, self.asleep, where=self.t_sleep <= t)
        return self.fixed + float(x.sum())


def _ramp(t: float, t0: F64, rate: F64, buf: F64 | None) -> F64:
    """``rate * max(0, t - t0)``, into `buf` when given (it must match ``t0``'s shape)."""
    x = np.subtract(t, t0, out=buf) if buf is not None else np.subtract(t, t0)
    np.maximum(x, 0.0, out=x)
    np.multiply(x, rate, out=x)
    return x


def _rows(
    params: FleetParams,
    power_w: npt.ArrayLike,
    state: npt.ArrayLike,
    p_hi_w: npt.ArrayLike | None,
    wake_left_s: npt.ArrayLike | None,
) -> _Rows:
    n = params.n
    p = np.asarray(power_w, dtype=np.float64)
    st = np.asarray(state)
    if p.shape != (n,) or st.shape != (n,):
        raise ValueError(f"power_w and state must have shape ({n},)")
    if not bool(np.all(np.isfinite(p))):
        raise ValueError(f"power_w must be finite (row {int(np.argmin(np.isfinite(p)))})")
    # A caller's cap narrows p_max; NaN means no cap. Below p_min a cap cannot push a running
    # row (the simulator clips setpoints into [p_min, p_max] before the workload limit).
    cap = params.p_max_w
    if p_hi_w is not None:
        hi_arg = np.asarray(p_hi_w, dtype=np.float64)
        if hi_arg.shape != (n,):
            raise ValueError(f"p_hi_w must have shape ({n},)")
        cap = np.fmin(cap, hi_arg)
    cap = np.maximum(cap, params.p_min_w)
    if wake_left_s is None:
        left = np.zeros(n)  # unknown: assume the wake ends now (the bound stays a bound)
    else:
        arg = np.asarray(wake_left_s, dtype=np.float64)
        if arg.shape != (n,):
            raise ValueError(f"wake_left_s must have shape ({n},)")
        left = np.where(st == WAKING, arg, 0.0)  # other rows may hold anything, even NaN
        if not bool(np.all(np.isfinite(left))):
            raise ValueError("wake_left_s must be finite for WAKING rows")
        np.maximum(left, 0.0, out=left)
    return _Rows(p=p, state=st, cap=cap, left=left)


def _rise(params: FleetParams, rows: _Rows) -> _Rise:
    st = rows.state
    idx = np.flatnonzero((st == ON) | (st == SLEEPING) | (st == WAKING))
    p = rows.p.take(idx)
    sub = st.take(idx)
    on = sub == ON
    dead = params.dead_time_s.take(idx)
    # ON rows ramp from their power after the dead time; SLEEPING rows from idle once the
    # run command lands and the wake is over; WAKING rows from idle when the wake is over.
    t0 = np.where(
        on, dead, np.where(sub == SLEEPING, dead + params.wake_s.take(idx), rows.left.take(idx))
    )
    return _Rise(
        p=p,
        base=np.where(on, p, params.p_idle_w.take(idx)),
        rate=np.minimum(params.ramp_up_w_s.take(idx), _RATE_MAX),
        t0=t0,
        cap=rows.cap.take(idx),
        fixed=float(rows.p.sum() - p.sum()),
    )


def _fall(params: FleetParams, rows: _Rows) -> _Fall:
    st = rows.state
    on = st == ON
    idx = np.flatnonzero(on)
    p = rows.p.take(idx)
    dead = params.dead_time_s.take(idx)
    idle = params.p_idle_w.take(idx)
    sleep = np.where(params.sleepable.take(idx), dead + params.sleep_s.take(idx), np.inf)
    # A sleeping or waking row can only stay at (or go back to) idle.
    idle_only = (st == SLEEPING) | (st == WAKING)
    still = np.where(idle_only, np.minimum(rows.p, params.p_idle_w), rows.p)
    return _Fall(
        p=p,
        rate=np.minimum(params.ramp_down_w_s.take(idx), _RATE_MAX),
        t0=dead,
        floor=params.p_min_w.take(idx),
        t_sleep=sleep,
        asleep=np.minimum(p, idle),
        fixed=float(still.sum() - p.sum()),
    )


def reachable_w(
    params: FleetParams,
    power_w: npt.ArrayLike,
    state: npt.ArrayLike,
    horizon_s: float,
    *,
    p_hi_w: npt.ArrayLike | None = None,
    wake_left_s: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """(lowest, highest) total device power the fleet could draw at ``horizon_s`` from now.

    Devices only (add the non-flexible load yourself). `p_hi_w`: per-row upper cap below
    ``p_max`` (NaN: none); `wake_left_s`: remaining wake time of WAKING rows (other rows
    ignored; None: 0). See the module docstring for the model and what it leaves out.
    """
    if not horizon_s >= 0.0:
        raise ValueError("horizon_s must be >= 0")
    rows = _rows(params, power_w, state, p_hi_w, wake_left_s)
    return _fall(params, rows).at(horizon_s), _rise(params, rows).at(horizon_s)


def physical_min_s(
    params: FleetParams,
    power_w: npt.ArrayLike,
    state: npt.ArrayLike,
    target_w: float,
    tol_w: float,
    *,
    other_w: float = 0.0,
    p_hi_w: npt.ArrayLike | None = None,
    wake_left_s: npt.ArrayLike | None = None,
    horizon_s: float = 3600.0,
    resolution_s: float = 1e-3,
) -> float:
    """Least ``t >= 0`` at which the site could be inside ``[target - tol, target + tol]``.

    Site power is device power plus `other_w` (the non-flexible load, held constant). Returns
    0.0 when the site is inside the band now and ``math.inf`` when even `horizon_s` is not
    enough; otherwise a time at most `resolution_s` below the exact bound (never above it).
    """
    if not (math.isfinite(target_w) and math.isfinite(other_w)):
        raise ValueError("target_w and other_w must be finite")
    if not tol_w >= 0.0:
        raise ValueError("tol_w must be >= 0")
    if not (horizon_s >= 0.0 and resolution_s > 0.0):
        raise ValueError("horizon_s must be >= 0 and resolution_s > 0")
    rows = _rows(params, power_w, state, p_hi_w, wake_left_s)
    now = float(rows.p.sum()) + other_w
    if target_w - tol_w <= now <= target_w + tol_w:
        return 0.0
    # Every row's range starts at its present power, so HI(t) >= P0 >= LO(t): above the band
    # only LO can bring the site in, below it only HI.
    if now > target_w + tol_w:
        fall = _fall(params, rows)
        buf = np.empty_like(fall.p)
        need = target_w + tol_w - other_w

        def inside(t: float) -> bool:
            return fall.at(t, buf) <= need
    else:
        rise = _rise(params, rows)
        buf = np.empty_like(rise.p)
        need = target_w - tol_w - other_w

        def inside(t: float) -> bool:
            return rise.at(t, buf) >= need

    if not inside(horizon_s):
        return math.inf
    a, b = 0.0, float(horizon_s)  # inside(a) is False, inside(b) is True
    while b - a > resolution_s:
        mid = 0.5 * (a + b)
        if inside(mid):
            b = mid
        else:
            a = mid
    return a
