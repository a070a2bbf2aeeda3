"""What the site can reach within a horizon, up and down: what it can offer the grid.

Computed from the same arrays as the control step. A controllable device starts from its
predicted power, waits out its dead time, then ramps at its rate until its bound:
``up_i(h) = min(p_max, pred + ru * max(0, h - dead)) - pred`` and likewise down. A device that
can sleep (a miner) sheds down to ``p_idle`` once ``dead + sleep_s`` has passed, which is
usually far faster than its profiles ramp. Fixed devices (not ON) offer nothing within the
horizons, but parked or sleeping ones can be woken: they count in the steady-state maximum.
Horizons are few (3), so they broadcast as a (H, N) block.
"""

from __future__ import annotations

import numpy as np

from controller.control.types import F64, Bool, Capability, FleetParams


def capability(
    params: FleetParams,
    predicted_w: F64,
    controllable: Bool,
    fixed_w: float,
    noncontrollable_w: float,
    horizons_s: tuple[float, ...] = (1.0, 5.0, 60.0),
    *,
    wakeable_w: float = 0.0,
    asleep_floor_w: float | None = None,
    p_hi_w: F64 | None = None,
) -> Capability:
    """``wakeable_w``: what parked/sleeping devices would add at full power (beyond the
    ``fixed_w`` they draw now). ``asleep_floor_w``: fixed power in steady state when every
    parked device sleeps (default ``fixed_w``). ``p_hi_w``: a lower ceiling than p_max
    where known (a capped device's demand), else p_max."""
    h = np.asarray(horizons_s, dtype=np.float64)[:, None]
    moving = np.maximum(h - params.dead_time_s, 0.0)  # (H, N) seconds of ramping
    top = params.p_max_w if p_hi_w is None else np.clip(p_hi_w, params.p_min_w, params.p_max_w)
    # A device predicted outside its bounds (noise) offers only from the bound it will be held at.
    pred = np.clip(predicted_w, params.p_min_w, params.p_max_w)
    up = np.maximum(np.minimum(top, pred + params.ramp_up_w_s * moving) - pred, 0.0)
    floor = np.maximum(params.p_min_w, pred - params.ramp_down_w_s * moving)
    sleepable = params.sleepable & controllable
    if sleepable.any():
        asleep_by = params.dead_time_s + params.sleep_s
        floor = np.where(sleepable & (h >= asleep_by), params.p_idle_w, floor)
    down = pred - floor
    weights = controllable.astype(np.float64)
    up_w = up @ weights
    down_w = down @ weights
    base = fixed_w + noncontrollable_w
    low = np.where(sleepable, params.p_idle_w, params.p_min_w)
    base_low = (fixed_w if asleep_floor_w is None else asleep_floor_w) + noncontrollable_w
    return Capability(
        horizons_s=tuple(float(x) for x in horizons_s),
        up_w=tuple(float(x) for x in up_w),
        down_w=tuple(float(x) for x in down_w),
        min_w=base_low + float(np.sum(low, where=controllable)),
        max_w=base + wakeable_w + float(np.sum(top, where=controllable)),
    )
