"""Constrained merit-order allocation of the flexible target across the controllable devices.

Per cycle, O(N) after a priority sort that is cached until priorities change:

(a) steady-state desire D: everyone at p_min, then the rest of the target filled in merit
    order (highest priority first; lower priority is curtailed first; ties in index order),
    from one ``cumsum`` over the sorted ranges;
(b) S = clip(D, R), R = this cycle's ramp window ``[max(p_min, prev - rd*dt),
    min(p_max, prev + ru*dt)]`` (the ramp filter);
(c) the gap between the target and sum(S) is spread over the devices with headroom in R,
    in proportion to that headroom (no sort): fast devices carry the transient, and hand it
    back as the slow ones arrive, because each cycle restarts from D;
(d) a target outside ``[sum(R_lo), sum(R_hi)]`` puts everyone on that bound (saturated).

Row ceilings. A ceiling set on a row from outside (``Snapshot.row_ceiling_w``: a zone capped
by its own feed's target) lowers the top of that row's desire D to ``max(ceiling, D_lo)``, so
the fill passes the rest to the next rows in merit order (and either tier plans with the
capped row where it will be), and the top of its window R to ``max(ceiling, R_lo)``: it
comes down at its own ramp rate, never below p_min. Ceilings change rarely (a new target):
a change rebuilds the cached fill, O(N), like new priorities.

Tiers. When the controllable devices do not share one dead time, step (c) runs per tier:
the *fast* tier (the shortest dead time, in cycles) and the *slow* tier (the rest). The slow
tier closes its own gap against ``F - sum(D_fast)`` in setpoints, so the fleet still moves in
parallel. The fast tier closes its gap against the slow tier's *predicted power* when the fast
tier's command lands, not against the slow tier's setpoints: a setpoint sent to a slow device
becomes power only after its dead time, and handing back on setpoints would let the site swing
back before the slow devices got there. The fast tier's gap depends only on predictions of
devices it cannot influence, so this feed-forward cannot wind up. With one dead time there
is one tier and this is exactly (a)-(d).

Quantized devices (``step_w > 0``) get their share floored to a multiple of ``step_w``: this is
the only place setpoints are quantized (commands go out as planned). The remainder goes to
continuous devices within their ramp window, then whatever is left bumps quantized devices one
step in index order while it fits, so the total lands less than one step below the target.

Speed. Every per-device array is full length (N); rows that are not controllable have zero
bounds, zero ramp steps and zero internal setpoint, so they drop out of sums without masking.
At 100k devices each vector pass costs ~0.1 ms (memory bound), so passes are counted: D is
never materialised (``S = clip(level + p_min - cum_before, R)`` is the same number, because
R lies inside [p_min, p_max]), the fast tier's share of D comes from binary searches in the
cached cumulative ranges, and a state change updates only the rows that changed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller.control.types import F64, I32, Bool, FleetParams

I64A = npt.NDArray[np.int64]

_QEPS = 1e-9  # a value on the grid stays on it through float rounding
_MICRO_W = 2.0**-20  # "step" of continuous rows, ~1e-6 W
_DEFICIT_W = 1e-3  # quantization remainder below this is rounding, not worth a pass


def merit_order(priority: I32) -> npt.NDArray[np.intp]:
    """Rows by descending priority (filled first), ties in index order."""
    return np.argsort(-priority.astype(np.int64), kind="stable")


def _tol(*values: float) -> float:
    return 1e-9 * max(1.0, *(abs(v) for v in values))


def _coef(gap: float, up: float, down: float) -> tuple[float, float]:
    """Fractions of each row's up / down headroom that close ``gap`` (or all of it)."""
    if gap > 0.0 and up > 0.0:
        return min(gap, up) / up, 0.0
    if gap < 0.0 and down > 0.0:
        return 0.0, min(-gap, down) / down
    return 0.0, 0.0


