"""Whatsminer driver: MicroBT's API v2 on TCP 4028 (JSON, one request per connection).

Every miner gets its own task: it polls `summary` every poll_s (power, hashrate, power limit,
btminer's uptime) and, when the miner does not hash or every `status_every` polls, `status`
(whether mining is off), and sends the latest queued command. Connections share a limited
number of slots (commands before adoptions before polls), as for LuxOS.

Commands are privileged: encrypted with the admin password and signed with a token from
`get_token` (`crypto`). RUN at P sends `set_power_pct` with the integer percent of the rated
power at or below P (the firmware's fast power adjustment, no restart), after `power_on` if
the miner is off; SLEEP sends `power_off` (`respbefore` true: answered before the PSU turns
off). `adjust_power_limit` restarts the miner and is never sent.

A miner is adopted at its first good poll (at most ADOPT_AT_ONCE at a time): its capabilities
go through the port (continuous in 1 % steps of the rated power, up to its power limit, sleeps,
reports power), and a token is fetched, so a fleet-wide command costs each miner one exchange.
A token is reused until near the end of its life (30 minutes on the miner; polls renew it
before), as pyasic does; a token failure answer (unknown or expired token) gets a new token
and one retry. A firmware that refuses a token's second use is noticed and then gets a fresh
token before each command, fetched by the polls so the command still costs one exchange.

Readback: set_power_pct is temporary (a restart forgets it) and the API reports no percent,
so a restart seen in summary's Elapsed (btminer's uptime going back) resends the acknowledged
command, as does a miner found mining after SLEEP or off after RUN (`status`); beyond that the
base class verifies that power moved.

State: SLEEPING when mining is off, WAKING while it is on but the miner does not hash yet, ON
when hashing, FAULT after FAULT_AFTER consecutive failed exchanges.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Unpack

import numpy as np

from drivers.base import CommandObserver, DriverError
from drivers.cgminer.client import exchange
from drivers.core.capability import Capabilities
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.state import DeviceState
from drivers.device_driver import DriverOptions, PerDeviceDriver, Reading
from drivers.slots import ADOPTION, exchange_priority
from drivers.whatsminer import crypto
from drivers.whatsminer import messages as m

log = logging.getLogger("rampd.drivers.whatsminer")

TOKEN_TTL_S = 1800.0
"""A token's life on the miner (30 minutes)."""
RENEW_FRACTION = 0.8
"""Polls fetch a new token once the held one is this old (a fraction of its life)."""
ADOPT_AT_ONCE = 64
"""Miners adopted concurrently: a fleet's first polls must not become a token storm."""
RESTART_TOLERANCE_S = 1.5
"""btminer's start, computed from Elapsed (whole seconds) and the poll's time, moves by less
than this between polls of a miner that did not restart."""


@dataclass(frozen=True, slots=True)
class _MinerReading(Reading):
    mineroff: bool | None
    """From `status` when this poll asked it."""
    restarted: bool
    """btminer started again since the previous poll (Elapsed went back)."""


