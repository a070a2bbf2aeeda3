"""One task per device: the machinery every protocol driver shares, whatever its wire.

`PerDeviceDriver` owns each device's pending-command slot, one task per device (staggered polls,
latest command sent, a command stream never starving polls), the connection slots shared by all
devices (commands before polls: `drivers.slots`), backoff with jitter, FAULT after FAULT_AFTER
consecutive failures (one log line per state change, one on recovery), counters for metrics and
command-latency reporting. A dead device only ever costs its own task time.

It reads and writes the process image only through its port (`drivers.core.image`), by local
index: a reading, a fault, an acknowledged command.

Commands are verified: after a command's dead time plus its ramp (or its sleep or wake time)
and a margin of two polls, the next good reading must show the device moved (`_moved`: by
default its power reached the command, or covered half the way). A device that acknowledges
and does not move gets the command again at once; twice in a row, it is UNRESPONSIVE (out of
control and of the capability promise, one log line per change) and the command is retried
with backoff until it moves.

A protocol subclass says only what is protocol-specific: how to read one device (`_read`), how
to send it one typed command (`_command`: power and RUN/SLEEP intent), what to check in a good
reading (`_polled`: readback, using `_readback_due` and `_resend`), how to tell it moved when
its power does not say (`_moved`), which command failures are not the device's fault
(`_command_failed`), and the connections or sessions held while running (`_running`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar, Generic, TypedDict, TypeVar

import numpy as np

from drivers.base import (
    Backoff,
    CommandObserver,
    DriverError,
    PollPreempted,
    ProtocolError,
)
from drivers.core.cancellation import stop_if_cancelled
from drivers.core.command import Commands, Intent
from drivers.core.image import DevicePort
from drivers.core.state import DeviceState
from drivers.slots import COMMAND, POLL, ExchangeSlots, exchange_priority

FAULT_AFTER = 2
"""Consecutive failed polls or commands before a device is declared FAULT."""
UNRESPONSIVE_AFTER = 2
"""Consecutive acknowledged commands a device did not follow before it is UNRESPONSIVE."""
VERIFY_POLLS = 2.0
"""Margin, in poll periods, past a command's dead time and ramp before it is verified."""
MOVED_FRACTION = 0.5
"""A device moved when it covered at least this share of the way to its command."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What one good poll learned; the base writes it through the port.

    Protocols subclass it to carry what their `_polled` checks (the setpoint read back).
    """

    measured_w: float
    state: DeviceState


ReadingT = TypeVar("ReadingT", bound=Reading)


class DriverOptions(TypedDict, total=False):
    """Keyword options of every per-device driver (see `PerDeviceDriver.__init__`)."""

    max_concurrency: int | None
    poll_stretch: float
    backoff_base_s: float
    backoff_cap_s: float
    rng: random.Random | None


