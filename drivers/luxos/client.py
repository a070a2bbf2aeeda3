"""LuxOS driver for ASIC miners: TCP JSON API on port 4028, one command per connection.

Every miner gets its own task: it polls `power` every poll_s (staggered over the fleet), reads
`summary` (hashrate) every `summary_every` polls and `config` (profile and curtail mode: the
readback of our commands) every `config_every` polls, and sends the latest queued setpoint.
All connections share one semaphore, so thousands of miners never open thousands of sockets
at once; every call is bounded by the miner's timeout_s.

A setpoint maps to the miner's profile ladder (fetched once per miner with `profiles`): at or
above the lowest profile's power (the row's p_min_w) the miner runs the highest profile at or
below the setpoint, waking it first if it sleeps; below it the miner is curtailed to sleep.
Privileged commands need the miner's only session: we log on once and reuse the session id,
log on again when the miner says it is invalid (it expires 60 s after its last use), and log
off on shutdown. After each first logon ATM (automatic thermal management, which would move
the profile on its own) is switched off if it is on.

State: SLEEPING when the PSU is off, WAKING while the PSU is on but the miner does not hash
yet (after a wakeup), ON when hashing, FAULT after FAULT_AFTER consecutive failed exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from contextlib import suppress

import numpy as np
import numpy.typing as npt

from controller.config import DeviceSpec
from controller.fleet import DeviceState, Fleet
from drivers.base import (
    Backoff,
    CommandMailbox,
    CommandObserver,
    DeviceTimeout,
    DriverError,
    ProtocolError,
    Rows,
)
from drivers.luxos import messages as m

F64 = npt.NDArray[np.float64]

log = logging.getLogger("rampd.drivers.luxos")

FAULT_AFTER = 2
"""Consecutive failed polls or commands before a miner is declared FAULT."""
SESSION_MARGIN_S = 2.0
"""A session unused this long past its lifetime is surely gone: log on without trying it."""


class _Exchange(asyncio.Protocol):
    """One request out, bytes in until the miner closes, sends its NUL, or ends the object.

    A bare Protocol rather than streams: this runs for every poll of every miner, and a
    connection then costs no reader, writer or task objects.
    """

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._buf += data
        nul = self._buf.find(b"\x00")
        if nul >= 0:
            self._done.set_result(bytes(self._buf[:nul]))
        elif len(self._buf) > m.MAX_MESSAGE_BYTES:
            self._done.set_exception(ProtocolError(f"reply over {m.MAX_MESSAGE_BYTES} bytes"))
        elif self._buf.rstrip().endswith(b"}"):  # cheap test before scanning the object
            try:
                end = m.object_end(self._buf)
            except ProtocolError as exc:
                self._done.set_exception(exc)
                return
            if end is not None:
                self._done.set_result(bytes(self._buf[:end]))

    def eof_received(self) -> bool:
        if not self._done.done():
            self._done.set_result(bytes(self._buf))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            if exc is None or self._buf:
                self._done.set_result(bytes(self._buf))
            else:
                self._done.set_exception(exc)


async def exchange(host: str, port: int, request: bytes, timeout_s: float) -> m.Json:
    """One request, one reply, one connection; the whole exchange within timeout_s.

    Raises DeviceTimeout, DriverError (connection refused or reset) or ProtocolError (a reply
    that is not a LuxOS JSON object).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _Exchange(request, done), host, port
            )
            data = await done
    except TimeoutError:
        raise DeviceTimeout(f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise DriverError(exc.strerror or type(exc).__name__) from None
    finally:
        if transport is not None:
            transport.close()
    if not data:
        raise ProtocolError("connection closed without a reply")
    return m.decode_reply(data)


class LuxosDriver:
    """Drives the LuxOS miners owned by this driver (global fleet `rows`, parallel `specs`)."""

    def __init__(
        self,
        name: str,
        fleet: Fleet,
        rows: npt.ArrayLike,
        specs: Sequence[DeviceSpec],
        on_command: CommandObserver | None = None,
        *,
        max_concurrency: int = 128,
        summary_every: int = 6,
        config_every: int = 6,
        session_ttl_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.rows: Rows = np.asarray(rows, dtype=np.intp)
        if len(self.rows) != len(specs):
            raise ValueError(f"{name}: {len(self.rows)} rows but {len(specs)} specs")
        n = len(specs)
        self._fleet = fleet
        self._specs = tuple(specs)
        self._on_command = on_command
        self._summary_every = max(1, summary_every)
        self._config_every = max(1, config_every)
        self._session_ttl_s = session_ttl_s
        self._rng = rng or random.Random()
        self._local_of = np.full(fleet.n, -1, dtype=np.intp)
        self._local_of[self.rows] = np.arange(n)
        self._mailbox = CommandMailbox(n)
        self._outbox = np.full(n, np.nan)  # per-miner slot the miner task sends from
        self._wake = [asyncio.Event() for _ in range(n)]
        self._backoff = Backoff(n, backoff_base_s, backoff_cap_s, self._rng)
        self._busy_backoff = Backoff(n, 1.0, 15.0, self._rng)
        self._retry_at = np.zeros(n)
        self._poll_soon = np.zeros(n, dtype=np.bool_)
        self._sem = asyncio.Semaphore(max_concurrency)
        self._faulted = np.zeros(n, dtype=np.bool_)
        self._polls = np.zeros(n, dtype=np.int64)
        # What we know of each miner; None / "" = unknown until read.
        self._profiles: list[list[m.Profile] | None] = [None] * n
        self._session: list[str] = [""] * n
        self._session_used = np.zeros(n)
        self._atm_done = np.zeros(n, dtype=np.bool_)
        self._profile: list[str] = [""] * n  # the miner's current profile
        self._curtailed: list[bool | None] = [None] * n  # the miner's curtail mode
        self._waking = np.zeros(n, dtype=np.bool_)  # woken by us, not hashing yet
        self._last_state = np.full(n, DeviceState.UNKNOWN, dtype=np.int8)  # as last polled
        self._last_value_w = np.full(n, np.nan)  # last setpoint the miner accepted
        self._readback_warned = np.zeros(n, dtype=np.bool_)
        self._busy_warned = np.zeros(n, dtype=np.bool_)
        # Telemetry beyond the fleet arrays, by local index (position in `rows`).
        self.hashrate_ths = np.full(n, np.nan)
        self.hashrate_at = np.full(n, np.nan)
        # Counters, public for metrics.
        self.polls_ok = 0
        self.poll_errors = 0
        self.commands_ok = 0
        self.command_errors = 0
        self.exchanges = 0
        self.logons = 0
        self.resends = 0
        self.errors_by_device = np.zeros(n, dtype=np.int64)

    # --- the control cycle's side: never blocks ---

    def submit(self, rows: Rows, setpoints_w: F64) -> None:
        local = self._local_of[np.asarray(rows, dtype=np.intp)]
        mine = local >= 0  # rows of other drivers are ignored, never an error here
        self._mailbox.put(local[mine], np.asarray(setpoints_w, dtype=np.float64)[mine])

    @property
    def pending(self) -> int:
        return self._mailbox.pending + int((~np.isnan(self._outbox)).sum())

    @property
    def faulted(self) -> int:
        return int(self._faulted.sum())

    def profiles(self, local: int) -> list[m.Profile] | None:
        """The cached profile ladder of a miner (lowest power first), once fetched."""
        return self._profiles[local]

    def session_id(self, local: int) -> str:
        return self._session[local]

    # --- tasks ---

    async def run(self) -> None:
        """Poll and send until cancelled; miner failures are isolated and never raise."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._dispatch(), name=f"{self.name}:dispatch")
                for local, spec in enumerate(self._specs):
                    tg.create_task(self._miner(local), name=f"{self.name}:{spec.name}")
        finally:
            await self.logoff_all()

    async def logoff_all(self) -> None:
        """Give back held sessions so another tool (or our restart) can log on; best effort."""
        held = [k for k, sid in enumerate(self._session) if sid]
        if not held:
            return
        timeout_s = 1.0 + max(self._specs[k].timeout_s for k in held)

        async def logoff(k: int) -> None:
            sid, self._session[k] = self._session[k], ""
            with suppress(DriverError):
                await self._call(k, "logoff", sid)

        with suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(logoff(k) for k in held))

    async def _dispatch(self) -> None:
        """Fan the mailbox out to per-miner slots: latest value wins in both."""
        while True:
            if not await self._mailbox.wait(1.0):
                continue
            local, values = self._mailbox.take()
            self._outbox[local] = values
            for i in local.tolist():
                self._wake[i].set()

    async def _miner(self, local: int) -> None:
        spec = self._specs[local]
        n = len(self._specs)
        # Stagger first polls over one period so N miners do not poll in lockstep.
        next_poll = time.monotonic() + spec.poll_s * local / max(n, 1)
        while True:
            now = time.monotonic()
            if now < self._retry_at[local]:
                await asyncio.sleep(self._retry_at[local] - now)
                continue
            overdue = now - next_poll > spec.poll_s  # a command stream must not starve polls
            if not np.isnan(self._outbox[local]) and not overdue:
                await self._send(local)
                continue
            if now >= next_poll or self._poll_soon[local]:
                self._poll_soon[local] = False
                await self._poll(local)
                next_poll = max(next_poll + spec.poll_s, time.monotonic())
                continue
            self._wake[local].clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(next_poll - now):
                    await self._wake[local].wait()

    # --- exchanges ---

    async def _call(self, local: int, command: str, *params: str) -> m.Json:
        """One command to one miner, reply checked (CommandError on STATUS "E")."""
        spec = self._specs[local]
        async with self._sem:
            self.exchanges += 1
            reply = await exchange(
                spec.host, spec.port, m.encode_request(command, *params), spec.timeout_s
            )
        return m.check(reply, command)

    async def _privileged(self, local: int, command: str, *params: str) -> m.Json:
        """A command that needs the session: reuse it, log on again once if it is gone."""
        for attempt in range(2):
            sid = await self._ensure_session(local)
            try:
                if not self._atm_done[local]:
                    await self._disable_atm(local, sid)
                reply = await self._call(local, command, sid, *params)
            except m.InvalidSession:
                self._session[local] = ""
                if attempt:
                    raise
                continue
            self._session_used[local] = time.monotonic()
            return reply
        raise AssertionError("unreachable")

    async def _ensure_session(self, local: int) -> str:
        now = time.monotonic()
        sid = self._session[local]
        # Certainly expired on the miner too: log on directly instead of a refused command.
        if sid and now - self._session_used[local] < self._session_ttl_s + SESSION_MARGIN_S:
            return sid
        sid = m.parse_session(await self._call(local, "logon"))
        if not sid:
            raise ProtocolError("logon returned an empty SessionID")
        self._session[local] = sid
        self._session_used[local] = time.monotonic()
        self.logons += 1
        self._busy_warned[local] = False
        return sid

    async def _disable_atm(self, local: int, sid: str) -> None:
        """ATM moves profiles with temperature and would undo ours: switch it off once."""
        try:
            enabled = m.parse_atm(await self._call(local, "atm"))
        except m.CommandError:
            enabled = False  # firmware without ATM
        if enabled:
            await self._call(local, "atmset", sid, "enabled=false")
            log.info("luxos %s: ATM disabled (it would override power targets)", self._name(local))
        self._atm_done[local] = True

    async def _ladder(self, local: int) -> list[m.Profile]:
        ladder = self._profiles[local]
        if ladder is None:
            ladder = m.parse_profiles(await self._call(local, "profiles"))
            self._profiles[local] = ladder
        return ladder

    async def _read_config(self, local: int) -> m.ConfigInfo:
        cfg = m.parse_config(await self._call(local, "config"))
        self._profile[local] = cfg.profile
        self._curtailed[local] = cfg.curtailed
        return cfg

    # --- sending ---

    async def _send(self, local: int) -> None:
        value = float(self._outbox[local])
        self._outbox[local] = np.nan
        t0 = time.monotonic()
        try:
            await self._apply(local, value)
        except m.SessionBusy as exc:
            # Someone else holds the session: not a fault of the miner; try again later.
            self._report(time.monotonic() - t0, ok=False)
            self.command_errors += 1
            self._put_back(local, value)
            now = time.monotonic()
            self._retry_at[local] = now + self._busy_backoff.failed(local, now)
            if not self._busy_warned[local]:
                self._busy_warned[local] = True
                log.warning("luxos %s: %s; retrying", self._name(local), exc)
            return
        except DriverError as exc:
            self._report(time.monotonic() - t0, ok=False)
            self.command_errors += 1
            self._put_back(local, value)
            self._curtailed[local] = None  # our view may be stale: read config before retrying
            if isinstance(exc, m.CommandError) and exc.command == "profileset":
                self._profiles[local] = None  # the ladder may have changed: fetch it again
            self._failed(local, exc)
            return
        self._report(time.monotonic() - t0, ok=True)
        self.commands_ok += 1
        self._last_value_w[local] = value
        self._readback_warned[local] = False
        self._busy_backoff.succeeded(local)
        self._succeeded(local)

    async def _apply(self, local: int, value: float) -> None:
        """Bring the miner to `value`: sleep, or wake and set the profile for it."""
        if self._curtailed[local] is None:
            await self._read_config(local)
        row = int(self.rows[local])
        if value < self._fleet.p_min_w[row]:
            if not self._curtailed[local]:
                await self._privileged(local, "curtail", m.SLEEP)
                self._curtailed[local] = True
                self._waking[local] = False
            return
        ladder = await self._ladder(local)
        target = m.choose_profile(ladder, value)
        if self._curtailed[local]:
            try:
                await self._privileged(local, "curtail", m.WAKEUP)
                self._waking[local] = True
            except m.AlreadyActive:
                pass  # woken meanwhile (a reboot, another tool): nothing to do
            self._curtailed[local] = False
            self._poll_soon[local] = True  # follow the wake closely
        if self._profile[local] != target.name:
            got = m.parse_profileset(await self._privileged(local, "profileset", target.name))
            if got != target.name:
                raise ProtocolError(f"profileset {target.name!r} answered {got!r}")
            self._profile[local] = target.name

    def _put_back(self, local: int, value: float) -> None:
        if np.isnan(self._outbox[local]):  # retry later unless a newer value came
            self._outbox[local] = value

    # --- polling ---

    async def _poll(self, local: int) -> None:
        k = int(self._polls[local])
        self._polls[local] += 1
        row = int(self.rows[local])
        try:
            power = m.parse_power(await self._call(local, "power"))
            p_max = float(self._fleet.p_max_w[row])
            if not -0.1 * p_max <= power.watts <= 2.0 * p_max:
                raise ProtocolError(f"implausible power reading {power.watts!r} W")
            last = self._last_state[local]
            if not power.psu_on:  # asleep, or a wakeup not acted on yet
                state = DeviceState.SLEEPING
                self.hashrate_ths[local] = 0.0
                self.hashrate_at[local] = time.monotonic()
            elif (
                self._waking[local]
                or last != DeviceState.ON  # waking, or powered up since (reboot, another tool)
                or k % self._summary_every == 0
            ):
                summary = m.parse_summary(await self._call(local, "summary"))
                self.hashrate_ths[local] = summary.hashrate_ths
                self.hashrate_at[local] = time.monotonic()
                hashing = summary.ghs_5s > 0
                state = DeviceState.ON if hashing else DeviceState.WAKING
                if hashing:
                    self._waking[local] = False
            else:
                state = DeviceState.ON
            cfg = None
            if k % self._config_every == self._config_every // 2 or self._curtailed[local] is None:
                cfg = await self._read_config(local)
        except DriverError as exc:
            self.poll_errors += 1
            self._failed(local, exc)
            return
        fleet = self._fleet
        fleet.measured_w[row] = power.watts
        fleet.measured_at[row] = time.monotonic()
        fleet.state[row] = state
        self._last_state[local] = state
        self.polls_ok += 1
        self._succeeded(local)
        if cfg is not None:
            self._check_readback(local, cfg)

    def _check_readback(self, local: int, cfg: m.ConfigInfo) -> None:
        """A miner that lost our command (reboot, another tool) gets it again."""
        value = self._last_value_w[local]
        if np.isnan(value) or not np.isnan(self._outbox[local]):
            return
        want_sleep = value < self._fleet.p_min_w[int(self.rows[local])]
        if want_sleep:
            ok = cfg.curtailed
        else:
            ladder = self._profiles[local]
            target = m.choose_profile(ladder, value).name if ladder else cfg.profile
            ok = not cfg.curtailed and cfg.profile == target
        if ok:
            return
        self._outbox[local] = value
        self._last_value_w[local] = np.nan  # one resend per mismatch, until it lands
        self.resends += 1
        if not self._readback_warned[local]:
            self._readback_warned[local] = True
            log.warning(
                "luxos %s: miner runs profile %r%s, we set %.0f W; resending",
                self._name(local),
                cfg.profile,
                " (curtailed)" if cfg.curtailed else "",
                value,
            )

    # --- bookkeeping ---

    def _name(self, local: int) -> str:
        return self._specs[local].name

    def _report(self, seconds: float, ok: bool) -> None:
        if self._on_command is not None:
            self._on_command(self.name, seconds, ok)

    def _succeeded(self, local: int) -> None:
        self._backoff.succeeded(local)
        if self._faulted[local]:
            self._faulted[local] = False
            self._poll_soon[local] = True  # confirm recovery with telemetry
            log.info("luxos %s: recovered", self._name(local))

    def _failed(self, local: int, exc: DriverError) -> None:
        now = time.monotonic()
        self.errors_by_device[local] += 1
        self._retry_at[local] = now + self._backoff.failed(local, now)
        if not isinstance(exc, m.CommandError):
            # The connection failed: the miner may have restarted; verify before trusting.
            self._curtailed[local] = None
        if self._backoff.failures(local) < FAULT_AFTER:
            return
        self._fleet.state[self.rows[local]] = DeviceState.FAULT
        if not self._faulted[local]:
            self._faulted[local] = True
            log.warning(
                "luxos %s: FAULT after %d failed exchanges: %s",
                self._name(local),
                self._backoff.failures(local),
                exc,
            )


__all__ = ["FAULT_AFTER", "LuxosDriver", "exchange"]
