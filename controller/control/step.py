"""The control step: snapshot + site target -> one setpoint per device.

Per cycle: advance the device model and correct it from polls (predict.py), learn the
non-flexible load from the meter residual (feedback.py), subtract it and the fixed devices'
power from the site target, rate-limit and allocate the rest (allocate.py), remember what was
commanded. Pure numpy, deterministic, no I/O; every per-device operation is vectorized and
writes into buffers allocated once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from controller.control.allocate import Allocator
from controller.control.capability import capability as _capability
from controller.control.feedback import ResidualObserver, SumHistory, TargetDeadband
from controller.control.predict import DelayModel
from controller.control.sleep import SleepPlanner
from controller.control.types import (
    F64,
    I8,
    I32,
    ON,
    Bool,
    Capability,
    FleetParams,
    Rows,
    Snapshot,
    StepResult,
)
from drivers.core.physical_min import physical_min_s as _physical_min_s

RESERVE_HORIZON_S = 5.0
TIMING_UNCERTAINTY_S = 0.1
"""How far meter and device timing may be off the model (a cycle): sets when the observer
holds (the model moving more than the deadband, or 0.5 % of the fleet, in this time)."""


def reserve_bounds(
    params: FleetParams, up_w: float, down_w: float, horizon_s: float = RESERVE_HORIZON_S
) -> tuple[F64, F64] | None:
    """Bounds of the steady-state desire that hold a fast reserve (None: no reserve).

    Each device can move ``c = min(range, rate * (horizon - dead))`` within the horizon; the
    reserve is kept as a slice of that at the top (up) and bottom (down) of every device's
    range, pro rata to ``c`` (10 % spare for devices that fail), so the devices that can
    deliver it fast hold most of it, and no device holds more than it can move in time.
    What the slices cost is running the other (slow) devices higher or lower instead.
    """
    if up_w <= 0.0 and down_w <= 0.0:
        return None
    span = params.p_max_w - params.p_min_w
    moving = np.maximum(horizon_s - params.dead_time_s, 0.0)
    c_up = np.minimum(span, params.ramp_up_w_s * moving)
    c_down = np.minimum(span, params.ramp_down_w_s * moving)
    r_up = c_up * min(1.0, 1.1 * up_w / max(float(c_up.sum()), 1e-9))
    r_down = c_down * min(1.0, 1.1 * down_w / max(float(c_down.sum()), 1e-9))
    both = r_up + r_down
    scale = np.where(both > span, span / np.maximum(both, 1e-12), 1.0)
    r_up, r_down = r_up * scale, r_down * scale
    # A quantized device holds whole steps or nothing: a sliver below one step would only
    # floor its steady state a whole step down.
    q = params.step_w > 0
    if q.any():
        step = np.where(q, params.step_w, 1.0)
        r_up = np.where(q, np.floor(r_up / step + 1e-9) * step, r_up)
        r_down = np.where(q, np.floor(r_down / step + 1e-9) * step, r_down)
    return params.p_min_w + r_down, params.p_max_w - r_up


def effective_params(params: FleetParams) -> FleetParams:
    """``params`` with quantized devices' p_max floored to their grid (not below p_min)."""
    q = params.step_w > 0
    if not q.any():
        return params
    step = np.where(q, params.step_w, 1.0)
    top = np.maximum(np.floor(params.p_max_w / step + 1e-9) * step, params.p_min_w)
    return dataclasses.replace(params, p_max_w=np.where(q, top, params.p_max_w))


def _landing_lead_s(drop_w: F64, landing_s: F64, rate_w_s: float) -> float:
    """How early the fast tier should start rising to meet the sleep drops ahead.

    Sleeps land as a staircase (acks come in over a command burst); the fast tier can only
    ramp at ``rate_w_s``. Started at the first landing, it would be late at landing i by
    ``C_i / rate - (t_i - t_1)`` (``C_i``: the drop so far); starting the worst of that early
    meets every landing. The site then runs above the target until the last sleep lands and
    is there when it does: the move is not over before that anyway, while a site left below
    it after the last landing stays out of its band until the fast tier has climbed back, so
    a shorter lead that splits the error around the staircase settles later.
    """
    due = np.isfinite(landing_s) & (drop_w > 0.0)
    if not due.any():
        return 0.0
    order = np.argsort(landing_s[due], kind="stable")
    t = landing_s[due][order]
    late = np.cumsum(drop_w[due][order]) / rate_w_s - (t - t[0])
    return max(float(late.max()), 0.0)