class WhatsminerDriver(PerDeviceDriver[_MinerReading]):
    """Drives the Whatsminers of its port."""

    protocol = "whatsminer"
    attempt_noun = "exchanges"
    # A connection per request, as LuxOS: many connects in flight, started in small batches.
    default_concurrency = 512
    wake_batch = 16
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        status_every: int = 6,
        token_ttl_s: float = TOKEN_TTL_S,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        n = len(self._specs)
        self._status_every = max(1, status_every)
        self._token_ttl_s = float(token_ttl_s)
        # Reads password files now: a missing one fails at start, not per command.
        self._passwords = [m.password_of(s.access) for s in self._specs]
        self._rated_w = np.array([s.p_max_w for s in self._specs])
        self._adopted = np.zeros(n, dtype=np.bool_)
        self._adopting_now = 0
        self._polls = np.zeros(n, dtype=np.int64)
        self._token: list[crypto.Token | None] = [None] * n
        self._token_at = np.zeros(n)
        self._token_uses = np.zeros(n, dtype=np.int64)
        self._single_use = np.zeros(n, dtype=np.bool_)
        self._limit_w = np.full(n, np.nan)  # the miner's power limit, as summary reports it
        self._boot_at = np.full(n, np.nan)  # when btminer started (monotonic, from Elapsed)
        self._mineroff: list[bool | None] = [None] * n  # our view; None: unknown
        self._crypt_warned = np.zeros(n, dtype=np.bool_)
        # Telemetry beyond the process image, by local index.
        self.hashrate_ths = np.full(n, np.nan)
        self.hashrate_at = np.full(n, np.nan)
        # Counters beyond the base's, public for metrics.
        self.exchanges = 0
        self.tokens = 0
        """Tokens fetched (get_token exchanges that returned one)."""

    @property
    def adopting(self) -> int:
        """Miners not adopted yet (capabilities, token): their first command costs more."""
        return len(self._adopted) - int(self._adopted.sum())

    def single_use_tokens(self, local: int) -> bool:
        """Whether the miner was found to take each token once only."""
        return bool(self._single_use[local])

    def holds_token(self, local: int) -> bool:
        """Whether a token is held for miner `local` (its next command is one exchange)."""
        return self._token[local] is not None

    def percent(self, local: int, power_w: float) -> int:
        """The set_power_pct percent a RUN at `power_w` sends to miner `local`: the whole
        percent at or below, but not below the one that reaches its p_min."""
        rated = float(self._rated_w[local])
        pct = m.percent_for(power_w, rated)
        caps = self.port.capabilities(local)
        p_min = caps.p_min_w if caps is not None else self._specs[local].p_min_w
        if pct / 100.0 * rated < p_min - 1e-6:
            pct = min(m.PCT_MAX, math.ceil(p_min / rated * 100.0 - 1e-9))
        return pct

    # --- exchanges ---

    async def _call(self, local: int, request: bytes) -> m.Json:
        spec = self._specs[local]
        await self._take_slot(local)
        try:
            self.exchanges += 1
            return await exchange(spec.host, spec.port, request, spec.timeout_s)
        finally:
            self._slots.release()

    async def _plain(self, local: int, command: str) -> m.Json:
        return m.check(await self._call(local, m.encode_command(command)), command)

    async def _fetch_token(self, local: int) -> crypto.Token:
        info = m.parse_token(await self._plain(local, "get_token"))
        token = crypto.Token.derive(self._passwords[local], info.salt, info.time_s, info.newsalt)
        self._token[local] = token
        self._token_at[local] = time.monotonic()
        self._token_uses[local] = 0
        self.tokens += 1
        return token

    def _token_fresh(self, local: int) -> bool:
        age = time.monotonic() - float(self._token_at[local])
        return self._token[local] is not None and age < RENEW_FRACTION * self._token_ttl_s

    async def _ensure_token(self, local: int) -> crypto.Token:
        token = self._token[local]
        if token is not None and time.monotonic() - self._token_at[local] < self._token_ttl_s:
            return token
        return await self._fetch_token(local)

    async def _privileged(self, local: int, command: str, **params: str) -> m.Json:
        """One privileged command; a token the miner refuses is replaced and tried once more."""
        for attempt in range(2):
            token = await self._ensure_token(local)
            reply = await self._call(local, m.encode_privileged(token, command, **params))
            try:
                result = m.check(m.open_reply(reply, token.key), command)
            except m.TokenError:
                self._token_refused(local)
                if attempt:
                    raise
                continue
            except m.CryptFailure as exc:
                if not self._crypt_warned[local]:
                    self._crypt_warned[local] = True
                    log.warning(
                        "whatsminer %s: the miner cannot decrypt our commands (%s): "
                        "is its admin password the configured one?",
                        self._name(local),
                        exc.msg,
                    )
                raise
            self._crypt_warned[local] = False
            self._token_uses[local] += 1
            if self._single_use[local]:
                self._token[local] = None
            return result
        raise AssertionError("unreachable")

    def _token_refused(self, local: int) -> None:
        """Drop the refused token; one refused on its second use, well within its life, means
        a firmware that takes each token once."""
        age = time.monotonic() - float(self._token_at[local])
        if (
            self._token_uses[local] >= 1
            and age < 0.5 * self._token_ttl_s
            and not self._single_use[local]
        ):
            self._single_use[local] = True
            log.info(
                "whatsminer %s: tokens are single-use here; fetching one per command",
                self._name(local),
            )
        self._token[local] = None

    # --- adoption ---

    def _capabilities(self, local: int) -> Capabilities:
        """Continuous in 1 % steps of the rated power, from the lowest percent the firmware
        takes (or the template's p_min, where higher) to the power limit the miner reports."""
        spec = self._specs[local]
        rated = float(self._rated_w[local])
        limit = float(self._limit_w[local])
        p_max = min(rated, limit) if math.isfinite(limit) else rated
        p_min = min(max(spec.p_min_w, m.PCT_MIN / 100.0 * rated), p_max)
        return Capabilities.continuous(p_min, p_max, step_w=rated / 100.0, can_sleep=True)

    async def _adopt(self, local: int) -> None:
        """At a good poll: capabilities through the port, and a token, so that a fleet-wide
        command costs each miner one exchange. Left for a later poll when ADOPT_AT_ONCE
        miners are being adopted already or the miner refuses."""
        if self._adopting_now >= ADOPT_AT_ONCE:
            return
        self._adopting_now += 1
        token = exchange_priority.set(ADOPTION)
        try:
            self.port.adopted(local, self._capabilities(local))
            if not self._token_fresh(local):
                await self._fetch_token(local)
            self._adopted[local] = True
        except DriverError as exc:
            log.debug("whatsminer %s: adoption deferred: %s", self._name(local), exc)
        finally:
            exchange_priority.reset(token)
            self._adopting_now -= 1

    # --- sending ---

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        if intent == Intent.SLEEP:
            # Sent even when we believe it off: a retry must reach the miner.
            await self._privileged(local, "power_off", respbefore="true")
            self._mineroff[local] = True
            return
        if self._mineroff[local] is not False:
            await self._privileged(local, "power_on")
            self._mineroff[local] = False
            self._poll_soon[local] = True  # follow the wake closely
        await self._privileged(local, "set_power_pct", percent=str(self.percent(local, power_w)))

    def _command_failed(self, local: int, exc: DriverError) -> bool:
        self._mineroff[local] = None  # our view may be stale: wake it anyway at the retry
        return True

    # --- polling ---

    async def _read(self, local: int) -> _MinerReading:
        k = int(self._polls[local])
        self._polls[local] += 1
        try:
            summary = m.parse_summary(await self._plain(local, "summary"))
            watts = self._check_power(local, summary.power_w)
            now = time.monotonic()
            restarted = self._restarted(local, summary.elapsed_s, now)
            acked_sleep = self._acked(local)[1] == Intent.SLEEP
            mineroff: bool | None = None
            if summary.ghs <= 0 or acked_sleep or k % self._status_every == 0:
                mineroff = m.parse_status(await self._plain(local, "status"))
                self._mineroff[local] = mineroff
            elif self._mineroff[local] is None:
                self._mineroff[local] = False  # hashing: mining is on
            if summary.ghs > 0:
                state = DeviceState.ON  # after power_off too, until the boards stop
            elif mineroff:
                state = DeviceState.SLEEPING
            else:
                state = DeviceState.WAKING
            self.hashrate_ths[local] = summary.hashrate_ths
            self.hashrate_at[local] = now
            limit = math.nan if summary.power_limit_w is None else summary.power_limit_w
            old = float(self._limit_w[local])
            if limit != old and not (math.isnan(limit) and math.isnan(old)):
                self._limit_w[local] = limit
                if self._adopted[local]:  # the limit moved (another tool): say so
                    self.port.adopted(local, self._capabilities(local))
            if restarted:
                self._token[local] = None  # a restarted miner forgot its tokens
            if not self._adopted[local]:
                await self._adopt(local)
            elif not self._token_fresh(local):
                await self._fetch_token(local)  # renewed here, not on a command's way
        except DriverError:
            self._mineroff[local] = None  # the miner may have restarted meanwhile
            raise
        return _MinerReading(watts, state, mineroff, restarted)

    def _restarted(self, local: int, elapsed_s: float, now: float) -> bool:
        if not math.isfinite(elapsed_s) or elapsed_s < 0:
            return False
        boot = now - elapsed_s
        before = float(self._boot_at[local])
        self._boot_at[local] = boot
        return math.isfinite(before) and boot - before > RESTART_TOLERANCE_S

    def _polled(self, local: int, reading: _MinerReading) -> None:
        if not self._readback_due(local):
            return
        value, intent = self._acked(local)
        if intent == Intent.SLEEP:
            if reading.mineroff is False:
                self._resend(local, "miner is mining after power_off")
        elif reading.mineroff:
            self._resend(local, "miner is off, we ran it at %.0f W", value)
        elif reading.restarted:
            self._resend(local, "btminer restarted (set_power_pct is lost), we set %.0f W", value)


@register("whatsminer")
def _whatsminer(port: DevicePort, ctx: DriverContext) -> WhatsminerDriver:
    return WhatsminerDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )


__all__ = ["TOKEN_TTL_S", "WhatsminerDriver"]
