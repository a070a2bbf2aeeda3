"""Per-device power prediction: dead time + ramp-rate limits, corrected by polls.

A device follows the setpoint commanded ``dead_time_s`` ago, moving toward it at most at its
ramp rates. The last K setpoint vectors sit in a ring buffer; each device reads the row of its
own delay. Fleets have few distinct dead times (one per device class), so the most common
delay reads one whole row and the other classes patch their rows in; with many distinct
delays it falls back to one fancy-index gather. Either way the whole fleet advances in a
handful of vector operations.
Timing convention: during the cycle (t[k-1], t[k]] a device with a delay of d cycles follows
the setpoint commanded at step k-1-d (d = 0: the one sent right after the previous step).

Poll correction. A poll sets the prediction to the measured power. What the model got wrong
is kept as a per-device offset, ``bias = measured - model``, until the next poll, so
``pred = model + bias``: the device continues from where it was measured. Relaxing back to
the bare model instead would be wrong for any steady mismatch (a device that runs 5 % above
its setpoint stays there): every poll would then make the prediction jump up and fall back,
and that sawtooth biases the meter residual by mismatch x power / poll period (40 kW on a
50 x 250 kW site polled each second), a steady error the observer cannot see. The offset is
also what the allocator subtracts to turn a power target into setpoints.

Caps. A device whose setpoint is a ceiling (a GPU rack's power cap: it draws what its job
needs, up to the cap) is not offset by a constant: a poll at rest that reads clearly below
the cap is its demand, and the prediction is ``min(model, demand)`` from then on (its offset
follows the model: 0 once the cap is below the demand). A constant offset would be wrong the
moment the cap moves below the demand: the site would be predicted to drop by more than it
does, and the fleet would hunt.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from controller.control.types import F64, FleetParams, Rows

I64 = np.int64


class DelayModel:
    """The fleet's setpoint-following model and its poll offsets; ``pred = model + bias``."""

    MAX_CLASSES = 4
    """Up to this many distinct delays, blend whole ring rows; above, gather per device."""

    def __init__(self, params: FleetParams, *, max_dead_time_s: float, cycle_s: float) -> None:
        if not cycle_s > 0:
            raise ValueError("cycle_s must be > 0")
        if not max_dead_time_s >= 0:
            raise ValueError("max_dead_time_s must be >= 0")
        n = params.n
        self.n = n
        # Dead times above the cap are modelled as the cap (the ring would grow unbounded).
        self._dead_s = np.minimum(params.dead_time_s, max_dead_time_s)
        longest = float(self._dead_s.max()) if n else 0.0
        # One spare slot for cycles shorter than nominal (jitter), one for the current command.
        self.k = math.ceil(longest / cycle_s - 1e-9) + 2
        self._ring = np.zeros((self.k, n))
        self._flat = self._ring.reshape(-1)
        self._head = 0
        self._ru = params.ramp_up_w_s
        self._rd = params.ramp_down_w_s
        self.model: F64 = np.zeros(n)
        """Dead time + ramp response to the setpoints (no poll offset)."""
        self.bias: F64 = np.zeros(n)
        """measured - model at the last poll; 0 on fixed rows."""
        self.bias_sum = 0.0
        self._commits = 0
        self.delay = np.zeros(n, dtype=I64)
        """Dead time in whole cycles at the current dt."""
        self.up_step_w: F64 = np.zeros(n)
        """ramp_up * dt."""
        self.down_step_w: F64 = np.zeros(n)
        """ramp_down * dt."""
        self._blend = True
        self._major = 0
        self._minor: list[tuple[int, Rows]] = []
        self._base = np.arange(n, dtype=I64)
        self._idx = np.empty(n, dtype=I64)
        self._tmp: F64 = np.empty(n)
        capped = params.capped if params.capped is not None else np.zeros(n, dtype=np.bool_)
        self._capped = capped.copy()
        self.capped_rows: Rows = np.flatnonzero(capped)
        self.ceiling_w: F64 = np.full(self.capped_rows.size, np.inf)
        """Learned demand of each capped row (inf: at least its cap)."""
        self._cap_index = np.full(n, -1, dtype=I64)
        self._cap_index[self.capped_rows] = np.arange(self.capped_rows.size)
        self._cap_tol = 0.02 * params.p_max_w[self.capped_rows]
        self._tmp2: F64 = np.empty(n)
        self._dt = math.nan

    @property
    def pred(self) -> F64:
        """Predicted power per device (a new array)."""
        return self.model + self.bias

    def set_dt(self, dt: float) -> bool:
        """Recompute the per-device delays and ramp steps when the cycle length changes.

        Returns whether the delays (in cycles) changed.
        """
        if dt == self._dt:
            return False
        self._dt = dt
        old = self.delay.copy()
        d = np.rint(self._dead_s / dt)
        np.clip(d, 0, self.k - 1, out=d)
        self.delay[:] = d
        values, counts = np.unique(self.delay, return_counts=True)
        if values.size == 0:  # empty fleet
            self._blend, self._major, self._minor = True, 0, []
        elif values.size <= self.MAX_CLASSES:
            # The most common delay reads a whole row; the others patch their rows in.
            order = np.argsort(-counts, kind="stable")
            self._major = int(values[order[0]])
            self._minor = [(int(v), np.flatnonzero(self.delay == v)) for v in values[order[1:]]]
            self._blend = True
        else:
            self._blend = False
            # Flat ring index of device i, delay d: ((head - d) mod K) * n + i.
            self._base = np.arange(self.n, dtype=I64) - self.delay * self.n
        np.multiply(self._ru, dt, out=self.up_step_w)
        np.multiply(self._rd, dt, out=self.down_step_w)
        return not np.array_equal(old, self.delay)

    def reset(self, values_w: F64) -> None:
        """Every device is at ``values_w`` and was commanded there for as long as we remember."""
        self._ring[:] = values_w
        self.model[:] = values_w
        self.bias[:] = 0.0
        self.bias_sum = 0.0

    def reset_rows(self, rows: Rows, values_w: F64) -> None:
        """``rows`` are at ``values_w`` (one per row) and were commanded there."""
        self._ring[:, rows] = values_w
        self.model[rows] = values_w
        self._set_bias(rows, 0.0)
        idx = self._cap_index[rows]
        self.ceiling_w[idx[idx >= 0]] = np.inf

    def ceilings(self) -> F64 | None:
        """Per row, the learned demand of capped rows (p_max elsewhere stays: +inf);
        None when no row is capped."""
        if not self.capped_rows.size:
            return None
        out = np.full(self.n, np.inf)
        out[self.capped_rows] = self.ceiling_w
        return out

    def apply_ceilings(self, ctrl: npt.NDArray[np.bool_]) -> None:
        """Capped controllable rows: offset = min(0, demand - model), so pred follows
        min(model, demand). O(capped rows)."""
        rows = self.capped_rows
        if rows.size:
            off = np.minimum(self.ceiling_w - self.model[rows], 0.0)
            off *= ctrl[rows]
            self._set_bias(rows, off)

    def _set_bias(self, rows: Rows, values_w: F64 | float) -> None:
        # The sum is kept incrementally (polls touch few rows); refreshed in commit().
        self.bias_sum -= float(self.bias[rows].sum())
        self.bias[rows] = values_w
        self.bias_sum += float(self.bias[rows].sum())

    def _toward(self, shift: int, out: F64) -> F64:
        """``setpoint followed - model`` per device, ``shift`` cycles after the last step."""
        k, n, model = self.k, self.n, self.model
        if self._blend:
            ring, at = self._ring, self._head + shift
            np.subtract(ring[(at - self._major) % k], model, out=out)
            for d, rows in self._minor:
                out[rows] = ring[(at - d) % k, rows] - model[rows]
            return out
        kn = k * n
        np.add(self._base, (self._head + shift) * n + kn, out=self._idx)
        np.remainder(self._idx, kn, out=self._idx)
        np.take(self._flat, self._idx, out=out)
        out -= model
        return out

    def advance(self, up_step_w: F64, neg_down_step_w: F64) -> None:
        """Move the model one cycle toward the delayed setpoints, within the ramp steps.

        The steps are passed in (the allocator's, zero on fixed rows, which are pinned to
        their measurement anyway) so that one pair of arrays serves the whole cycle.
        """
        step = self._toward(0, self._tmp)
        np.minimum(step, up_step_w, out=step)
        np.maximum(step, neg_down_step_w, out=step)
        self.model += step

    def correct(self, rows: Rows, measured_w: F64) -> None:
        """Polls arrived for ``rows`` (``measured_w`` one per row): where the model says the
        device is at rest, the prediction there becomes the measurement.

        A reading taken while the device moves is tens of milliseconds old on arrival; at
        100 kW/s that is kW per device, and across a fleet ramping together it adds up to a
        phantom offset that the allocator would subtract (undershoot, then a bump back when
        the next, steady poll clears it). Moving devices keep their last offset instead.
        """
        rest = self._at_rest(rows)
        rows, measured_w = rows[rest], measured_w[rest]
        idx = self._cap_index[rows]
        cap = idx >= 0
        if cap.any():
            # Clearly below its cap: that is its demand. At the cap: demand unknown (>= cap).
            ci, cm = idx[cap], measured_w[cap]
            below = cm < self.model[rows[cap]] - self._cap_tol[ci]
            self.ceiling_w[ci] = np.where(below, cm, np.inf)
            rows, measured_w = rows[~cap], measured_w[~cap]
        self._set_bias(rows, measured_w - self.model[rows])

    def _at_rest(self, rows: Rows) -> npt.NDArray[np.bool_]:
        """Rows whose model sits at both the setpoint it follows and the newest setpoint."""
        k, head, model = self.k, self._head, self.model[rows]
        newest = self._ring[head, rows]
        followed = self._ring[(head - self.delay[rows]) % k, rows]
        tol = 0.5 * np.minimum(self.up_step_w[rows], self.down_step_w[rows]) + 1.0
        rest: npt.NDArray[np.bool_] = (np.abs(newest - model) <= tol) & (
            np.abs(followed - model) <= tol
        )
        return rest

    def pin(self, rows: Rows, measured_w: F64) -> None:
        """Fixed rows: the device is where it was measured, no offset."""
        self.model[rows] = measured_w
        self._set_bias(rows, 0.0)

    def ahead_sum(self, cycles: int, weights: F64, up_step_w: F64, neg_down_step_w: F64) -> float:
        """Weighted sum of the model ``cycles`` cycles from now (devices with delay >= cycles).

        Their path over that window is already decided by past setpoints. Two reads
        approximate it: one ramp step toward the setpoint followed in the first cycle, then
        up to ``cycles - 1`` steps toward the one in force at the end (exact when the
        followed setpoint changes at most once in the window, after its first cycle: slow
        devices get a new setpoint only now and then, so this is the usual case; a single
        read would see a device start moving one cycle early, a blip of one ramp step of
        the whole slow tier). In setpoint units: the poll offset is not included.
        """
        first = self._toward(1, self._tmp)
        np.minimum(first, up_step_w, out=first)
        np.maximum(first, neg_down_step_w, out=first)
        base = float(np.dot(self.model, weights)) + float(np.dot(first, weights))
        if cycles <= 1:
            return base
        # toward(c) - first = setpoint at the end - (model + first step)
        move = self._toward(cycles, self._tmp2)
        move -= first
        rest = cycles - 1
        if rest != 1:
            move *= 1.0 / rest  # clip(x, c*a, c*b) = c*clip(x/c, a, b); c comes out of the sum
        np.minimum(move, up_step_w, out=move)
        np.maximum(move, neg_down_step_w, out=move)
        return base + rest * float(np.dot(move, weights))

    def next_row(self) -> F64:
        """The ring row this step's setpoints go into (write them there: no extra copy)."""
        row: F64 = self._ring[(self._head + 1) % self.k]
        return row

    def commit(self) -> None:
        """The row from ``next_row`` now holds this step's setpoints."""
        self._head = (self._head + 1) % self.k
        self._commits += 1
        if self._commits % 1024 == 0:  # shed the rounding of the incremental sum
            self.bias_sum = float(self.bias.sum())
