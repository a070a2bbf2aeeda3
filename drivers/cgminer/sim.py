"""What the miner firmware simulators share: the physics rows they serve, and the commands they
last wrote there, by which a reboot is noticed.

A reboot is noticed at a miner's next request, also when `physics.step()` already applied it
and cleared the flag: the physics command of a row then differs from what its simulator last
wrote there. So nothing but a firmware's servers (and reboots) may write the commands of its
rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.sim.physics import SitePhysics


class MinerRows:
    """The miners at physics rows `rows` (local index k = position) as one firmware serves them."""

    def __init__(
        self,
        physics: SitePhysics,
        rows: Sequence[int],
        specs: Sequence[DeviceSpec],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(rows) != len(specs):
            raise ValueError(f"{len(rows)} rows but {len(specs)} specs")
        self.physics = physics
        self.rows: npt.NDArray[np.intp] = np.asarray(rows, dtype=np.intp)
        self.specs = tuple(specs)
        self._clock = clock
        n = len(specs)
        self.boot_t = np.full(n, clock())
        self.reboots = np.zeros(n, dtype=np.int64)
        # What this simulator last wrote into the physics commands; a difference is a reboot.
        self._sent_sp = physics.cmd_setpoint_w[self.rows].copy()
        self._sent_run = physics.cmd_run[self.rows].copy()
        self._boots_seen = physics.boots[self.rows].copy()

    def _row(self, k: int) -> int:
        return int(self.rows[k])

    def fault(self, k: int) -> int:
        return int(self.physics.fault[self._row(k)])

    def hashing(self, k: int) -> bool:
        return int(self.physics.state[self._row(k)]) == DeviceState.ON

    def elapsed(self, k: int) -> int:
        """Seconds since the miner's (simulated) boot."""
        return int(self._clock() - self.boot_t[k])

    def _command(self, k: int, setpoint_w: float | None = None, run: int | None = None) -> None:
        i = self._row(k)
        self.physics.command(i, setpoint_w=setpoint_w, run=run)
        self._sent_sp[k] = self.physics.cmd_setpoint_w[i]
        self._sent_run[k] = self.physics.cmd_run[i]

    def check_reboot(self, k: int) -> None:
        """Notice a reboot of miner k (at each request): `_restarted`, the boot clock again."""
        ph, i = self.physics, self._row(k)
        # A restart counted by the physics (however fast its step cleared the flag), or
        # commands this simulator did not write.
        flagged = bool(ph.boots[i] != self._boots_seen[k])
        changed = ph.cmd_setpoint_w[i] != self._sent_sp[k] or ph.cmd_run[i] != self._sent_run[k]
        if flagged or changed:
            self._boots_seen[k] = ph.boots[i]
            self._restarted(k, flagged)
            self._sent_sp[k] = ph.cmd_setpoint_w[i]
            self._sent_run[k] = ph.cmd_run[i]
            self.boot_t[k] = self._clock()
            self.reboots[k] += 1

    def _restarted(self, k: int, flagged: bool) -> None:
        """Miner k restarted: a firmware forgets here what a restart loses. A flagged restart
        lands now (the default target, running); physics.step() repeats it harmlessly."""
        if flagged:
            i = self._row(k)
            self._command(k, setpoint_w=float(self.physics.default_setpoint_w[i]), run=1)


__all__ = ["MinerRows"]