class Controller:
    """Moves the site's metered power to ``target_w``; one instance per fleet.

    ``deadband_w``: the site deadband; flexible-target changes below half of it are held.
    ``observer_tau_s``: time constant of the meter residual filter (the integral action).
    ``max_dead_time_s``: longest dead time modelled (larger ones are treated as this).
    ``cycle_s``: nominal cycle; sizes the setpoint history.
    ``meter_lag_s``: the meter's own latency (its sampling and averaging), added to the age
    of each reading, so the residual compares meter and model at the same instant.
    ``noncontrollable_range_w``: clamp of the non-flexible estimate (anti-windup against a
    wrong meter); default +-2x the fleet's total p_max.
    ``params`` keeps the effective parameters (quantized p_max floored to the grid);
    ``fleet_params`` the ones given.
    """

    def __init__(
        self,
        params: FleetParams,
        *,
        deadband_w: float,
        observer_tau_s: float = 1.0,
        max_dead_time_s: float = 3.0,
        cycle_s: float = 0.1,
        noncontrollable_range_w: tuple[float, float] | None = None,
        meter_lag_s: float = 0.0,
        reserve_up_w: float = 0.0,
        reserve_down_w: float = 0.0,
    ) -> None:
        n = params.n
        self.fleet_params = params
        # What the control math sees: a quantized device tops out at its highest grid point
        # (the allocator floors every setpoint to the grid), so that is its p_max here.
        params = effective_params(params)
        self.params = params
        self._model = DelayModel(params, max_dead_time_s=max_dead_time_s, cycle_s=cycle_s)
        self._alloc = Allocator(params, reserve_bounds(params, reserve_up_w, reserve_down_w))
        self.reserve_up_w = reserve_up_w
        self.reserve_down_w = reserve_down_w
        self._planner = SleepPlanner(params, self._alloc.order)
        # How far each device ramps down by each time a sleep could land (the fleet's
        # distinct sleep latencies): a mixed fleet's sleepers land seconds or minutes out.
        self._sleep_moving_w = [
            params.ramp_down_w_s * np.maximum(by_s - params.dead_time_s, 0.0)
            for by_s in self._planner.landings.tolist()
        ]
        if noncontrollable_range_w is None:
            span = 2.0 * max(float(params.p_max_w.sum()), 1.0)
            noncontrollable_range_w = (-span, span)
        self._observer = ResidualObserver(observer_tau_s, *noncontrollable_range_w)
        self._hold = TargetDeadband(deadband_w)
        self._history = SumHistory()
        self._meter_lag_s = meter_lag_s
        # Moves smaller than the deadband or 0.5 % of the fleet per TIMING_UNCERTAINTY_S
        # are slow enough to learn from.
        self._hold_above_w = max(deadband_w, 0.005 * float(params.p_max_w.sum())) + 1.0
        self._observer_hold = 0  # cycles left with the observer held
        self._parked_motion_w = 0.0
        self._drop_soon = False
        self._last_pred_w = 0.0
        # Internal setpoint: continuous, ramp-limited, 0 on rows not controllable. What the
        # devices are told (quantized) lives in the model's ring buffer.
        self._cmd: F64 = np.zeros(n)
        self._ctrl = np.zeros(n, dtype=np.bool_)
        self._fixed_rows: Rows = np.arange(n, dtype=np.intp)
        self._fixed_w = 0.0
        self._fixed_ss_w = 0.0  # fixed power once every parked device sleeps
        self._wakeable_w = 0.0
        self._last_out: F64 = np.zeros(n)
        self._dt = math.nan
        self._started = False
        self._state: I8 | None = None
        self._row_ceiling: F64 | None = None

    # -- public API -----------------------------------------------------------------------

    @property
    def predicted_w(self) -> F64:
        """Predicted power per device at the time of the last step (a new array)."""
        return self._model.pred

    @property
    def noncontrollable_w(self) -> float:
        return self._observer.estimate_w

    def set_priorities(self, priority: I32) -> None:
        """New merit order: the cached sort is rebuilt (O(N log N), once)."""
        self._alloc.set_priorities(np.asarray(priority, dtype=np.int32))
        self._planner.set_order(self._alloc.order)

    def capability(self, horizons_s: tuple[float, ...] = (1.0, 5.0, 60.0)) -> Capability:
        """Reachable power from the last step's state (nothing offered before the first);
        a row under a ceiling offers up to it only."""
        p_hi = self._model.ceilings()
        rc = self._row_ceiling
        if rc is not None:
            p_hi = rc if p_hi is None else np.minimum(p_hi, rc)
        return _capability(
            self.params,
            self._model.pred,
            self._ctrl,
            self._fixed_w,
            self._observer.estimate_w,
            horizons_s,
            wakeable_w=self._wakeable_w,
            asleep_floor_w=self._fixed_ss_w,
            p_hi_w=p_hi,
        )

    def physical_min_s(self, target_w: float, tol_w: float) -> float:
        """Least time in which the fleet could bring the site within ``tol_w`` of
        ``target_w`` from the last step's state (a bound no controller beats; inf: out of
        reach; 0: inside now). Wakes under way count as just started (a lower bound)."""
        if self._state is None:
            return math.inf
        model = self._model
        p_hi = np.full(self.params.n, np.nan)
        p_hi[model.capped_rows] = np.where(np.isfinite(model.ceiling_w), model.ceiling_w, np.nan)
        if self._row_ceiling is not None:  # NaN: no bound (fmin takes the other)
            p_hi = np.fmin(p_hi, np.where(np.isinf(self._row_ceiling), np.nan, self._row_ceiling))
        return _physical_min_s(
            self.fleet_params,
            model.pred,
            self._state,
            target_w,
            tol_w,
            other_w=self._observer.estimate_w,
            p_hi_w=p_hi,
        )

    def step(self, snap: Snapshot, target_w: float, dt: float) -> StepResult:
        if not (dt > 0.0 and math.isfinite(dt)):
            raise ValueError(f"dt must be a positive number of seconds, got {dt!r}")
        if not math.isfinite(target_w):
            raise ValueError(f"target_w must be finite, got {target_w!r}")
        p, model, alloc = self.params, self._model, self._alloc
        if snap.measured_w.shape != (p.n,) or snap.state.shape != (p.n,):
            raise ValueError("snapshot arrays do not match the fleet size")

        measured = snap.measured_w  # read only where it is used: polled, fixed, new rows
        self._state = snap.state
        rc = snap.row_ceiling_w
        if rc is not self._row_ceiling:  # a new array: new ceilings (rare)
            if rc is not None and rc.shape != (p.n,):
                raise ValueError("snapshot row ceilings do not match the fleet size")
            alloc.set_row_ceilings(rc)
            self._row_ceiling = rc
        ctrl = snap.state == ON
        if snap.held is not None:
            ctrl &= ~snap.held
        planner = self._planner
        if planner.any:
            planner.observe(snap.state, ctrl)
            if self._started and self._observer.initialised:
                self._plan(snap, target_w)
            planner.note_delivery(snap.acked_sleep, snap.t, dt)
            ctrl = ctrl & ~planner.parked

        # 1. Device model: where is each device now?
        if dt != self._dt:
            self._dt = dt
            if model.set_dt(dt):
                alloc.set_delays(model.delay)
            alloc.set_ramps(model.up_step_w, model.down_step_w)
        if self._started:
            model.advance(alloc.up_e, alloc.neg_down_e)
            model.apply_ceilings(self._ctrl)
            advanced_sum = float(model.model.sum()) + model.bias_sum
        else:
            first = np.nan_to_num(measured, nan=0.0, posinf=0.0, neginf=0.0)
            model.reset(first)  # never commanded: "previous setpoint" = where it is
            self._last_out = first.copy()
        if not self._started or not np.array_equal(ctrl, self._ctrl):
            self._on_ctrl_change(ctrl, measured)
        polled = np.flatnonzero(snap.new_reading)
        if polled.size:
            model.correct(polled, self._readings(measured, polled))
        fixed = self._fixed_rows
        self._parked_motion_w, self._drop_soon = 0.0, False
        if fixed.size:
            values = self._readings(measured, fixed)
            if planner.any:
                self._parked_values(snap, fixed, values, dt)
            else:
                self._fixed_w = self._fixed_ss_w = float(values.sum())
                self._wakeable_w = 0.0
            model.pin(fixed, values)  # fixed devices are where they were measured
        else:
            self._fixed_w = self._fixed_ss_w = self._wakeable_w = 0.0
        model.apply_ceilings(ctrl)
        if self._started:
            advanced_sum += self._parked_motion_w
        bias_w = model.bias_sum
        pred_sum = float(model.model.sum()) + bias_w

        # 2. Meter feedback: non-flexible load + model error. The poll offsets are power the
        # devices draw beyond their setpoints, so they come off the setpoint total.
        if self._started:
            # Corrections (polls, state changes) are news about the past too, not a change
            # of power now: apply them to the history the meter is compared against.
            self._history.shift(pred_sum - advanced_sum)
        self._history.push(snap.t, pred_sum)
        meter_t = snap.t - snap.meter_age_s - self._meter_lag_s
        model_then = self._history.at(meter_t)
        # While the fleet moves fast, a timing error of the meter or of a device's dead
        # time (tens of ms) reads as a phantom change of the non-flexible load, which the
        # observer would keep after the move; it holds its estimate until the fleet has
        # slowed and the meter has caught up with the move.
        if self._started and (
            self._drop_soon
            or abs(advanced_sum - self._last_pred_w) * (TIMING_UNCERTAINTY_S / dt)
            > self._hold_above_w
        ):
            lag = snap.meter_age_s + self._meter_lag_s + TIMING_UNCERTAINTY_S
            self._observer_hold = math.ceil(lag / dt)
        if self._observer.initialised and self._observer_hold > 0:
            self._observer_hold -= 1
            nc = self._observer.estimate_w
        else:
            nc = self._observer.update(snap.meter_w, model_then, dt)
        self._last_pred_w = pred_sum
        flex = self._hold.apply(target_w - nc - self._fixed_w - bias_w)

        # 3. Ramp filter and allocation.
        slow_ahead = 0.0
        if alloc.two_tiers:
            slow_ahead = model.ahead_sum(
                alloc.fast_delay + 1, alloc.slow_f, alloc.up_e, alloc.neg_down_e
            )
        saturated = alloc.allocate(flex, self._cmd, slow_ahead, rc)
        out = model.next_row()
        alloc.quantize(out)

        # 4. Commit: only controllable rows move; the others keep their last setpoint.
        if fixed.size:
            out[fixed] = self._last_out[fixed]
        setpoints = out.copy()
        if snap.delivered_w is not None:
            # The model follows what devices acknowledged; a decision still in a driver's
            # pending slot has not happened yet (rows never acknowledged follow the decision).
            np.copyto(out, snap.delivered_w, where=np.isfinite(snap.delivered_w))
        self._cmd, alloc.share = alloc.share, self._cmd  # swap buffers, no copy
        model.commit()
        self._last_out = setpoints
        self._started = True
        commanded = ctrl | planner.parked | planner.woken if planner.any else ctrl
        return StepResult(
            setpoints_w=setpoints,
            flex_target_w=flex,
            predicted_site_w=pred_sum + nc,
            noncontrollable_w=nc,
            saturated=saturated,
            controllable=ctrl,
            commanded=commanded,
            parked=int(np.count_nonzero(planner.parked)) if planner.any else 0,
            waking=int(np.count_nonzero(planner.woken)) if planner.any else 0,
            sleep=planner.parked.copy() if planner.any else None,
        )

    # -- internals ------------------------------------------------------------------------

    def _plan(self, snap: Snapshot, target_w: float) -> None:
        """Sleep or wake whole devices when the target leaves what the awake ones can do.

        Uses the previous cycle's estimates (non-flexible load, offsets, the fixed power in
        steady state): they move slowly, and deciding before this cycle's allocation lets
        the commands go out now.
        """
        alloc, planner, p, model = self._alloc, self._planner, self.params, self._model
        other_w = self._observer.estimate_w + self._fixed_ss_w
        flex_ss = target_w - other_w - model.bias_sum
        hyst = max(self._hold.half_w, 1.0)
        if planner.woken.any():
            # Wakes beyond what the target needs above the awake devices' reserve top.
            surplus = alloc.sum_d_max + planner.pending_up_w(snap.state) - flex_ss
            if surplus > hyst:
                rows = planner.cancel_wakes(surplus, snap.state)
                self._last_out[rows] = p.p_idle_w[rows]
        # Cheap pre-check (O(1)): the target is below the awake floor, or below where the
        # site is predicted now (a down move under way).
        below_now = self._observer.estimate_w + self._last_pred_w - target_w > hyst
        if below_now or target_w - other_w < alloc.sum_p_min + abs(model.bias_sum) - hyst:
            pred = model.model + model.bias
            choice = self._sleep_choice(pred, other_w, target_w, hyst)
            if choice is not None:
                need_w, gain, by_s = choice
                rows = planner.park(need_w, alloc.ctrl, snap.t, pred, gain, by_s)
                self._last_out[rows] = p.p_idle_w[rows]  # planned power asleep (StepResult.sleep)
        elif planner.parked.any():
            # Above what the awake devices hold while keeping the fast reserve: wake now (a
            # wake takes minutes), so the reserve is back as early as the fleet allows.
            excess = flex_ss - alloc.sum_d_max - planner.pending_up_w(snap.state)
            if excess > hyst:
                woken = planner.unpark(excess, snap.state)
                self._last_out[woken] = p.p_max_w[woken]  # a RUN command wakes it

    def _sleep_choice(
        self, pred: F64, other_w: float, target_w: float, hyst: float
    ) -> tuple[float, F64, float] | None:
        """What to sleep now: (power to free, each row's gain, latest landing allowed), or
        None. The earliest landing time wins at which either ramping alone reaches the
        target or the sleepers landing by then do. Each time is judged against where the
        awake devices can be by then: against their floors at the slowest sleeper's landing
        (minutes on stock firmware), the fast sleepers would be sized short and the site
        would sit above the target until feedback slept the rest, seconds later.

        Where ramping can get there first, the fast devices do, and sleep only hands their
        down-reserve slice back: a batch per cycle, since each landing is a step they can
        only ramp to meet, and a small one stays inside the band. Where it cannot, the
        sleepers that land in time take the site there keeping the slice if they can, else
        with the fast devices in it (later batches hand it back). Where none can, all of
        them go, fastest first.
        """
        alloc, planner, p = self._alloc, self._planner, self.params
        best: tuple[float, F64, float] | None = None
        for by_s, moving in zip(planner.landings.tolist(), self._sleep_moving_w, strict=True):
            low = self._low_at_sleep(pred, alloc.d_min_e, moving)
            need_w = other_w + float(low.sum()) - target_w
            if need_w <= hyst:
                return None  # ramping keeping the slice gets there by then
            gain = low - p.p_idle_w
            best = (need_w, gain, math.inf)
            in_slice: tuple[float, F64] | None = None  # the fast devices in their slice
            if alloc.reserve:  # without one, the two floors are the same
                low_min = self._low_at_sleep(pred, alloc.p_min_e, moving)
                need_min_w = other_w + float(low_min.sum()) - target_w
                if need_min_w <= hyst:
                    # The next batch waits for the last one's acknowledgement: batches
                    # sent while a command burst drains would land together.
                    if planner.unacknowledged():
                        return None
                    return min(need_w, 0.5 * self._hold_above_w), gain, math.inf
                in_slice = (need_min_w, low_min - p.p_idle_w)
            if planner.covers(need_w, alloc.ctrl, gain, by_s):
                return need_w, gain, by_s
            if in_slice is not None:
                need_min_w, gain_min = in_slice
                if planner.covers(need_min_w, alloc.ctrl, gain_min, by_s):
                    return need_min_w, gain_min, by_s
        return best

    def _low_at_sleep(self, pred: F64, floor: F64, moving: F64) -> F64:
        """Each controllable device's lowest power when a sleep decided now would land,
        ramping down by ``moving`` towards ``floor``: it keeps its offset there, and a
        capped one draws min(floor, demand). Zero on the other rows."""
        model, alloc = self._model, self._alloc
        low = np.subtract(pred, moving)
        np.maximum(low, np.add(floor, model.bias), out=low)
        r = model.capped_rows
        if r.size:
            at = np.maximum(model.model[r] - moving[r], floor[r])
            low[r] = np.minimum(at, model.ceiling_w)
        low *= alloc.ctrl_f
        return low

    def _parked_values(self, snap: Snapshot, fixed: Rows, values: F64, dt: float) -> None:
        """Fixed rows the planner parked that still run draw their power until the sleep
        takes effect: ``values`` gets that for now (the model, compared with the meter);
        the fixed sum the allocation works against takes it as of when this cycle's
        commands land. Also the steady-state sum (every parked row asleep) and the power
        sleepers would add awake."""
        planner, p = self._planner, self.params
        parked = planner.parked[fixed]
        self._fixed_w = float(values.sum())
        self._fixed_ss_w = self._fixed_w
        self._wakeable_w = 0.0
        if not parked.any():
            return
        running = parked & (snap.state[fixed] == ON)
        if running.any():
            rows = fixed[running]
            now = planner.parked_power_w(rows, snap.t)
            rate_w_s = float(np.dot(self._alloc.up_e, self._alloc.fast_f)) / dt
            ahead = (self._alloc.fast_delay + 1) * dt
            if rate_w_s > 0.0:
                drop_w = now - p.p_idle_w[rows]
                ahead += _landing_lead_s(drop_w, planner.landing_s(rows), rate_w_s)
            lands = planner.parked_power_w(rows, snap.t + ahead)
            # A scheduled drop is the fleet moving, not news about the past (a poll's);
            # the observer also holds just before one, as the meter may see it first.
            self._parked_motion_w = float((now - planner.parked_power_w(rows, snap.t - dt)).sum())
            soon = planner.parked_power_w(rows, snap.t + TIMING_UNCERTAINTY_S)
            self._drop_soon = bool((soon < now).any())
            values[running] = now
            self._fixed_w = float(values.sum()) + float((lands - now).sum())
        self._fixed_ss_w = float(values.sum()) - float(
            np.sum(values - p.p_idle_w[fixed], where=parked)
        )
        asleep = parked | (planner.woken[fixed] & (snap.state[fixed] != ON))
        self._wakeable_w = float(np.sum(p.p_max_w[fixed] - values, where=asleep))

    def _readings(self, measured: F64, rows: Rows) -> F64:
        """``measured[rows]``; a NaN/inf a driver may have written reads as the prediction."""
        values = measured[rows]
        if math.isfinite(float(values.sum())):
            return values
        guess = self._model.model[rows] + self._model.bias[rows]
        return np.where(np.isfinite(values), values, guess)

    def _on_ctrl_change(self, ctrl: Bool, measured: F64) -> None:
        """Rows that just became controllable start ramping from where they really are."""
        p = self.params
        new_rows = np.flatnonzero(ctrl & ~self._ctrl)
        if new_rows.size:
            values = self._readings(measured, new_rows)
            self._cmd[new_rows] = np.clip(values, p.p_min_w[new_rows], p.p_max_w[new_rows])
            self._model.reset_rows(new_rows, values)
        self._ctrl = ctrl.copy()
        self._fixed_rows = np.flatnonzero(~ctrl)
        self._cmd[self._fixed_rows] = 0.0  # keeps fixed rows out of every sum
        self._alloc.set_ctrl(ctrl, self._fixed_rows)