class PerDeviceDriver(ABC, Generic[ReadingT]):
    """Drives the devices of its port (local index 0..n-1, `port.specs` parallel)."""

    protocol: ClassVar[str]
    """First word of every log line ("modbus row-3: ...")."""
    attempt_noun: ClassVar[str] = "transactions"
    """What failed, as the FAULT line says it ("FAULT after 2 failed transactions")."""
    default_concurrency: ClassVar[int] = 32
    polls_yield_to_bursts: ClassVar[bool] = True
    """From the moment more commands are outstanding than the concurrency limit (a
    fleet-wide command) until every one is answered or held back for a retry, due polls
    wait (at most until a period overdue): a poll sent then only delays the burst, and what
    it reads is about to change anyway."""
    wake_batch: ClassVar[int] = 64
    """Device tasks woken per event-loop iteration for a burst (commands, or polls released
    after one): thousands woken at once run all their connects and parsing (about 0.1 ms of
    CPU per LuxOS miner: `rampd bench fanout`, column "cpu us/dev") before anything else
    gets the loop: the control cycle, and the answers of the fast devices (Modbus loads, GPU
    racks) carrying the same step."""
    verifies_commands: ClassVar[bool] = True
    """False for a device whose own controller answers for its moves (a child rampd)."""
    _log: ClassVar[logging.Logger]

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        name: str | None = None,
        max_concurrency: int | None = None,
        poll_stretch: float = 1.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name = port.protocol if name is None else name
        self.port = port
        n = port.n
        self._specs = port.specs
        self._p_max_w = np.array([s.p_max_w for s in port.specs])  # rated, for plausibility
        self._on_command = on_command
        self._rng = rng or random.Random()
        self._max_concurrency = (
            self.default_concurrency if max_concurrency is None else max_concurrency
        )
        self._slots = ExchangeSlots(self._max_concurrency)
        if not poll_stretch >= 1.0:
            raise ValueError(f"{name}: poll_stretch {poll_stretch!r} is below 1")
        self.poll_stretch = poll_stretch
        """Every device polls this many times its poll_s (the host's poll budget)."""
        # One pending command per device (NaN power: none), latest wins; the device's task
        # sends from it, and `submit` wakes the tasks in batches (`_wake_some`).
        self._pending_w = np.full(n, np.nan)
        self._pending_intent = np.full(n, Intent.RUN, dtype=np.int8)
        self._queued = 0  # commands pending or on their way, not answered yet
        self._sending = 0  # commands on their way: sent, or waiting for a slot
        self._deferred: list[int] = []  # devices whose poll waits for a burst to drain
        self._burst = False
        self._overdue_at = np.zeros(n)  # when the poll under way is a period overdue
        self._wake = [asyncio.Event() for _ in range(n)]
        self._backoff = Backoff(n, backoff_base_s, backoff_cap_s, self._rng)
        self._retry_at = np.zeros(n)
        self._poll_soon = np.zeros(n, dtype=np.bool_)
        self._faulted = np.zeros(n, dtype=np.bool_)
        self._bug_logged = np.zeros(n, dtype=np.bool_)
        self._readback_warned = np.zeros(n, dtype=np.bool_)
        # A readback is compared with the acknowledged command until one mismatch has been
        # resent (then again after the next acknowledgement).
        self._readback_armed = np.zeros(n, dtype=np.bool_)
        # Counters, public for metrics.
        self.polls_ok = 0
        self.poll_errors = 0
        self.commands_ok = 0
        self.command_errors = 0
        self.resends = 0
        self.errors_by_device = np.zeros(n, dtype=np.int64)
        # Verified commands: when the last acknowledged one is checked (inf: not armed), the
        # power it started from, strikes in a row, the verdict, and a retry's due time.
        self._verify_at = np.full(n, np.inf)
        self._verify_from_w = np.zeros(n)
        self._verify_cmd_w = np.zeros(n)  # the command the armed check is timed for
        self._verify_intent = np.zeros(n, dtype=np.int8)
        self._verify_tol_w = np.array(
            [max(s.step_w, 0.05 * s.p_max_w, 3.0 * s.noise_w) for s in port.specs]
        )
        self._strikes = np.zeros(n, dtype=np.int32)
        self._unresponsive = np.zeros(n, dtype=np.bool_)
        self._retry_stuck_at = np.full(n, np.inf)
        self._stuck_backoff = Backoff(n, 5.0, 300.0, self._rng)
        self.unverified = 0
        """Acknowledged commands a device did not follow (counter, for metrics)."""

    # --- what a protocol provides ---

    @abstractmethod
    async def _read(self, local: int) -> ReadingT:
        """Poll one device; raise DriverError when it fails or answers implausibly."""

    @abstractmethod
    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        """Bring one device to `power_w`, or to sleep (`intent` SLEEP); raise DriverError when
        it is not done."""

    def _polled(self, local: int, reading: ReadingT) -> None:
        """After a good poll was recorded: compare what was read back with what was sent.
        A bug here counts as a failed poll, like one in `_read`."""

    def _moved(self, local: int, reading: ReadingT, power_w: float, intent: Intent) -> bool | None:
        """Whether the device followed the command its check was armed for (`power_w`,
        `intent`), judged once that command's dead time, ramp and margin have passed (newer
        commands may have come since: `_acked`); None: cannot tell yet.

        By its power: asleep for SLEEP; running for RUN, and within the tolerance of its
        latest command (below it, for a cap) or MOVED_FRACTION of the way from where it was
        toward the armed one. A protocol whose device does not report its power judges by
        what it reads back (mode, target)."""
        spec = self._specs[local]
        tol = float(self._verify_tol_w[local])
        if intent == Intent.SLEEP:
            asleep = reading.state == DeviceState.SLEEPING
            return asleep or reading.measured_w <= spec.p_idle_w + tol
        if reading.state != DeviceState.ON:
            return False
        latest_w, _ = self._acked(local)
        err = reading.measured_w - latest_w
        if (max(err, 0.0) if spec.setpoint_is_cap else abs(err)) <= tol:
            return True
        from_w = float(self._verify_from_w[local])
        way, went = power_w - from_w, reading.measured_w - from_w
        return abs(way) > tol and went * math.copysign(1.0, way) >= MOVED_FRACTION * abs(way)

    def _command_failed(self, local: int, exc: DriverError) -> bool:
        """A command failed (and was put back): False when that is not the device's fault
        (the protocol then schedules the retry itself), True to count a device failure."""
        return True

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """What is held while the device tasks run (pools, sessions); released on the way
        out, cancellation included."""
        yield

    # --- the control cycle's side: never blocks ---

    def submit(self, commands: Commands) -> None:
        """Queue `commands` (by local index) and wake their devices' tasks."""
        local = commands.rows
        if not len(local):
            return
        self._queued += int(np.count_nonzero(np.isnan(self._pending_w[local])))
        self._pending_w[local] = commands.power_w
        self._pending_intent[local] = commands.intent
        # Sleeps first: one acts seconds after its acknowledgement, a profile or cap change
        # within a fraction of one, so in a burst larger than the concurrency limit the
        # sleeps must not wait behind the rest.
        awake = commands.intent != Intent.SLEEP
        self._wake_some(local[np.argsort(awake, kind="stable")].tolist(), 0)

    @property
    def pending(self) -> int:
        return int(np.count_nonzero(~np.isnan(self._pending_w)))

    @property
    def faulted(self) -> int:
        return int(self._faulted.sum())

    # --- tasks ---

    async def run(self) -> None:
        """Poll and send until cancelled; device failures are isolated and never raise."""
        async with self._running(), asyncio.TaskGroup() as tg:
            for local, spec in enumerate(self._specs):
                tg.create_task(self._device(local), name=f"{self.name}:{spec.name}")

    async def _device(self, local: int) -> None:
        period = self._specs[local].poll_s * self.poll_stretch
        # Stagger first polls over one period so N devices do not poll in lockstep.
        next_poll = time.monotonic() + period * local / max(len(self._specs), 1)
        while True:
            stop_if_cancelled()  # pymodbus's wait_for may have swallowed it
            now = time.monotonic()
            if now < self._retry_at[local]:
                await asyncio.sleep(self._retry_at[local] - now)
                continue
            overdue = now - next_poll > period  # a command stream must not starve polls
            if not math.isnan(self._pending_w[local]) and not overdue:
                await self._send(local)
                continue
            if (now >= next_poll or self._poll_soon[local]) and not overdue and self._bursting():
                self._deferred.append(local)  # woken when the burst drains or a command comes
                await self._until_woken(local, next_poll + period - now)
                continue
            if now >= next_poll or self._poll_soon[local]:
                self._poll_soon[local] = False
                self._overdue_at[local] = next_poll + period
                if await self._poll(local):
                    next_poll = max(next_poll + period, time.monotonic())
                continue
            await self._until_woken(local, next_poll - now)

    async def _until_woken(self, local: int, delay_s: float) -> None:
        """Until the device is woken (a command, a drained burst) or `delay_s` has passed.
        A timer that sets the event, not `asyncio.timeout`: every device waits here between
        exchanges, and a timeout costs a timer plus, when it fires, a cancellation."""
        wake = self._wake[local]
        wake.clear()
        timer = asyncio.get_running_loop().call_later(delay_s, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()

    async def _send(self, local: int) -> None:
        value = float(self._pending_w[local])
        intent = Intent(int(self._pending_intent[local]))
        self._pending_w[local] = np.nan
        t0 = time.monotonic()
        token = exchange_priority.set(COMMAND)
        self._sending += 1
        try:
            await self._command(local, value, intent)
        except Exception as caught:
            exc = self._as_driver_error(local, caught)
            self._report(time.monotonic() - t0, ok=False)
            self.command_errors += 1
            self._put_back(local, value, intent)
            if self._command_failed(local, exc):
                self._failed(local, exc)
            return
        finally:
            exchange_priority.reset(token)
            self._answered()
        self._report(time.monotonic() - t0, ok=True)
        self.commands_ok += 1
        # The control model follows what devices acknowledged, not what is still queued.
        self.port.acknowledged(local, value, intent)
        self._arm_verify(local, value, intent)
        self._readback_armed[local] = True
        self._readback_warned[local] = False
        self._backoff.succeeded(local)
        if self._faulted[local]:
            self._poll_soon[local] = True  # recovery is declared by telemetry, not a command

    async def _poll(self, local: int) -> bool:
        """One poll; False when it gave way to a command (still due)."""
        try:
            reading = await self._read(local)
            self._record(local, reading)
            self._polled(local, reading)
        except PollPreempted:
            return False
        except Exception as caught:
            self.poll_errors += 1
            self._failed(local, self._as_driver_error(local, caught))
        return True

    def _reading_at(self, local: int) -> float | None:
        """When the reading being recorded was taken (None: now)."""
        return None

    def _record(self, local: int, reading: ReadingT) -> None:
        """A good poll, through the port; it alone declares recovery from FAULT."""
        now = time.monotonic()
        if self._verify_at[local] <= now or self._retry_stuck_at[local] <= now:
            self._verify(local, reading)
        state = DeviceState.UNRESPONSIVE if self._unresponsive[local] else reading.state
        self.port.reading(local, reading.measured_w, state, self._reading_at(local))
        self.polls_ok += 1
        self._backoff.succeeded(local)
        if self._faulted[local]:
            self._faulted[local] = False
            self._log.info(
                "%s %s: recovered, state %s, %.1f kW",
                self.protocol,
                self._name(local),
                reading.state.name,
                reading.measured_w / 1e3,
            )

    # --- verified commands ---

    def _arm_verify(self, local: int, power_w: float, intent: Intent) -> None:
        """Arm the check of an acknowledged command unless one is armed: after the command's
        dead time, its ramp from the last reading (or its sleep or wake time) and
        VERIFY_POLLS polls. Newer commands never postpone an armed check (a closed loop
        trims setpoints every cycle): the device must be seen moving."""
        if not self.verifies_commands or self._verify_at[local] < np.inf:
            return
        spec = self._specs[local]
        lim = self.port.limits(local)
        now_w = self.port.measured(local)
        if math.isnan(now_w):
            now_w = power_w
        self._verify_from_w[local] = now_w
        self._verify_cmd_w[local] = power_w
        self._verify_intent[local] = intent
        if intent == Intent.SLEEP:
            move_s = spec.sleep_s
        elif self.port.state(local) in (DeviceState.SLEEPING, DeviceState.WAKING):
            # Woken, it ramps from its power asleep.
            move_s = spec.wake_s + (power_w - spec.p_idle_w) / max(lim.ramp_up_w_s, 1e-9)
        else:
            rate = lim.ramp_up_w_s if power_w > now_w else lim.ramp_down_w_s
            move_s = abs(power_w - now_w) / rate if rate > 0 else 0.0
        margin = VERIFY_POLLS * spec.poll_s * self.poll_stretch
        self._verify_at[local] = time.monotonic() + spec.dead_time_s + move_s + margin
        self._retry_stuck_at[local] = np.inf

    def _verify(self, local: int, reading: ReadingT) -> None:
        """Judge the armed command with a fresh reading; queue its retry when it did not
        take (at once the first time, then with backoff)."""
        now = time.monotonic()
        if self._retry_stuck_at[local] <= now and math.isnan(self._pending_w[local]):
            self._retry_stuck_at[local] = np.inf
            value, intent = self._acked(local)
            if not math.isnan(value):
                self._queue(local, value, intent)
                self.resends += 1
            return
        if self._verify_at[local] > now:
            return
        intent = Intent(int(self._verify_intent[local]))
        if self._acked(local)[1] != intent:  # told to sleep or wake since: check that instead
            self._verify_at[local] = np.inf
            self._arm_verify(local, *self._acked(local))
            return
        power_w = float(self._verify_cmd_w[local])
        moved = self._moved(local, reading, power_w, intent)
        if moved is None:
            return
        self._verify_at[local] = np.inf
        if moved:
            self._strikes[local] = 0
            self._stuck_backoff.succeeded(local)
            if self._unresponsive[local]:
                self._unresponsive[local] = False
                self._log.info("%s %s: follows commands again", self.protocol, self._name(local))
            return
        self.unverified += 1
        self._strikes[local] += 1
        if self._strikes[local] >= UNRESPONSIVE_AFTER and not self._unresponsive[local]:
            self._unresponsive[local] = True
            self._log.warning(
                "%s %s: UNRESPONSIVE: acknowledged %d commands in a row without moving "
                "(at %.1f kW, told %s %.1f kW); retrying with backoff",
                self.protocol,
                self._name(local),
                int(self._strikes[local]),
                reading.measured_w / 1e3,
                intent.name,
                power_w / 1e3,
            )
        delay = (
            0.0
            if self._strikes[local] < UNRESPONSIVE_AFTER
            else self._stuck_backoff.failed(local, now)
        )
        self._retry_stuck_at[local] = now + delay

    @property
    def unresponsive(self) -> int:
        return int(self._unresponsive.sum())

    def _queue(self, local: int, value_w: float, intent: Intent) -> None:
        """Queue a command of the driver's own (a retry) and wake the device's task."""
        self._queued += int(math.isnan(self._pending_w[local]))
        self._pending_w[local] = value_w
        self._pending_intent[local] = intent
        self._wake[local].set()

    # --- helpers for protocols ---

    def _name(self, local: int) -> str:
        return self._specs[local].name

    def _check_power(self, local: int, measured_w: float) -> float:
        """`measured_w`, unless no such device could draw it (garbage, a wrong unit)."""
        p_max = float(self._p_max_w[local])
        if not -0.1 * p_max <= measured_w <= 2.0 * p_max:  # NaN fails too
            raise ProtocolError(f"implausible power reading {measured_w!r} W")
        return measured_w

    def _put_back(self, local: int, value_w: float, intent: Intent) -> None:
        if math.isnan(self._pending_w[local]):  # retry later unless a newer command came
            self._pending_w[local] = value_w
            self._pending_intent[local] = intent
            self._queued += 1

    def _acked(self, local: int) -> tuple[float, Intent]:
        """The command the device last acknowledged (what a readback is compared with)."""
        return self.port.acked(local)

    def _readback_due(self, local: int) -> bool:
        """Whether a readback means anything: a command was acknowledged, its mismatch not
        resent yet (each mismatch costs one resend until it lands), nothing newer queued."""
        return bool(self._readback_armed[local]) and math.isnan(self._pending_w[local])

    def _resend(self, local: int, why: str, *args: object) -> None:
        """Queue the acknowledged command again for a device that lost it (reboot, another
        manager); warn with `why % args` once, until a command lands."""
        value, intent = self._acked(local)
        self._readback_armed[local] = False
        self._queued += int(math.isnan(self._pending_w[local]))
        self._pending_w[local] = value
        self._pending_intent[local] = intent
        self.resends += 1
        if not self._readback_warned[local]:
            self._readback_warned[local] = True
            self._log.warning(
                "%s %s: " + why + "; resending", self.protocol, self._name(local), *args
            )

    async def _take_slot(self, local: int) -> None:
        """A slot for one exchange with device `local`, at its task's priority (commands
        before polls). A poll whose device got a command while it waited gives the slot
        back and raises PollPreempted: the command goes first, the poll follows it (unless
        the poll is a period overdue). Pair with `self._slots.release()`."""
        priority = exchange_priority.get()
        await self._slots.acquire(priority)
        if priority == POLL and self._poll_yields(local):
            self._slots.release()
            raise PollPreempted

    def _poll_yields(self, local: int) -> bool:
        """Whether a poll waiting for the wire should give way (raise PollPreempted): a
        command for the device came meanwhile, and the poll is not a period overdue."""
        queued = not math.isnan(self._pending_w[local])
        return bool(queued) and time.monotonic() < self._overdue_at[local]

    # --- bookkeeping ---

    def _bursting(self) -> bool:
        """A burst starts when more commands are outstanding than the concurrency limit
        and lasts until every one is answered or held back for a retry: polls released
        while its tail is in flight put their connections and parsing between the tail's
        answers, and a dead device's command must not make every poll wait a period. A
        command whose device task is still in a poll is neither: the burst goes on."""
        if not self.polls_yield_to_bursts:
            return False
        if not self._burst:
            self._burst = self._queued > self._max_concurrency
        return self._burst

    def _answered(self) -> None:
        """A command came back (either way): once the burst has drained, the polls waiting
        for it go."""
        self._queued -= 1
        self._sending -= 1
        if self._burst and not self._sending and self._queued <= self._held_back():
            self._burst = False
            deferred, self._deferred = self._deferred, []
            self._wake_some(deferred, 0)

    def _held_back(self) -> int:
        """Commands queued for devices waiting out a retry backoff (O(n): called only when
        no command is on its way)."""
        held = ~np.isnan(self._pending_w) & (self._retry_at > time.monotonic())
        return int(np.count_nonzero(held))

    def _wake_some(self, devices: list[int], start: int) -> None:
        """Wake `devices[start:]`, `wake_batch` per loop iteration."""
        stop = start + self.wake_batch
        for i in devices[start:stop]:
            self._wake[i].set()
        if stop < len(devices):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not running: no task waits yet; each finds its command
                return
            loop.call_soon(self._wake_some, devices, stop)

    def _report(self, seconds: float, ok: bool) -> None:
        if self._on_command is not None:
            self._on_command(self.name, seconds, ok)

    def _as_driver_error(self, local: int, exc: Exception) -> DriverError:
        """A bug in our handling of one device must not take the others down: log it with its
        traceback once per device, then count it as one more failure of that device."""
        if isinstance(exc, DriverError):
            return exc
        if not self._bug_logged[local]:
            self._bug_logged[local] = True
            self._log.error(
                "%s %s: unexpected error", self.protocol, self._name(local), exc_info=exc
            )
        return DriverError(f"unexpected {type(exc).__name__}: {exc}")

    def _failed(self, local: int, exc: DriverError) -> None:
        now = time.monotonic()
        self.errors_by_device[local] += 1
        self._retry_at[local] = now + self._backoff.failed(local, now)
        failures = self._backoff.failures(local)
        if failures < FAULT_AFTER:
            return
        self.port.fault(local)
        if not self._faulted[local]:
            self._faulted[local] = True
            self._log.warning(
                "%s %s: FAULT after %d failed %s: %s",
                self.protocol,
                self._name(local),
                failures,
                self.attempt_noun,
                exc,
            )
