"""Driver for Antminers on Bitmain's stock firmware, through its web interface (cgi over HTTP
with digest authentication; `drivers.antminer.web` has the message set).

Stock firmware offers no power target, only modes: normal, low power and sleep. The driver
adopts a miner as a presets-only device: `Capabilities.presets((low_w, normal_w),
can_sleep=True, reports_power=False)` with the template's figures for the two presets (the
firmware says nothing of watts). A RUN command runs the highest preset at or below its power
(normal at p_max, low power below it), SLEEP sets sleep mode. `set_miner_conf` rewrites the
whole configuration, so a command sends back the configuration read from `get_miner_conf`
(pools, fans) with the mode changed; the configuration read by the last readback poll is
reused while younger than two readback periods (`conf_max_age_s`), so a fleet-wide command
costs each miner one request. Some firmware answer a set only after ~20 s (it restarts the
mining process first), so sets have their own, longer timeout.

Stock firmware reports no power: a reading's power is the estimate of the mode read back
(the normal or low preset while hashing, p_idle while asleep or while the mining process
restarts, which shows as WAKING). A command is verified by the mode read back and by the
hashrate (`_moved`): asleep means no hashrate; a preset means hashing nearer the firmware's
expected hashrate for that mode than for the other preset (a miner that took the mode and
kept hashing as before is not following it). Polls read `stats.cgi` (hashrate, running
mode) every time, `summary.cgi` (health checks) every `summary_every` polls and
`get_miner_conf.cgi` (the stored mode: the readback of our commands) every `config_every`
polls, after a restart (uptime going back) and whenever it is unknown; a stored mode that is
not the acknowledged one is resent. Adoption, at the first good poll, reads
`get_system_info.cgi` for the model.

One aiohttp session for the whole driver (keep-alive connections, a connection limit equal
to the driver's concurrency), a digest middleware per miner (aiohttp scopes one to one
origin; it answers each miner's challenge once and then authenticates preemptively), and
every request bounded in time. A refused login (wrong password) is a failed request: the
miner goes FAULT after FAULT_AFTER of them, like any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

import aiohttp
import numpy as np

from drivers.antminer import web as w
from drivers.base import CommandObserver, DeviceTimeout, DriverError, ProtocolError
from drivers.core.capability import Capabilities
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.device_driver import FAULT_AFTER, DriverOptions, PerDeviceDriver, Reading
from drivers.slots import ADOPTION, exchange_priority

log = logging.getLogger("rampd.drivers.antminer")

SET_TIMEOUT_S = 30.0
"""set_miner_conf on some stock firmware answers only after ~21 s (it restarts bmminer
first; asic-rs issue 245, S19j Pro): a set gets this long, polls the template's timeout_s."""
CONF_AGE_POLLS = 2.0
"""A command reuses the configuration a poll read within this many readback periods
(`config_every` polls; else it reads it first): one request per miner for a fleet-wide
command, at the cost that an operator's pool change made meanwhile is written back over."""
BEST_J_PER_TH = 5.0
"""No SHA-256 miner is this efficient: a hashrate above p_max / this is garbage."""


class AuthFailed(ProtocolError):
    """The miner refused our digest credentials (401 after answering its challenge)."""


@dataclass(frozen=True, slots=True)
class _MinerReading(Reading):
    """Telemetry (power is the mode's estimate) plus what `_moved` and the readback judge."""

    mode: w.Mode | None
    """The running mode (stats, else the stored configuration); None: unknown."""
    rate_ths: float
    ideal_ths: float
    conf: w.MinerConf | None
    """The stored configuration, when this poll read it (the readback)."""


