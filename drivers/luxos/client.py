"""LuxOS driver for ASIC miners: TCP JSON API on port 4028, one command per connection.

Every miner gets its own task: it polls `power` every poll_s (staggered over the fleet), reads
`summary` (hashrate) every `summary_every` polls and `config` (profile and curtail mode: the
readback of our commands) every `config_every` polls, all in one exchange (a multi-command,
"power+summary"), and sends the latest queued setpoint. All connections share a limited
number of slots, so thousands of miners never open thousands of sockets at once; a freed slot
goes to a waiting command before a waiting adoption or poll, so a fleet-wide command is not
queued behind the fleet's polls. Every call is bounded by the miner's timeout_s.

A RUN command's power maps to the miner's profile ladder (fetched once per miner with
`profiles`): the miner runs the highest profile at or below it, woken first if it sleeps; a
SLEEP command curtails it to sleep.
Privileged commands need the miner's only session. A miner is adopted at its first good poll,
in the background (at most ADOPT_AT_ONCE at a time, a miner left out is adopted at a later
poll): its profile ladder is fetched, we log on, and ATM (automatic thermal management, which
would move the profile on its own) is switched off if its config says it is on. Polls renew
the session before it expires (it lapses session_ttl_s after its last use) with a harmless
privileged command, so a fleet-wide command costs each miner one exchange, however long the
site was idle. A session the miner no longer knows is replaced at once; another actor's
session is waited out; ours is logged off on shutdown.

State: SLEEPING when the PSU is off, WAKING while the PSU is on but the miner does not hash
yet (after a wakeup), ON when hashing, FAULT after FAULT_AFTER consecutive failed exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Unpack

import numpy as np

from drivers.base import Backoff, CommandObserver, DriverError, ProtocolError
from drivers.cgminer.client import exchange
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.state import DeviceState
from drivers.device_driver import FAULT_AFTER, DriverOptions, PerDeviceDriver, Reading
from drivers.luxos import messages as m
from drivers.slots import ADOPTION, COMMAND, exchange_priority

log = logging.getLogger("rampd.drivers.luxos")

SESSION_MARGIN_S = 2.0
"""A session unused this long past its lifetime is surely gone: log on without trying it."""
RENEW_FRACTION = 0.5
"""Polls renew a session idle for this fraction of its lifetime."""
ADOPT_AT_ONCE = 64
"""Miners adopted concurrently: a fleet's first polls must not become a logon storm."""
KEEPALIVE = "enabled=false"
"""`atmset` parameter renewing a session: privileged, and what we want anyway (ATM off)."""


@dataclass(frozen=True, slots=True)
class _MinerReading(Reading):
    """Telemetry plus, every `config_every` polls, the miner's config: our commands' readback."""

    config: m.ConfigInfo | None


