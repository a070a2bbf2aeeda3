"""The process image: one row per device, static columns from the specs and dynamic columns
written by the devices' drivers, each through a port over its own rows only.

The control cycle reads the image (copies into its snapshot) and never writes it; a driver
gets one `DevicePort` at construction, indexed by its local index 0..n-1, and cannot name
another driver's row. Rows are grouped by protocol in order of first appearance: every row
is owned by exactly one port. Nothing here loops per device on the cycle's side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from drivers.core.capability import Capabilities
from drivers.core.command import Commands, Intent
from drivers.core.spec import DeviceSpec
from drivers.core.state import F64, I8, I32, Bool, DeviceState, Rows


@dataclass(frozen=True, slots=True)
class Limits:
    """A device's bounds and ramp rates as the image holds them now."""

    p_min_w: float
    p_max_w: float
    ramp_up_w_s: float
    ramp_down_w_s: float


def _readonly(a: Rows) -> Rows:
    a = a.copy()
    a.flags.writeable = False
    return a


class ProcessImage:
    """Struct of arrays, SI units (W, s, monotonic clock).

    Static: `p_min_w, p_max_w, p_idle_w, ramp_up_w_s, ramp_down_w_s, dead_time_s, wake_s,
    sleep_s, step_w, deadband_w, priority, capped, ramps_itself` (bounds and ramp rates may be
    re-learned by a driver: `limits_version` counts such changes). Dynamic, written only by
    the owning driver's port: `measured_w`, `measured_at` (NaN: never read), `state` (what
    the driver last saw: a reading's state, or FAULT; staleness is the cycle's to compute),
    `acked_w` and `acked_intent` (the last command the device acknowledged; NaN: none).
    """

    def __init__(self, specs: Sequence[DeviceSpec]) -> None:
        n = len(specs)
        self.names: tuple[str, ...] = tuple(s.name for s in specs)
        self.kinds: tuple[str, ...] = tuple(dict.fromkeys(s.kind for s in specs))
        kind_index = {k: i for i, k in enumerate(self.kinds)}
        self.kind_id: I32 = np.array([kind_index[s.kind] for s in specs], dtype=np.int32)
        self.protocols: tuple[str, ...] = tuple(dict.fromkeys(s.protocol for s in specs))
        proto_index = {p: i for i, p in enumerate(self.protocols)}
        self.owner: I32 = np.array([proto_index[s.protocol] for s in specs], dtype=np.int32)
        """Index into `protocols` of the driver that owns each row."""
        self._rows = [_readonly(np.flatnonzero(self.owner == i)) for i in range(len(proto_index))]
        self.local: Rows = np.empty(n, dtype=np.intp)
        """Each row's index within its owner's rows."""
        for rows in self._rows:
            self.local[rows] = np.arange(len(rows))
        self.specs: tuple[DeviceSpec, ...] = tuple(specs)

        def col(attr: str) -> F64:
            return np.array([getattr(s, attr) for s in specs], dtype=np.float64)

        self.p_min_w = col("p_min_w")
        self.p_max_w = col("p_max_w")
        self.p_idle_w = col("p_idle_w")
        self.ramp_up_w_s = col("ramp_up_w_s")
        self.ramp_down_w_s = col("ramp_down_w_s")
        self.dead_time_s = col("dead_time_s")
        self.wake_s = col("wake_s")
        self.sleep_s = col("sleep_s")
        self.step_w = col("step_w")
        self.deadband_w = col("deadband_w")
        self.priority: I32 = np.array([s.priority for s in specs], dtype=np.int32)
        self.capped: Bool = np.array([s.setpoint_is_cap for s in specs], dtype=np.bool_)
        self.ramps_itself: Bool = np.array([s.ramps_itself for s in specs], dtype=np.bool_)
        self.services_only: Bool = np.array([s.services_only for s in specs], dtype=np.bool_)
        self.reports_power: Bool = np.ones(n, dtype=np.bool_)
        """False where a device's power is its driver's estimate (learned at adoption)."""
        self.capabilities: list[Capabilities | None] = [None] * n
        """What each device said it can do at adoption (None: not adopted yet)."""
        self.measured_w: F64 = np.zeros(n)
        self.measured_at: F64 = np.full(n, np.nan)
        self.state: I8 = np.full(n, DeviceState.UNKNOWN, dtype=np.int8)
        self.acked_w: F64 = np.full(n, np.nan)
        self.acked_intent: I8 = np.full(n, Intent.RUN, dtype=np.int8)
        self.limits_version = 0
        self._ported: set[str] = set()

    @property
    def n(self) -> int:
        return len(self.names)

    def rows_of(self, protocol: str) -> Rows:
        """The rows `protocol`'s driver owns (read-only)."""
        return self._rows[self.protocols.index(protocol)]

    def port(self, protocol: str) -> DevicePort:
        """The one port over `protocol`'s rows; ValueError for a second one, or a protocol
        no row uses."""
        if protocol not in self.protocols:
            raise ValueError(f"no device uses protocol {protocol!r}")
        if protocol in self._ported:
            raise ValueError(f"protocol {protocol!r} already has its port")
        self._ported.add(protocol)
        rows = self.rows_of(protocol)
        return DevicePort(self, protocol, rows, tuple(self.specs[int(r)] for r in rows))

    def route(self, cmds: Commands) -> Iterator[tuple[int, Commands]]:
        """`cmds` (by fleet row) split by owner: (owner index, commands by local index)."""
        if not len(cmds):
            return
        owners = self.owner[cmds.rows]
        local = self.local[cmds.rows]
        if len(self.protocols) == 1:
            yield 0, Commands(local, cmds.power_w, cmds.intent)
            return
        for i in np.unique(owners):
            mine = owners == i
            yield int(i), Commands(local[mine], cmds.power_w[mine], cmds.intent[mine])

    def same_devices(self, old: ProcessImage) -> tuple[Rows, Rows]:
        """(rows here, rows in `old`) of the devices both have with the same spec: a site
        file reloaded keeps what is known of them."""
        where = {name: i for i, name in enumerate(old.names)}
        pairs = [
            (i, j)
            for i, spec in enumerate(self.specs)
            if (j := where.get(spec.name)) is not None and old.specs[j] == spec
        ]
        new_rows = np.array([i for i, _ in pairs], dtype=np.intp)
        old_rows = np.array([j for _, j in pairs], dtype=np.intp)
        return new_rows, old_rows

    def carry_over(self, old: ProcessImage) -> Rows:
        """Take the readings, states, acknowledged commands and learned columns of the
        devices `old` also has (`same_devices`); returns their rows here. Before any port is
        handed out (the drivers are built on what this leaves)."""
        new_rows, old_rows = self.same_devices(old)
        for name in (
            "p_min_w", "p_max_w", "ramp_up_w_s", "ramp_down_w_s", "wake_s", "sleep_s",
            "step_w", "reports_power", "measured_w", "measured_at", "state", "acked_w",
            "acked_intent",
        ):  # fmt: skip
            getattr(self, name)[new_rows] = getattr(old, name)[old_rows]
        for i, j in zip(new_rows.tolist(), old_rows.tolist(), strict=True):
            self.capabilities[i] = old.capabilities[j]
        return new_rows

    def stale(self, now: float, max_age_s: float) -> Bool:
        """Rows whose telemetry is older than `max_age_s` or missing (FAULT rows excluded:
        a fault is news, not a lack of it)."""
        stale: Bool = ~(now - self.measured_at <= max_age_s)  # NaN compares False -> stale
        stale &= self.state != DeviceState.FAULT
        return stale


