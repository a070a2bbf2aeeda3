"""Which sleepable devices (miners) should sleep: the discrete layer under the allocation.

A miner's profiles cover ``[p_min, p_max]``; below that it can only sleep (``p_idle``), and
sleep is both deep and fast (``dead + sleep_s``, a few seconds) while waking is slow
(``wake_s``, minutes). The continuous allocation (allocate.py) works on the devices that are
ON and not parked; this planner moves devices between that set and sleep, by whole devices:

- park (sleep) when the flexible target, with parked devices at ``p_idle``, lies below what the
  awake devices can go down to (``sum p_min``): just enough devices, lowest merit first;
- unpark when it lies above what the awake devices and the wakes under way can reach: first
  parked devices that have not fallen asleep yet (they are back at once), then sleeping ones
  are woken, highest merit first, at once, since a wake takes minutes: started early, it is
  over early;
- cancel wakes under way that the target no longer needs (a sleep command aborts a wake):
  a woken device left to finish would come up minutes later into a site already at its
  target, and would then have to be slept again, the slowest sleeper of a mixed fleet
  setting how long the site stays above its target.

The two thresholds are ``sum p_min`` and ``sum p_max`` of the awake set, a whole range apart,
so the planner cannot chatter between them. Pure numpy, no I/O; O(N) on a cycle that
decides, O(1) on the others (the sums come from the allocator).
"""

from __future__ import annotations

import math

import numpy as np

from controller.control.types import F64, I8, Bool, FleetParams, Rows
from drivers.core.state import DeviceState

SLEEPING = int(DeviceState.SLEEPING)
WAKING = int(DeviceState.WAKING)


