"""Typed device commands, and the one place that shapes them.

A command is a power in watts plus an explicit intent: RUN at that power, or SLEEP (the
device's power asleep, p_idle). Drivers act on the intent; nothing decodes sleep from a
value below p_min.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from drivers.core.state import F64, I8, Bool, Rows


class Intent(IntEnum):
    RUN = 0
    SLEEP = 1


@dataclass(frozen=True, slots=True)
class Commands:
    """Parallel arrays, one command per index: `rows` are fleet rows out of the shaper and
    a driver's local indices once routed to it (`ProcessImage.route`)."""

    rows: Rows
    power_w: F64
    intent: I8

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, which: Rows | Bool) -> Commands:
        return Commands(self.rows[which], self.power_w[which], self.intent[which])

    @classmethod
    def run(cls, rows: Rows, power_w: F64) -> Commands:
        """RUN commands at `power_w` for every row."""
        return cls(
            np.asarray(rows, dtype=np.intp),
            np.asarray(power_w, dtype=np.float64),
            np.full(len(rows), Intent.RUN, dtype=np.int8),
        )


class CommandShaper:
    """Turns the controller's planned powers into the commands that go out, vectorized over
    the fleet, and keeps what was last sent (the deadband's reference).

    Planned powers come from the allocator within each device's bounds and on its grid
    (clamping and quantization happen there, once, as part of the allocation). Shaping adds
    the intent: rows told to sleep get SLEEP at their power asleep. A command is sent when its
    intent changed or its power moved more than the device's deadband since the last one sent.
    """

    def __init__(self, p_idle_w: F64, deadband_w: F64) -> None:
        self._idle = p_idle_w
        self._deadband = deadband_w
        self.last_sent_w = np.full(len(p_idle_w), np.nan)
        self.last_sent_intent = np.full(len(p_idle_w), Intent.RUN, dtype=np.int8)

    def shape(self, rows: Rows, planned_w: F64, sleep: Bool | None) -> Commands:
        """The commands for `rows` (planned powers, and which rows are told to sleep)."""
        if sleep is None or not sleep.any():
            return Commands.run(rows, planned_w)
        intent = sleep.astype(np.int8)  # Intent.SLEEP == 1
        power = np.where(sleep, self._idle[rows], planned_w)
        return Commands(rows, power, intent)

    def changed(self, rows: Rows, planned_w: F64, sleep: Bool | None) -> Commands:
        """Of the commands for `rows`, those that must go out; recorded as sent."""
        cmd = self.shape(rows, planned_w, sleep)
        delta = np.abs(cmd.power_w - self.last_sent_w[rows])
        send = ~(delta <= self._deadband[rows])  # NaN last sent -> send
        send |= cmd.intent != self.last_sent_intent[rows]
        out = cmd.take(send)
        self.last_sent_w[out.rows] = out.power_w
        self.last_sent_intent[out.rows] = out.intent
        return out

    def carry_over(self, old: CommandShaper, rows: Rows, old_rows: Rows) -> None:
        """What `old` last sent to the same devices at `old_rows` (a reloaded site file)."""
        self.last_sent_w[rows] = old.last_sent_w[old_rows]
        self.last_sent_intent[rows] = old.last_sent_intent[old_rows]

    def forget(self, rows: Rows) -> None:
        """Force a resend (a device rebooted or reconnected and lost its setpoint)."""
        self.last_sent_w[rows] = np.nan