class Allocator:
    """Workspace and caches of the allocation; one instance per controller.

    The merit-order cumsums cover the whole fleet and change only with priorities. Rows that
    are not controllable are taken out of the fill by a correction computed from those rows
    alone (their intervals on the cumulative axis), so a device changing state costs a few
    sparse updates, not a rebuild. Call ``set_delays``/``set_ramps`` when dt changes and
    ``set_ctrl`` when the controllable rows change, then ``allocate`` and ``quantize``.
    """

    def __init__(self, params: FleetParams, desire_bounds: tuple[F64, F64] | None = None) -> None:
        n = params.n
        self.n = n
        self._p_max = params.p_max_w
        # The steady-state desire fills [d_min, d_max] (inside the device bounds): a fast
        # reserve keeps a slice at either end free; transients may still use it.
        d_min, d_max = desire_bounds or (params.p_min_w, params.p_max_w)
        self.reserve = desire_bounds is not None
        self._narrow = self.reserve
        """D's bounds lie inside the devices' (a reserve, or row ceilings): clip D to them."""
        self._p_min = d_min
        self._p_min_dev = params.p_min_w
        self._range = d_max - d_min
        self._d_max = d_max
        self._d_max_free = d_max  # without row ceilings
        # Controllable-masked arrays (0 on other rows), kept up to date sparsely.
        self.ctrl = np.zeros(n, dtype=np.bool_)
        self.ctrl_f: F64 = np.zeros(n)
        self.p_min_e: F64 = np.zeros(n)
        self.p_max_e: F64 = np.zeros(n)
        self.d_min_e: F64 = np.zeros(n)
        self.d_max_e: F64 = np.zeros(n)
        self.win_up_e: F64 = np.zeros(n)
        """How far a setpoint may rise this cycle: a ramp step on fast-tier rows; the whole
        range on slow-tier rows (they get their steady state at once and ramp by themselves;
        the model predicts the ramp and the fast tier covers it)."""
        self.win_down_e: F64 = np.zeros(n)
        self.up_e: F64 = np.zeros(n)
        """ramp_up * dt on controllable rows, 0 elsewhere (the model uses it too)."""
        self.neg_down_e: F64 = np.zeros(n)
        """-ramp_down * dt on controllable rows, 0 elsewhere."""
        self.fast_f: F64 = np.zeros(n)
        self.slow_f: F64 = np.zeros(n)
        self._cont_ctrl_f: F64 = np.zeros(n)
        self.sum_p_min = 0.0
        """sum of the desire floor over the controllable rows (p_min plus any down reserve)."""
        self.sum_p_max = 0.0
        """sum of p_max over the controllable rows."""
        self.sum_d_max = 0.0
        """sum of the desire ceiling over the controllable rows (p_max less any up reserve)."""
        self._fast_p_min = 0.0
        self._n_fast = 0
        self._n_slow = 0
        self._fixed: npt.NDArray[np.intp] = np.arange(n)
        # Per dt.
        self._up_step: F64 = np.zeros(n)
        self._down_step: F64 = np.zeros(n)
        self._fast_static = np.ones(n, dtype=np.bool_)  # shortest delay of the fleet
        # Rows that never set the fast tier's delay: child controllers ramp by themselves,
        # services-only rows (feeder breakers) are the grid services' alone.
        self._not_tiered = np.zeros(n, dtype=np.bool_)
        if params.services_only is not None:
            self._not_tiered |= params.services_only
        self._ramps_itself = (
            np.zeros(n, dtype=np.bool_) if params.ramps_itself is None else params.ramps_itself
        )
        self._not_tiered |= self._ramps_itself
        self._n_fast_all = n
        self._p_min_all = float(d_min.sum())
        self._p_max_all = float(params.p_max_w.sum())
        self._d_max_all = float(d_max.sum())
        self._fast_p_min_all = self._p_min_all
        self.fast_delay = 0
        self.two_tiers = False
        # Buffers.
        self.lo: F64 = np.zeros(n)
        self.hi: F64 = np.zeros(n)
        self.share: F64 = np.zeros(n)
        self.share_sum = 0.0
        """sum(share), tracked as scalars by ``allocate`` (saves a pass)."""
        self._up: F64 = np.zeros(n)
        self._down: F64 = np.zeros(n)
        self._coef: F64 = np.zeros(n)
        self._ceil: F64 = np.zeros(n)
        self._row_ceiling: F64 | None = None
        # Quantization (static). Continuous rows get a power-of-two micro-step (2**-20 W):
        # exact in binary, far below any meter, and it spares two passes per cycle.
        quantized = params.step_w > 0
        self.quantized = bool(quantized.any())
        self._is_q = quantized
        self._step = np.where(quantized, params.step_w, _MICRO_W)
        self._inv_step = 1.0 / self._step
        self._cont = ~quantized
        self.set_priorities(params.priority)

    # -- caches ---------------------------------------------------------------------------

    def set_priorities(self, priority: I32) -> None:
        """New merit order: the one O(N log N) sort, then the cumulative ranges."""
        if priority.shape != (self.n,):
            raise ValueError(f"priority: shape {priority.shape} != ({self.n},)")
        order = merit_order(priority)
        self._order = order
        self._inv = np.empty_like(order)
        self._inv[order] = np.arange(self.n)
        self._fill()

    def set_row_ceilings(self, row_ceiling_w: F64 | None) -> None:
        """Ceilings on single rows changed (+inf: none; None: none at all): D's top becomes
        ``max(ceiling, D_lo)`` under its own, and the cumulative ranges are rebuilt (O(N))."""
        top = self._d_max_free
        if row_ceiling_w is not None:
            top = np.minimum(top, np.maximum(row_ceiling_w, self._p_min))
        self._d_max = top
        self._narrow = self.reserve or row_ceiling_w is not None
        self._range = top - self._p_min
        self._d_max_all = float(top.sum())
        np.multiply(top, self.ctrl_f, out=self.d_max_e)
        self._recount()
        self._fill()

    def _fill(self) -> None:
        """The merit-order cumulative ranges and what depends on them."""
        order = self._order
        self._rng_s: F64 = self._range[order]
        self._cum_s: F64 = np.cumsum(self._rng_s)  # inclusive, merit order, whole fleet
        # base = p_min - range filled before the row; D = clip(level + base, p_min, p_max).
        self._base: F64 = np.empty(self.n)
        self._base[order] = self._rng_s - self._cum_s
        self._base += self._p_min
        self._static_fast_cumsum()
        self._fixed_intervals()

    @property
    def order(self) -> npt.NDArray[np.intp]:
        """Merit order: rows filled first come first."""
        return self._order

    def set_ramps(self, up_step_w: F64, down_step_w: F64) -> None:
        """Ramp steps (ramp * dt) changed with dt."""
        self._up_step = up_step_w
        self._down_step = down_step_w
        np.multiply(up_step_w, self.ctrl_f, out=self.up_e)
        np.multiply(down_step_w, self.ctrl_f, out=self.neg_down_e)
        np.negative(self.neg_down_e, out=self.neg_down_e)
        self._windows(None)

    def set_delays(self, delay: I64A) -> None:
        """Dead times in cycles changed with dt: tiers are the fleet's shortest delay class
        (fast) and the rest (slow), each restricted to the controllable rows. Rows that ramp
        by themselves are always slow: they get their steady-state share at once."""
        own = delay[~self._not_tiered]
        self.fast_delay = int(own.min()) if own.size else 0
        np.equal(delay, self.fast_delay, out=self._fast_static)
        self._fast_static &= ~self._not_tiered
        self._n_fast_all = int(np.count_nonzero(self._fast_static))
        self._fast_p_min_all = float(self._p_min[self._fast_static].sum())
        np.multiply(self._fast_static, self.ctrl_f, out=self.fast_f)
        np.subtract(self.ctrl_f, self.fast_f, out=self.slow_f)
        self._recount()
        self._static_fast_cumsum()
        self._fixed_intervals()
        self._windows(None)

    def _windows(self, rows: npt.NDArray[np.intp] | None) -> None:
        """Setpoint windows of ``rows`` (all when None); see ``win_up_e``."""
        sel = slice(None) if rows is None else rows
        span = (self.p_max_e[sel] - self.p_min_e[sel]) * self.slow_f[sel]
        fast = self.fast_f[sel]
        self.win_up_e[sel] = self.up_e[sel] * fast + span
        self.win_down_e[sel] = -self.neg_down_e[sel] * fast + span

    def set_ctrl(self, ctrl: Bool, fixed_rows: npt.NDArray[np.intp]) -> None:
        """The controllable rows changed; only the rows that flipped are touched."""
        rows = np.flatnonzero(ctrl != self.ctrl)
        on = ctrl[rows].astype(np.float64)
        self.ctrl[rows] = ctrl[rows]
        self.ctrl_f[rows] = on
        self.p_min_e[rows] = self._p_min_dev[rows] * on
        self.p_max_e[rows] = self._p_max[rows] * on
        self.d_min_e[rows] = self._p_min[rows] * on
        self.d_max_e[rows] = self._d_max[rows] * on
        self.up_e[rows] = self._up_step[rows] * on
        self.neg_down_e[rows] = -self._down_step[rows] * on
        fast = self._fast_static[rows] * on
        self.fast_f[rows] = fast
        self.slow_f[rows] = on - fast
        self._cont_ctrl_f[rows] = self._cont[rows] * on
        self._fixed = fixed_rows
        self._recount()
        self._fixed_intervals()
        self._windows(rows)

    def _recount(self) -> None:
        # Sums over the controllable rows in O(fixed rows): fleet totals minus the fixed.
        fixed = self._fixed
        fast_fixed = self._fast_static[fixed]
        n_fast_fixed = int(np.count_nonzero(fast_fixed))
        self.sum_p_min = self._p_min_all - float(self._p_min[fixed].sum())
        self.sum_p_max = self._p_max_all - float(self._p_max[fixed].sum())
        self.sum_d_max = self._d_max_all - float(self._d_max[fixed].sum())
        self._n_fast = self._n_fast_all - n_fast_fixed
        self._n_slow = (self.n - self._n_fast_all) - (fixed.size - n_fast_fixed)
        self._fast_p_min = self._fast_p_min_all - float(self._p_min[fixed[fast_fixed]].sum())
        self.two_tiers = self._n_fast > 0 and self._n_slow > 0

    def _static_fast_cumsum(self) -> None:
        self._fast_s: F64 = self._fast_static[self._order].astype(np.float64)
        self._cum_fast_s: F64 = np.cumsum(self._rng_s * self._fast_s)

    def _fixed_intervals(self) -> None:
        """Where the rows that are not controllable sit on the merit-order cumulative axis.

        Row k (in merit order) covers [cum_k - rng_k, cum_k]; a fixed row's interval gets
        nothing, so the fill level must skip it (see ``_level``).
        """
        pos = np.sort(self._inv[self._fixed])
        r = self._rng_s[pos]
        self._fx_start: F64 = self._cum_s[pos] - r
        self._fx_end: F64 = self._cum_s[pos]
        self._fx_rng: F64 = r
        before = np.cumsum(r) - r
        self._fx_before: F64 = before  # fixed range below each fixed interval
        self._fx_total = float(r.sum())
        self._fx_skip: F64 = self._fx_start - before  # controllable fill at each start
        self._fx_fast: F64 = self._fast_s[pos]
        self._fx_cum_fast: F64 = np.cumsum(r * self._fx_fast)

    # -- per cycle ------------------------------------------------------------------------

    def _level(self, need_w: float) -> float:
        """Fill level on the whole-fleet cumulative axis that gives the controllable rows
        ``need_w`` above their p_min: ``need`` plus the fixed intervals below it."""
        k = int(np.searchsorted(self._fx_skip, need_w, side="left"))
        return need_w + (float(self._fx_before[k]) if k < self._fx_rng.size else self._fx_total)

    def desire(self, flex_w: float) -> F64:
        """(a) The steady-state desire D for ``flex_w`` (0 on rows not controllable).

        Not used by the cycle (which folds it into S); for tests and tools.
        """
        level = self._level(flex_w - self.sum_p_min)
        return np.clip(level + self._base, self.d_min_e, self.d_max_e)

    def _fast_desire_w(self, level: float) -> float:
        """sum(D) over the fast tier at ``level``, by binary search in the cached cumsums."""
        if level <= 0.0:
            return self._fast_p_min
        full = int(np.searchsorted(self._cum_s, level, side="right"))  # rows filled entirely
        filled = float(self._cum_fast_s[full - 1]) if full else 0.0
        if full < self.n:
            below = float(self._cum_s[full - 1]) if full else 0.0
            filled += float(self._fast_s[full]) * (level - below)
        # Minus what fixed fast rows would have taken below the level.
        j = int(np.searchsorted(self._fx_end, level, side="right"))
        filled -= float(self._fx_cum_fast[j - 1]) if j else 0.0
        if j < self._fx_rng.size:
            part = min(max(level - float(self._fx_start[j]), 0.0), float(self._fx_rng[j]))
            filled -= float(self._fx_fast[j]) * part
        return self._fast_p_min + filled

    def allocate(
        self,
        flex_w: float,
        prev_w: F64,
        slow_ahead_w: float,
        row_ceiling_w: F64 | None = None,
    ) -> int:
        """(a)-(d) into ``self.share``; returns the saturation flag (-1, 0, +1).

        ``prev_w``: internal setpoints of the previous cycle, 0 on rows not controllable.
        ``slow_ahead_w``: the slow tier's predicted setpoint-model power when the fast tier's
        command lands (ignored with one tier). ``row_ceiling_w``: per row, a ceiling from
        outside (+inf: none), or None.
        """
        lo, hi, s = self.lo, self.hi, self.share
        np.add(prev_w, self.win_up_e, out=hi)
        np.minimum(hi, self.p_max_e, out=hi)
        np.subtract(prev_w, self.win_down_e, out=lo)
        np.maximum(lo, self.p_min_e, out=lo)
        self._row_ceiling = row_ceiling_w
        if row_ceiling_w is not None:
            # The top of the window, not below its bottom: ramp limits and p_min still hold.
            np.minimum(hi, np.maximum(row_ceiling_w, lo, out=self._ceil), out=hi)
        # (a)+(b): S = clip(D, R) = clip(level + base, R).
        level = self._level(flex_w - self.sum_p_min)
        np.add(self._base, level, out=s)
        if self._narrow:  # D's bounds are inside R's then: clip to them first
            np.maximum(s, self.d_min_e, out=s)
            np.minimum(s, self.d_max_e, out=s)
        np.maximum(s, lo, out=s)
        np.minimum(s, hi, out=s)
        total = float(s.sum())
        self.share_sum = total
        if self.two_tiers:
            return self._two_tiers(flex_w, total, slow_ahead_w, level)
        # (c)+(d), one tier: only the headroom on the side of the gap is needed.
        gap = flex_w - total
        tol = _tol(flex_w, total)
        if gap > 0.0:
            up = np.subtract(hi, s, out=self._up)
            room = float(up.sum())
            self.share_sum = total + min(gap, room)
            if gap >= room:
                np.copyto(s, hi)
                return 1 if gap > room + tol else 0
            up *= gap / room
            s += up
        elif gap < 0.0:
            down = np.subtract(s, lo, out=self._down)
            room = float(down.sum())
            self.share_sum = total - min(-gap, room)
            if -gap >= room:
                np.copyto(s, lo)
                return -1 if -gap > room + tol else 0
            down *= -gap / room
            s -= down
        return 0

    def _two_tiers(self, flex_w: float, total: float, slow_ahead_w: float, level: float) -> int:
        s, fast = self.share, self.fast_f
        s_fast = float(np.dot(s, fast))
        # Fast tier: the site at the fast horizon, with the slow tier's predicted power.
        gap_fast = flex_w - slow_ahead_w - s_fast
        # Slow tier: its own setpoints against what the fast tier should hold in the end.
        gap_slow = flex_w - self._fast_desire_w(level) - (total - s_fast)
        self.share_sum = total
        # Headroom only on the side(s) the gaps need (a pass each).
        up_fast = down_fast = 0.0
        if gap_fast > 0.0 or gap_slow > 0.0:
            up = np.subtract(self.hi, s, out=self._up)
            up_total, up_fast = float(up.sum()), float(np.dot(up, fast))
            cu_f, _ = _coef(max(gap_fast, 0.0), up_fast, 0.0)
            cu_s, _ = _coef(max(gap_slow, 0.0), up_total - up_fast, 0.0)
            self.share_sum += cu_f * up_fast + cu_s * (up_total - up_fast)
        if gap_fast < 0.0 or gap_slow < 0.0:
            down = np.subtract(s, self.lo, out=self._down)
            down_total, down_fast = float(down.sum()), float(np.dot(down, fast))
            _, cd_f = _coef(min(gap_fast, 0.0), 0.0, down_fast)
            _, cd_s = _coef(min(gap_slow, 0.0), 0.0, down_total - down_fast)
            self.share_sum -= cd_f * down_fast + cd_s * (down_total - down_fast)
            self._apply(down, cd_f, cd_s, add=False)
        if gap_fast > 0.0 or gap_slow > 0.0:
            self._apply(self._up, cu_f, cu_s, add=True)
        # Saturated: the site (fast tier + slow tier's predicted power) cannot get to the
        # target by the time the fast tier's command lands.
        tol = _tol(flex_w, slow_ahead_w + s_fast)
        if gap_fast > up_fast + tol:
            return 1
        if -gap_fast > down_fast + tol:
            return -1
        return 0

    def _apply(self, room: F64, c_fast: float, c_slow: float, *, add: bool) -> None:
        """share +-= room * (c_fast on fast rows, c_slow on slow rows); 0 <= c <= 1 keeps
        every row inside its window (up to rounding)."""
        if c_slow == 0.0:
            if c_fast == 0.0:
                return
            room *= self.fast_f
            room *= c_fast
        elif c_fast == 0.0:
            room *= self.slow_f
            room *= c_slow
        else:
            coef = self._coef
            np.multiply(self.fast_f, c_fast - c_slow, out=coef)
            coef += c_slow
            room *= coef
        if add:
            self.share += room
        else:
            self.share -= room

    def quantize(self, out: F64) -> None:
        """``self.share`` with quantized rows floored to their step, into ``out``.

        The remainder goes to continuous rows within their ramp window (added to
        ``self.share`` too: for them setpoint == internal setpoint), then bumps quantized
        rows one step each, in index order, while the total stays within the target. With
        two tiers each tier settles its own remainder: the fast tier's must not land on slow
        devices (it would arrive a dead time late).
        """
        share = self.share
        if not self.quantized:
            np.copyto(out, share)
            return
        # out = max(floor(share / step) * step, p_min); rows not controllable stay 0.
        np.multiply(share, self._inv_step, out=out)
        out += _QEPS
        np.floor(out, out=out)
        out *= self._step
        np.maximum(out, self.p_min_e, out=out)
        deficit = self.share_sum - float(out.sum())
        if deficit <= _DEFICIT_W:
            return
        head = np.subtract(self.hi, share, out=self._up)
        head *= self._cont_ctrl_f
        room = float(head.sum())
        if not self.two_tiers:
            given = min(deficit, room)
            if given > 0.0:
                head *= given / room
                share += head
                out += head
            if deficit - given > _DEFICIT_W:
                self._bump(out, deficit - given, self.ctrl)
            return
        fast = self.fast_f
        d_fast = float(np.dot(share, fast)) - float(np.dot(out, fast))
        d_slow = deficit - d_fast
        r_fast = float(np.dot(head, fast))
        r_slow = room - r_fast
        g_fast = min(max(d_fast, 0.0), r_fast)
        g_slow = min(max(d_slow, 0.0), r_slow)
        c_fast = g_fast / r_fast if r_fast > 0.0 else 0.0
        c_slow = g_slow / r_slow if r_slow > 0.0 else 0.0
        if c_fast or c_slow:
            np.multiply(fast, c_fast - c_slow, out=self._coef)
            self._coef += c_slow
            head *= self._coef
            share += head
            out += head
        if d_fast - g_fast > _DEFICIT_W:
            self._bump(out, d_fast - g_fast, self.ctrl & (fast > 0.0))
        if d_slow - g_slow > _DEFICIT_W:
            self._bump(out, d_slow - g_slow, self.ctrl & (self.slow_f > 0.0))

    def _bump(self, out: F64, deficit: float, rows: Bool) -> None:
        """Rare (few continuous devices): raise quantized ``rows`` one step while it fits
        (under p_max and any row ceiling)."""
        bump = np.floor(self.share * self._inv_step + _QEPS) * self._step + self._step
        top = self._p_max
        if self._row_ceiling is not None:
            top = np.minimum(top, np.maximum(self._row_ceiling, self.lo))
        cand = rows & self._is_q & (bump <= top) & (bump > out)
        inc = np.where(cand, bump - out, 0.0)
        fits = cand & (np.cumsum(inc) <= deficit + _tol(deficit))
        np.copyto(out, bump, where=fits)
