"""Meter feedback: the residual observer, the site deadband and the per-cycle ramp filter.

Why an observer and no proportional term
----------------------------------------
The meter sees a command only after the device's dead time and ramp. A proportional term on
the meter error would keep pushing during that delay and overshoot (the classic dead-time
problem). Instead the device model (predict.py) already says where the devices will be, so
the meter is only used to learn what the model does not know: the residual
``meter - sum(predicted)`` is the non-flexible load (cooling, auxiliaries) plus model error.
Low-pass filtering it and subtracting it from the target is integral action on the meter
(a Smith predictor in effect): it closes the loop without reacting to the dead time the
model already explains. The residual does not depend on the target, so allocator saturation
cannot wind it up; the clamp only guards against a wrong meter.
"""

from __future__ import annotations

import math

import numpy as np

from controller.control.types import F64


class ResidualObserver:
    """First-order low-pass of ``meter - sum(predicted)`` with time constant ``tau_s``.

    Initialised from the first valid residual (no slow start from zero); frozen while the
    meter is NaN (stale meter: the controller then runs open loop on its predictions);
    clamped to ``[lo_w, hi_w]``.
    """

    __slots__ = ("_initialised", "estimate_w", "hi_w", "lo_w", "tau_s")

    def __init__(self, tau_s: float, lo_w: float, hi_w: float) -> None:
        if not tau_s > 0:
            raise ValueError("observer tau_s must be > 0")
        if not lo_w <= hi_w:
            raise ValueError("observer clamp lo_w must not exceed hi_w")
        self.tau_s = tau_s
        self.lo_w = lo_w
        self.hi_w = hi_w
        self.estimate_w = 0.0
        self._initialised = False

    @property
    def initialised(self) -> bool:
        return self._initialised

    def update(self, meter_w: float, predicted_sum_w: float, dt: float) -> float:
        if math.isfinite(meter_w) and math.isfinite(predicted_sum_w):
            r = meter_w - predicted_sum_w
            if self._initialised:
                # Exact discretisation: stable and independent of dt for any dt > 0.
                alpha = -math.expm1(-dt / self.tau_s)
                r = self.estimate_w + alpha * (r - self.estimate_w)
            self.estimate_w = min(max(r, self.lo_w), self.hi_w)
            self._initialised = True
        return self.estimate_w


class SumHistory:
    """Recent values of the predicted site sum, to compare the meter with the model *as of
    the moment the meter sampled*. Without this a meter lag of 0.1 s during a 5 MW/s ramp
    reads as 500 kW of phantom non-flexible load, and the observer turns it into overshoot.
    """

    __slots__ = ("_i", "_t", "_v")

    def __init__(self, size: int = 64) -> None:
        self._t = np.full(size, -np.inf)
        self._v = np.zeros(size)
        self._i = 0

    def push(self, t: float, value: float) -> None:
        self._t[self._i] = t
        self._v[self._i] = value
        self._i = (self._i + 1) % self._t.size

    def shift(self, delta: float) -> None:
        self._v += delta

    def at(self, t: float) -> float:
        """Linear interpolation; clamped to the oldest/newest value kept."""
        order = np.roll(np.arange(self._t.size), -self._i)  # oldest first
        ts, vs = self._t[order], self._v[order]
        known = np.isfinite(ts)
        return float(np.interp(t, ts[known], vs[known]))


class TargetDeadband:
    """Hold the flexible target while it moves less than half the site deadband.

    Meter noise passes the observer attenuated but not removed; without this every device
    would get a new setpoint each cycle for noise. The held value is never more than
    deadband/2 away from the true target, so the site stays within the deadband.
    """

    __slots__ = ("_held", "half_w")

    def __init__(self, deadband_w: float) -> None:
        if not deadband_w >= 0:
            raise ValueError("deadband_w must be >= 0")
        self.half_w = 0.5 * deadband_w
        self._held = math.nan

    def apply(self, flex_w: float) -> float:
        if not abs(flex_w - self._held) <= self.half_w:  # NaN held -> take the new value
            self._held = flex_w
        return self._held

    def reset(self) -> None:
        self._held = math.nan


def ramp_window(
    prev_w: F64,
    up_step_w: F64,
    neg_down_step_w: F64,
    p_min_w: F64,
    p_max_w: F64,
    lo_out: F64,
    hi_out: F64,
) -> None:
    """The ramp filter: where a setpoint may go this cycle, ``[lo_out, hi_out]``.

    ``lo = max(p_min, prev - ramp_down*dt)``, ``hi = min(p_max, prev + ramp_up*dt)``
    (``neg_down_step_w`` is ``-ramp_down*dt``). Precondition: ``p_min <= prev <= p_max``
    (the controller keeps its internal setpoints there), which makes ``lo <= hi``.
    """
    np.add(prev_w, neg_down_step_w, out=lo_out)
    np.maximum(lo_out, p_min_w, out=lo_out)
    np.add(prev_w, up_step_w, out=hi_out)
    np.minimum(hi_out, p_max_w, out=hi_out)