class SleepPlanner:
    """Parked (told to sleep) and woken (told to wake) rows, and what parked rows draw."""

    def __init__(self, params: FleetParams, order: Rows) -> None:
        self.params = params
        self.sleepable: Bool = params.sleepable
        self.any = bool(self.sleepable.any())
        n = params.n
        self.parked: Bool = np.zeros(n, dtype=np.bool_)
        """Told to sleep; out of the continuous allocation until unparked."""
        self.woken: Bool = np.zeros(n, dtype=np.bool_)
        """Told to wake, not seen ON yet."""
        self.parked_at: F64 = np.full(n, np.nan)
        """When the sleep command was acknowledged (monotonic s); inf until then."""
        self.parked_from_w: F64 = np.zeros(n)
        """Predicted power when parked: drawn until the sleep takes effect."""
        self._gain_up: F64 = np.maximum(params.p_max_w - params.p_idle_w, 0.0)
        self._asleep_after: F64 = params.dead_time_s + params.sleep_s
        self.landings: F64 = _landing_times(self._asleep_after[self.sleepable])
        """When a sleep decided now could land (s after the command), fastest first: the
        distinct sleep latencies of the fleet (at most MAX_LANDINGS of them)."""
        self._lands_by: dict[float, Bool] = {
            by_s: self.sleepable & (self._asleep_after <= by_s) for by_s in self.landings.tolist()
        }
        self.set_order(order)

    def set_order(self, order: Rows) -> None:
        """Merit order (filled first): wakes follow it, sleeps go the other way. Within a
        priority, the quickest first (to land asleep, or running again): a mixed fleet
        sheds on its fastest sleepers and comes back on its fastest wakers."""
        p = self.params
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))  # position in the merit order
        prio = p.priority.astype(np.int64)
        back_after = p.dead_time_s + p.wake_s
        self._wake_order = np.lexsort((rank, back_after, -prio))
        self._sleep_order = np.lexsort((-rank, self._asleep_after, prio))

    def observe(self, state: I8, on: Bool) -> None:
        """Follow what the devices report: a woken device seen ON is controllable again; a
        device seen asleep that nobody woke counts as parked (asleep at start, or put to
        sleep by another tool)."""
        if not self.any:
            return
        self.woken &= ~on
        asleep = (state == SLEEPING) & self.sleepable & ~self.woken & ~self.parked
        if asleep.any():
            self.parked |= asleep
            self.parked_at[asleep] = -math.inf
            self.parked_from_w[asleep] = self.params.p_idle_w[asleep]

    def note_delivery(self, acked_sleep: Bool | None, t: float, dt: float = 0.0) -> None:
        """Parked rows whose driver acknowledged the sleep start their countdown: on a big
        site the commands take a while to go out, and a drop predicted from the decision
        would come early (the fast devices would fill a hole not there yet). An ack seen
        now came within the last cycle, and the device acted before it answered: the
        countdown starts half a cycle back."""
        if not self.any:
            return
        waiting = self.parked & np.isinf(self.parked_at) & (self.parked_at > 0)
        if not waiting.any():
            return
        if acked_sleep is None:  # no acknowledgements: count from the decision
            self.parked_at[waiting] = t
            return
        acked = waiting & acked_sleep
        self.parked_at[acked] = t - 0.5 * dt

    def unacknowledged(self) -> bool:
        """Some parked row's sleep command is not acknowledged yet."""
        return bool(np.isposinf(self.parked_at).any())

    def landing_s(self, rows: Rows) -> F64:
        """When the sleep of parked ``rows`` takes effect (inf until acknowledged)."""
        return self.parked_at[rows] + self._asleep_after[rows]

    def parked_power_w(self, rows: Rows, t: float) -> F64:
        """What parked ``rows`` draw at time ``t``: their power when parked until the sleep
        takes effect, then ``p_idle``."""
        done = t >= self.landing_s(rows)
        return np.where(done, self.params.p_idle_w[rows], self.parked_from_w[rows])

    def pending_up_w(self, state: I8) -> float:
        """Power the wakes under way will add (woken rows still asleep or waking)."""
        rows = self.woken & ((state == SLEEPING) | (state == WAKING))
        return float(self._gain_up.sum(where=rows))

    def cancel_wakes(self, surplus_w: float, state: I8) -> Rows:
        """Put back to sleep woken rows not running yet whose capacity is surplus: the last
        in the wake order first, never more than ``surplus_w`` (so the target cannot need
        them again at once). Returns them; they count as asleep (they draw ``p_idle``)."""
        pending = self.woken & ((state == SLEEPING) | (state == WAKING))
        order = self._wake_order[::-1]
        cand = pending[order]
        cum = np.cumsum(np.where(cand, self._gain_up[order], 0.0))
        k = int(np.searchsorted(cum, surplus_w + 1e-9, side="right"))
        rows: Rows = order[:k][cand[:k]]
        self.woken[rows] = False
        self.parked[rows] = True
        self.parked_at[rows] = -math.inf
        self.parked_from_w[rows] = self.params.p_idle_w[rows]
        return rows

    def _landing_by(self, by_s: float) -> Bool:
        """Sleepable rows whose sleep lands within ``by_s`` of the command."""
        mask = self._lands_by.get(by_s)
        if mask is None:
            mask = self.sleepable & (self._asleep_after <= by_s)
        return mask

    def covers(self, deficit_w: float, ctrl: Bool, gain_w: F64, by_s: float) -> bool:
        """The controllable sleepable rows whose sleep lands within ``by_s`` of the command
        can free ``deficit_w`` between them, each freeing ``gain_w``."""
        return float(gain_w.sum(where=ctrl & self._landing_by(by_s))) >= deficit_w - 1e-9

    def park(
        self,
        deficit_w: float,
        ctrl: Bool,
        t: float,
        pred_w: F64,
        gain_w: F64,
        by_s: float = math.inf,
    ) -> Rows:
        """Park just enough controllable sleepable rows whose sleep lands within ``by_s``
        (lowest merit first) to free ``deficit_w``, each freeing ``gain_w``; returns them."""
        cand = ctrl & self._landing_by(by_s)
        rows, _ = _first_covering(self._sleep_order, cand, gain_w, deficit_w)
        self.parked[rows] = True
        self.woken[rows] = False
        self.parked_at[rows] = np.inf  # until the driver acknowledges (note_delivery)
        self.parked_from_w[rows] = pred_w[rows]
        return rows

    def unpark(self, excess_w: float, state: I8) -> Rows:
        """Bring back ``excess_w`` of capacity: parked rows still ON first (instant), then
        sleeping ones woken (highest merit first). Returns the woken rows."""
        asleep = (state == SLEEPING) | (state == WAKING)
        order = self._wake_order
        back, covered = _first_covering(order, self.parked & ~asleep, self._gain_up, excess_w)
        woken = np.empty(0, dtype=np.intp)
        if excess_w - covered > 0.0:
            woken, _ = _first_covering(
                order, self.parked & asleep, self._gain_up, excess_w - covered
            )
            self.woken[woken] = True
        rows = np.concatenate([back, woken])
        self.parked[rows] = False
        self.parked_at[rows] = np.nan
        return woken


MAX_LANDINGS = 8
"""Landing times the planner weighs at most: a fleet has a few firmwares, each with its own
sleep latency; learned per-device latencies are thinned to quantiles (the slowest kept)."""


def _landing_times(asleep_after: F64) -> F64:
    """The distinct values of ``asleep_after`` (to the millisecond), ascending; at most
    MAX_LANDINGS of them, always the largest."""
    if not asleep_after.size:
        return np.zeros(0)
    values = np.unique(np.round(asleep_after, 3))
    if values.size > MAX_LANDINGS:
        q = np.linspace(0.0, 1.0, MAX_LANDINGS)
        values = np.unique(np.quantile(values, q, method="higher"))
    return values


def _first_covering(order: Rows, candidate: Bool, gain_w: F64, need_w: float) -> tuple[Rows, float]:
    """The fewest candidate rows, taken in ``order``, whose gains add up to ``need_w`` (all
    of them if they cannot), and what they add up to."""
    cand = candidate[order]
    cum = np.cumsum(np.where(cand, gain_w[order], 0.0))
    k = int(np.searchsorted(cum, need_w - 1e-9, side="left")) + 1
    return order[:k][cand[:k]], float(cum[min(k, cum.size) - 1]) if cum.size else 0.0