def _credentials(spec: DeviceSpec) -> tuple[str, str]:
    """The web login: the spec's, else the factory root/root. Reads a password file
    (blocking): at construction only."""
    access = spec.access
    password = access.password
    if password is None and access.password_file is not None:
        try:
            text = Path(access.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read password_file {access.password_file}: {exc}") from None
        password = text.splitlines()[0] if text else ""
    return access.username or w.DEFAULT_USERNAME, (
        w.DEFAULT_PASSWORD if password is None else password
    )


async def _body(resp: aiohttp.ClientResponse) -> bytes:
    """The response body, within MAX_BODY_BYTES."""
    if resp.content_length is not None and resp.content_length > w.MAX_BODY_BYTES:
        raise ProtocolError(f"response of {resp.content_length} bytes")
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        buf += chunk
        if len(buf) > w.MAX_BODY_BYTES:
            raise ProtocolError(f"response over {w.MAX_BODY_BYTES} bytes")
    return bytes(buf)


class AntminerDriver(PerDeviceDriver[_MinerReading]):
    """Drives the stock-firmware Antminers of its port."""

    protocol = "antminer"
    attempt_noun = "requests"
    # Keep-alive HTTP: a request costs no connect once a miner's connection is open; a
    # fleet-wide command with hundreds in flight finishes in a few round trips.
    default_concurrency = 256
    wake_batch = 32
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        summary_every: int = 6,
        config_every: int = 6,
        set_timeout_s: float = SET_TIMEOUT_S,
        conf_max_age_s: float | None = None,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        n = len(self._specs)
        self._summary_every = max(1, summary_every)
        self._config_every = max(1, config_every)
        self._set_timeout_s = set_timeout_s
        # Default: CONF_AGE_POLLS readback periods of each miner.
        self._conf_max_age_s = np.array(
            [
                CONF_AGE_POLLS * self._config_every * s.poll_s * self.poll_stretch
                if conf_max_age_s is None
                else conf_max_age_s
                for s in self._specs
            ]
        )
        logins = [_credentials(s) for s in self._specs]
        self._auth = [aiohttp.DigestAuthMiddleware(u, p) for u, p in logins]
        self._base = [
            f"http://[{s.host}]:{s.port}" if ":" in s.host else f"http://{s.host}:{s.port}"
            for s in self._specs
        ]
        self._session: aiohttp.ClientSession | None = None
        self._adopted = np.zeros(n, dtype=np.bool_)
        self._polls = np.zeros(n, dtype=np.int64)
        self._conf: list[w.MinerConf | None] = [None] * n
        self._conf_at = np.full(n, -np.inf)
        self._elapsed = np.zeros(n, dtype=np.int64)
        self._running_w = np.array([s.p_max_w for s in self._specs])  # preset last seen hashing
        self._model_warned = np.zeros(n, dtype=np.bool_)
        # Telemetry beyond the process image, by local index (public for metrics and tests).
        self.hashrate_ths = np.full(n, np.nan)
        self.ideal_ths = np.full(n, np.nan)
        self.models: list[str] = [""] * n
        """`minertype` as the miner reported it at adoption."""
        self.problems: list[tuple[str, ...]] = [()] * n
        """Health checks the last summary reported as not fine."""
        # Counters beyond the base's, public for metrics.
        self.requests = 0
        self.auth_failures = 0
        self.sets = 0

    @property
    def adopting(self) -> int:
        """Miners not adopted yet (model and capabilities not learned)."""
        return len(self._adopted) - int(self._adopted.sum())

    def conf(self, local: int) -> w.MinerConf | None:
        """The miner's configuration as last read (or as last set)."""
        return self._conf[local]

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=self._max_concurrency, limit_per_host=2, keepalive_timeout=30.0
        )
        # No session-wide timeout: each request has its own (asyncio.timeout in `_request`).
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )
        try:
            yield
        finally:
            session, self._session = self._session, None
            await session.close()

    # --- requests ---

    async def _request(
        self,
        local: int,
        method: str,
        path: str,
        body: w.Json | None = None,
        timeout_s: float | None = None,
    ) -> w.Json:
        """One cgi request (digest-authenticated) and its JSON answer, within the miner's
        timeout. Raises DeviceTimeout, DriverError (transport), AuthFailed (401 after the
        challenge was answered) or ProtocolError (another status, or not JSON)."""
        session = self._session
        if session is None:
            raise DriverError("driver not running")
        spec = self._specs[local]
        await self._take_slot(local)
        try:
            self.requests += 1
            async with asyncio.timeout(spec.timeout_s if timeout_s is None else timeout_s):
                async with session.request(
                    method,
                    self._base[local] + path,
                    json=body,
                    middlewares=(self._auth[local],),
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    data = await _body(resp)
        except TimeoutError:
            raise DeviceTimeout(
                f"{path}: no answer within {timeout_s or spec.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise DriverError(f"{path}: {type(exc).__name__}: {exc}") from None
        finally:
            self._slots.release()
        if status == 401:
            self.auth_failures += 1
            raise AuthFailed("digest authentication refused (username or password wrong)")
        if status != 200:
            raise ProtocolError(f"{path}: HTTP {status}")
        return w.decode(data)

    async def _read_conf(self, local: int) -> w.MinerConf:
        conf = w.parse_conf(await self._request(local, "GET", w.GET_CONF))
        self._conf[local] = conf
        self._conf_at[local] = time.monotonic()
        return conf

    # --- capabilities and modes ---

    def _caps(self, local: int) -> Capabilities:
        caps = self.port.capabilities(local)
        if caps is not None:
            return caps
        spec = self._specs[local]
        return Capabilities.presets(
            (spec.p_min_w, spec.p_max_w), can_sleep=True, reports_power=False
        )

    def _target(self, local: int, power_w: float, intent: Intent) -> w.Mode:
        """The mode a command means: sleep, or the highest preset at or below its power."""
        if intent == Intent.SLEEP:
            return w.Mode.SLEEP
        caps = self._caps(local)
        return w.Mode.NORMAL if caps.preset_at_or_below(power_w) >= caps.p_max_w else w.Mode.LOW

    def _preset_w(self, local: int, mode: w.Mode) -> float:
        caps = self._caps(local)
        return caps.p_max_w if mode == w.Mode.NORMAL else caps.p_min_w

    async def _adopt(self, local: int) -> None:
        """The model from get_system_info; the capabilities (the template's presets: stock
        firmware tells modes, not watts) through the port."""
        token = exchange_priority.set(ADOPTION)  # before the fleet's polls: a command may come
        try:
            info = w.parse_system_info(await self._request(local, "GET", w.SYSTEM_INFO))
        finally:
            exchange_priority.reset(token)
        self.models[local] = info.minertype
        expected = self._specs[local].access.model
        mismatch = expected is not None and expected.lower() not in info.minertype.lower()
        if mismatch and not self._model_warned[local]:
            self._model_warned[local] = True
            log.warning(
                "antminer %s: reports %r, configured as %r; using the template's presets",
                self._name(local),
                info.minertype,
                expected,
            )
        spec = self._specs[local]
        caps = Capabilities.presets(
            (spec.p_min_w, spec.p_max_w), can_sleep=True, reports_power=False
        )
        self.port.adopted(local, caps)
        self._adopted[local] = True

    # --- sending ---

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        target = self._target(local, power_w, intent)
        conf = self._conf[local]
        if conf is None or time.monotonic() - self._conf_at[local] > self._conf_max_age_s[local]:
            conf = await self._read_conf(local)
        # Already there: nothing to send, unless this is a retry of a command the miner
        # took without following it (then the set goes out again).
        if conf.mode == target and not self._strikes[local]:
            return
        spec = self._specs[local]
        reply = await self._request(
            local,
            "POST",
            w.SET_CONF,
            w.set_body(conf.raw, target),
            max(spec.timeout_s, self._set_timeout_s),
        )
        w.check_set_reply(reply)
        self.sets += 1
        self._conf[local] = w.MinerConf(target, conf.raw | {"bitmain-work-mode": str(int(target))})
        self._conf_at[local] = time.monotonic()
        self._poll_soon[local] = True  # follow the change closely

    def _command_failed(self, local: int, exc: DriverError) -> bool:
        self._conf[local] = None  # the set may or may not have landed: read before retrying
        return True

    # --- polling ---

    def _check_rates(self, local: int, rates: w.Rates) -> w.Rates:
        top = float(self._p_max_w[local]) / BEST_J_PER_TH
        if rates.rate_5s_ths > top or rates.rate_ideal_ths > top:
            raise ProtocolError(
                f"implausible hashrate {rates.rate_5s_ths:g} TH/s (ideal {rates.rate_ideal_ths:g})"
            )
        return rates

    async def _read(self, local: int) -> _MinerReading:
        k = int(self._polls[local])
        self._polls[local] += 1
        try:
            stats = w.parse_stats(await self._request(local, "GET", w.STATS))
            rates = self._check_rates(local, stats.rates)
            restarted = rates.elapsed_s < self._elapsed[local]
            self._elapsed[local] = rates.elapsed_s
            if k % self._summary_every == self._summary_every // 2:
                self._summary(local, w.parse_summary(await self._request(local, "GET", w.SUMMARY)))
            conf = None
            if (
                self._conf[local] is None
                or restarted
                or k % self._config_every == self._config_every // 2
            ):
                conf = await self._read_conf(local)
            if not self._adopted[local]:
                await self._adopt(local)
        except DriverError:
            self._conf[local] = None  # it may have restarted meanwhile: read it again
            raise
        stored = self._conf[local]
        mode = stats.mode if stats.mode is not None else (stored.mode if stored else None)
        self.hashrate_ths[local] = rates.rate_5s_ths
        self.ideal_ths[local] = rates.rate_ideal_ths
        power_w, state = self._estimate(local, mode, rates.rate_5s_ths > 0)
        return _MinerReading(power_w, state, mode, rates.rate_5s_ths, rates.rate_ideal_ths, conf)

    def _estimate(
        self, local: int, mode: w.Mode | None, hashing: bool
    ) -> tuple[float, DeviceState]:
        """Power and state from the mode and whether it hashes (stock firmware reports no
        power): a preset's nominal power while hashing, p_idle asleep or restarting."""
        spec = self._specs[local]
        if not hashing:
            asleep = mode == w.Mode.SLEEP
            return spec.p_idle_w, DeviceState.SLEEPING if asleep else DeviceState.WAKING
        if mode in (w.Mode.NORMAL, w.Mode.LOW):
            self._running_w[local] = self._preset_w(local, mode)
        # Told to sleep and still hashing (the sleep takes effect seconds later): the preset
        # it was running.
        return float(self._running_w[local]), DeviceState.ON

    def _summary(self, local: int, summary: w.Summary) -> None:
        if summary.problems != self.problems[local]:
            if summary.problems:
                log.warning(
                    "antminer %s: health checks: %s", self._name(local), "; ".join(summary.problems)
                )
            elif self.problems[local]:
                log.info("antminer %s: health checks fine again", self._name(local))
        self.problems[local] = summary.problems

    def _polled(self, local: int, reading: _MinerReading) -> None:
        if reading.conf is None or not self._readback_due(local):
            return
        value, intent = self._acked(local)
        target = self._target(local, value, intent)
        if reading.conf.mode != target:
            self._resend(
                local,
                "miner is in %s mode, we set %s",
                reading.conf.mode.name.lower(),
                target.name.lower(),
            )

    def _moved(
        self, local: int, reading: _MinerReading, power_w: float, intent: Intent
    ) -> bool | None:
        """By the mode and the hashrate, the miner's power being only our estimate: asleep
        for SLEEP; for a preset, that mode and a hashrate nearer the firmware's expected one
        for it than for the other preset. The miner may follow the command the check was
        armed for (`power_w`) or the latest acknowledged one (a trim since)."""
        if reading.mode is None:
            return None
        latest_w, _ = self._acked(local)
        return any(
            self._follows(local, reading, self._target(local, p, intent))
            for p in {power_w, latest_w}
        )

    def _follows(self, local: int, reading: _MinerReading, target: w.Mode) -> bool:
        hashing = reading.rate_ths > 0
        if target == w.Mode.SLEEP:
            return reading.mode == w.Mode.SLEEP and not hashing
        if reading.mode != target or not hashing:
            return False
        caps = self._caps(local)
        if reading.ideal_ths <= 0 or caps.p_min_w >= caps.p_max_w:
            return True  # nothing to compare with: the mode is all there is
        lo_hi = caps.p_min_w / caps.p_max_w
        # The firmware's expected hashrate at the other preset, as a multiple of this one's.
        other = lo_hi if target == w.Mode.NORMAL else 1.0 / lo_hi
        midpoint = reading.ideal_ths * (1.0 + other) / 2.0
        if target == w.Mode.NORMAL:
            return reading.rate_ths >= midpoint
        return reading.rate_ths <= midpoint


@register("antminer")
def _antminer(port: DevicePort, ctx: DriverContext) -> AntminerDriver:
    return AntminerDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )


__all__ = ["FAULT_AFTER", "AntminerDriver", "AuthFailed"]