class DevicePort:
    """One driver's window on the image: what it writes, for its own rows only, by local
    index (its position in `rows`; an index past them raises IndexError)."""

    __slots__ = ("_image", "n", "protocol", "rows", "specs")

    def __init__(
        self, image: ProcessImage, protocol: str, rows: Rows, specs: tuple[DeviceSpec, ...]
    ) -> None:
        self._image = image
        self.protocol = protocol
        self.rows = rows
        """Fleet rows, read-only (for names in logs and metrics; writes go by local index)."""
        self.specs = specs
        self.n = len(rows)

    def _row(self, local: int) -> int:
        if local < 0:
            raise IndexError(f"{self.protocol}: local index {local} out of range")
        return int(self.rows[local])

    def reading(
        self, local: int, measured_w: float, state: DeviceState, at: float | None = None
    ) -> None:
        """A good reading: power, the state the device reports, and when (default now)."""
        row, image = self._row(local), self._image
        image.measured_w[row] = measured_w
        image.measured_at[row] = time.monotonic() if at is None else at
        image.state[row] = state

    def fault(self, local: int) -> None:
        """The device failed (its driver's verdict): FAULT until its next good reading."""
        self._image.state[self._row(local)] = DeviceState.FAULT

    def acknowledged(self, local: int, power_w: float, intent: Intent) -> None:
        """The device took a command: the control model follows it from now."""
        row, image = self._row(local), self._image
        image.acked_w[row] = power_w
        image.acked_intent[row] = intent

    def acked(self, local: int) -> tuple[float, Intent]:
        """The last command the device acknowledged (NaN power: none yet)."""
        row, image = self._row(local), self._image
        return float(image.acked_w[row]), Intent(int(image.acked_intent[row]))

    def measured(self, local: int) -> float:
        """The last power read (NaN: never read)."""
        row = self._row(local)
        return (
            float("nan")
            if np.isnan(self._image.measured_at[row])
            else float(self._image.measured_w[row])
        )

    def state(self, local: int) -> DeviceState:
        return DeviceState(int(self._image.state[self._row(local)]))

    def measured_at(self, local: int) -> float:
        return float(self._image.measured_at[self._row(local)])

    def limits(self, local: int) -> Limits:
        row, image = self._row(local), self._image
        return Limits(
            float(image.p_min_w[row]),
            float(image.p_max_w[row]),
            float(image.ramp_up_w_s[row]),
            float(image.ramp_down_w_s[row]),
        )

    def capabilities(self, local: int) -> Capabilities | None:
        return self._image.capabilities[self._row(local)]

    def adopted(self, local: int, caps: Capabilities) -> bool:
        """What the device said it can do, at adoption: its bounds and grid (presets are
        quanta), whether it sleeps (a device that cannot is never told to: its sleep and
        wake times become 0) and how fast, whether it reports power. Returns whether the
        control model's columns changed (`limits_version` then counts it)."""
        row, image = self._row(local), self._image
        image.capabilities[row] = caps
        image.reports_power[row] = caps.reports_power
        sleep_s = image.sleep_s[row] if caps.sleep_s is None else caps.sleep_s
        wake_s = image.wake_s[row] if caps.wake_s is None else caps.wake_s
        if not caps.can_sleep:
            sleep_s = wake_s = 0.0
        new = (caps.p_min_w, caps.p_max_w, caps.step_w, sleep_s, wake_s)
        cols = (image.p_min_w, image.p_max_w, image.step_w, image.sleep_s, image.wake_s)
        if all(float(c[row]) == v for c, v in zip(cols, new, strict=True)):
            return False
        for c, v in zip(cols, new, strict=True):
            c[row] = v
        image.limits_version += 1
        return True

    def learned_limits(self, local: int, new: Limits) -> bool:
        """Bounds and ramp rates the device reported of itself (a child rampd: its
        capability). Returns whether anything changed.

        Raises ValueError, changing nothing, unless every value is finite, ``0 <= p_min <=
        p_max`` and the ramp rates are above 0 (a device that cannot move is not a device
        with a zero ramp rate: its driver faults it instead).
        """
        values = (new.p_min_w, new.p_max_w, new.ramp_up_w_s, new.ramp_down_w_s)
        if not all(np.isfinite(v) for v in values):
            raise ValueError("learned limits must be finite")
        if not 0 <= new.p_min_w <= new.p_max_w:
            raise ValueError("learned limits need 0 <= p_min_w <= p_max_w")
        if not (new.ramp_up_w_s > 0 and new.ramp_down_w_s > 0):
            raise ValueError("learned ramp rates must be above 0")
        if new == self.limits(local):
            return False
        row, image = self._row(local), self._image
        image.p_min_w[row] = new.p_min_w
        image.p_max_w[row] = new.p_max_w
        image.ramp_up_w_s[row] = new.ramp_up_w_s
        image.ramp_down_w_s[row] = new.ramp_down_w_s
        image.limits_version += 1
        return True