class LuxosDriver(PerDeviceDriver[_MinerReading]):
    """Drives the LuxOS miners of its port."""

    protocol = "luxos"
    attempt_noun = "exchanges"
    # A connection per command: a fleet-wide command needs hundreds of connects in flight
    # to finish within a second or two (re-measure: `rampd bench fanout --protocols luxos
    # --concurrency N`).
    default_concurrency = 512
    # Fewer connects started per loop iteration leave fewer tasks queued for a slot: a
    # fleet-wide LuxOS command is fastest with batches of 4 to 16 (re-measure: `rampd bench
    # fanout --sizes 10000 --protocols luxos` with this changed). Persistent connections
    # (Modbus) keep the base's 64.
    wake_batch = 16
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        summary_every: int = 6,
        config_every: int = 6,
        session_ttl_s: float = 60.0,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        n = len(self._specs)
        self._summary_every = max(1, summary_every)
        self._config_every = max(1, config_every)
        self._session_ttl_s = session_ttl_s
        self._busy_backoff = Backoff(n, 1.0, 15.0, self._rng)
        self._adopted = np.zeros(n, dtype=np.bool_)
        self._multi = np.ones(n, dtype=np.bool_)  # takes multi-commands ("power+summary")
        self._adopting_now = 0
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
        self._busy_warned = np.zeros(n, dtype=np.bool_)
        # Telemetry beyond the process image, by local index.
        self.hashrate_ths = np.full(n, np.nan)
        self.hashrate_at = np.full(n, np.nan)
        # Counters beyond the base's, public for metrics.
        self.exchanges = 0
        self.logons = 0

    def profiles(self, local: int) -> list[m.Profile] | None:
        """The cached profile ladder of a miner (lowest power first), once fetched."""
        return self._profiles[local]

    def session_id(self, local: int) -> str:
        return self._session[local]

    @property
    def adopting(self) -> int:
        """Miners not adopted yet (ladder, session, ATM): their first command costs more."""
        return len(self._adopted) - int(self._adopted.sum())

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.logoff_all()

    async def logoff_all(self) -> None:
        """Give back held sessions so another tool (or our restart) can log on; best effort."""
        held = [k for k, sid in enumerate(self._session) if sid]
        if not held:
            return
        # Bounded, but long enough for a whole fleet through the slots.
        timeout_s = 1.0 + max(self._specs[k].timeout_s for k in held) + len(held) / 2000

        async def logoff(k: int) -> None:
            exchange_priority.set(COMMAND)  # this task's own context; never preempted as a poll
            sid, self._session[k] = self._session[k], ""
            with suppress(DriverError):
                await self._call(k, "logoff", sid)

        with suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(logoff(k) for k in held))

    # --- exchanges ---

    async def _call(self, local: int, command: str, *params: str) -> m.Json:
        """One command to one miner, reply checked (CommandError on STATUS "E"); a
        multi-command's reply is returned unchecked (`messages.split_multi`)."""
        spec = self._specs[local]
        request = m.encode_request(command, *params)
        await self._take_slot(local)
        try:
            self.exchanges += 1
            reply = await exchange(spec.host, spec.port, request, spec.timeout_s)
        finally:
            self._slots.release()
        return reply if "+" in command else m.check(reply, command)

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

    async def _atm_enabled(self, local: int) -> bool:
        try:
            return m.parse_atm(await self._call(local, "atm"))
        except m.CommandError:
            return False  # firmware without ATM

    async def _disable_atm(self, local: int, sid: str, enabled: bool | None = None) -> None:
        """ATM moves profiles with temperature and would undo ours: switch it off once.
        `enabled`: what the miner's config said, None to ask it."""
        if enabled is None:
            enabled = await self._atm_enabled(local)
        if enabled:
            await self._call(local, "atmset", sid, KEEPALIVE)
            log.info("luxos %s: ATM disabled (it would override power targets)", self._name(local))
        self._atm_done[local] = True

    async def _adopt(self, local: int, atm_enabled: bool | None) -> None:
        """At a good poll, not at the first command: everything a command needs but the
        command itself (ladder, session, ATM off), so a fleet-wide command (a site shedding
        within seconds) costs each miner one exchange. Left for a later poll when
        ADOPT_AT_ONCE miners are being adopted already or the miner refuses."""
        if self._adopting_now >= ADOPT_AT_ONCE:
            return
        self._adopting_now += 1
        token = exchange_priority.set(ADOPTION)  # before the fleet's polls: a command may come soon
        try:
            await self._ladder(local)
            sid = await self._ensure_session(local)
            if not self._atm_done[local]:
                await self._disable_atm(local, sid, atm_enabled)
            self._session_used[local] = time.monotonic()
            self._adopted[local] = True
        except m.SessionBusy as exc:
            self._session_busy(local, exc)  # another actor's: adopt once it is gone
        except DriverError as exc:
            log.debug("luxos %s: adoption deferred: %s", self._name(local), exc)
        finally:
            exchange_priority.reset(token)
            self._adopting_now -= 1

    async def _renew(self, local: int) -> None:
        """Keep a held session alive: polls are frequent, sessions lapse after a minute."""
        try:
            await self._privileged(local, "atmset", KEEPALIVE)
        except m.SessionBusy as exc:
            self._session_busy(local, exc)
        except m.CommandError as exc:
            log.debug("luxos %s: session renewal refused: %s", self._name(local), exc)
            self._session[local] = ""
            self._adopted[local] = False  # adopt it again at the next poll

    def _session_busy(self, local: int, exc: m.SessionBusy) -> None:
        self._session[local] = ""
        self._adopted[local] = False
        if not self._busy_warned[local]:
            self._busy_warned[local] = True
            log.warning("luxos %s: %s; retrying", self._name(local), exc)

    async def _ladder(self, local: int) -> list[m.Profile]:
        ladder = self._profiles[local]
        if ladder is None:
            ladder = m.parse_profiles(await self._call(local, "profiles"))
            self._profiles[local] = ladder
        return ladder

    async def _read_config(self, local: int) -> m.ConfigInfo:
        return self._config_read(local, m.parse_config(await self._call(local, "config")))

    def _config_read(self, local: int, cfg: m.ConfigInfo) -> m.ConfigInfo:
        self._profile[local] = cfg.profile
        self._curtailed[local] = cfg.curtailed
        return cfg

    # --- sending ---

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        await self._apply(local, power_w, intent)  # at COMMAND priority (the base's `_send`)
        self._busy_backoff.succeeded(local)

    def _command_failed(self, local: int, exc: DriverError) -> bool:
        if isinstance(exc, m.SessionBusy):
            # Someone else holds the session: not a fault of the miner; try again later.
            now = time.monotonic()
            self._retry_at[local] = now + self._busy_backoff.failed(local, now)
            self._session_busy(local, exc)
            return False
        self._curtailed[local] = None  # our view may be stale: read config before retrying
        if isinstance(exc, m.CommandError) and exc.command == "profileset":
            self._profiles[local] = None  # the ladder may have changed: fetch it again
        return True

    async def _apply(self, local: int, value: float, intent: Intent) -> None:
        """Carry out one command: SLEEP curtails the miner; RUN wakes it if it sleeps and sets the
        profile for `value`."""
        if self._curtailed[local] is None:
            await self._read_config(local)
        if intent == Intent.SLEEP:
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

    # --- polling ---

    async def _read(self, local: int) -> _MinerReading:
        k = int(self._polls[local])
        self._polls[local] += 1
        last = self._last_state[local]
        # One exchange per poll: what is due goes in one multi-command ("power+summary").
        commands = ["power"]
        if (
            self._waking[local]
            or last != DeviceState.ON  # waking, or powered up since (reboot, another tool)
            or k % self._summary_every == 0
        ):
            commands.append("summary")
        if k % self._config_every == self._config_every // 2 or self._curtailed[local] is None:
            commands.append("config")
        try:
            replies = await self._poll_replies(local, commands)
            power = m.parse_power(replies["power"])
            watts = self._check_power(local, power.watts)
            if not power.psu_on:  # asleep, or a wakeup not acted on yet
                state = DeviceState.SLEEPING
                self.hashrate_ths[local] = 0.0
                self.hashrate_at[local] = time.monotonic()
            elif "summary" in replies:
                summary = m.parse_summary(replies["summary"])
                self.hashrate_ths[local] = summary.hashrate_ths
                self.hashrate_at[local] = time.monotonic()
                hashing = summary.ghs_5s > 0
                state = DeviceState.ON if hashing else DeviceState.WAKING
                if hashing:
                    self._waking[local] = False
            else:
                state = DeviceState.ON
            cfg = None
            if "config" in replies:
                cfg = self._config_read(local, m.parse_config(replies["config"]))
                if cfg.atm_enabled and self._atm_done[local]:
                    self._atm_done[local] = self._adopted[local] = False  # switched on again
            if not self._adopted[local]:
                await self._adopt(local, None if cfg is None else cfg.atm_enabled)
            elif self._session[local] and (
                time.monotonic() - self._session_used[local] > RENEW_FRACTION * self._session_ttl_s
            ):
                await self._renew(local)
        except DriverError as exc:
            if not isinstance(exc, m.CommandError):
                # The connection failed: the miner may have restarted; verify before trusting.
                self._curtailed[local] = None
            raise
        return _MinerReading(watts, state, cfg)

    async def _poll_replies(self, local: int, commands: list[str]) -> dict[str, m.Json]:
        """The replies to `commands`, in one multi-command exchange where the firmware
        takes them (one by one where it answers "invalid command")."""
        if len(commands) > 1 and self._multi[local]:
            try:
                return m.split_multi(await self._call(local, "+".join(commands)), commands)
            except m.CommandError as exc:
                if exc.code != m.Code.INVALID_COMMAND:
                    raise
                self._multi[local] = False
                log.info("luxos %s: no multi-commands; polling one by one", self._name(local))
        return {c: await self._call(local, c) for c in commands}

    def _polled(self, local: int, reading: _MinerReading) -> None:
        self._last_state[local] = reading.state
        if reading.config is not None:
            self._check_readback(local, reading.config)

    def _check_readback(self, local: int, cfg: m.ConfigInfo) -> None:
        """A miner that lost our command (reboot, another tool) gets it again."""
        if not self._readback_due(local):
            return
        value, intent = self._acked(local)
        if intent == Intent.SLEEP:
            ok = cfg.curtailed
        else:
            ladder = self._profiles[local]
            target = m.choose_profile(ladder, value).name if ladder else cfg.profile
            ok = not cfg.curtailed and cfg.profile == target
        if ok:
            return
        self._resend(
            local,
            "miner runs profile %r%s, we set %.0f W",
            cfg.profile,
            " (curtailed)" if cfg.curtailed else "",
            value,
        )


@register("luxos")
def _luxos(port: DevicePort, ctx: DriverContext) -> LuxosDriver:
    return LuxosDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )


__all__ = ["FAULT_AFTER", "LuxosDriver", "exchange"]
