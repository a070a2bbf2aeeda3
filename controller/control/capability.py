"""What the site can reach within a horizon, up and down: what it can offer the grid.

Computed from the same arrays as the control step. A controllable device starts from its
predicted power, waits out its dead time, then ramps at its rate until its bound:
``up_i(h) = min(p_max, pred + ru * max(0, h - dead)) - pred`` and likewise down. Fixed devices
(not ON) offer nothing. Horizons are few (3), so they broadcast as a (H, N) block.
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
) -> Capability:
    h = np.asarray(horizons_s, dtype=np.float64)[:, None]
    moving = np.maximum(h - params.dead_time_s, 0.0)  # (H, N) seconds of ramping
    # A device predicted outside its bounds (noise) offers only from the bound it will be held at.
    pred = np.clip(predicted_w, params.p_min_w, params.p_max_w)
    up = np.minimum(params.p_max_w, pred + params.ramp_up_w_s * moving) - pred
    down = pred - np.maximum(params.p_min_w, pred - params.ramp_down_w_s * moving)
    up_w = up @ controllable.astype(np.float64)
    down_w = down @ controllable.astype(np.float64)
    base = fixed_w + noncontrollable_w
    return Capability(
        horizons_s=tuple(float(x) for x in horizons_s),
        up_w=tuple(float(x) for x in up_w),
        down_w=tuple(float(x) for x in down_w),
        min_w=base + float(np.sum(params.p_min_w, where=controllable)),
        max_w=base + float(np.sum(params.p_max_w, where=controllable)),
    )
