"""Braiins OS+ driver for ASIC miners: the public gRPC API (braiins.bos.v1) on TCP 50051.

Every miner has one HTTP/2 channel (grpclib), opened at its first call and held, so a poll or a
command is one request on a warm connection; grpclib reconnects it after a drop. Every call is
bounded by the miner's timeout_s. All miners share a limited number of slots (commands before
adoptions before polls: `drivers.slots`).

Authentication: `AuthenticationService.Login` with the template's credentials (Braiins OS+'s
default `root` and no password otherwise) answers a token and its lifetime; every other call
carries the token in its "authorization" metadata. A token near the end of its lifetime is
replaced before use; one the miner refuses (UNAUTHENTICATED: it restarted, or forgot it) is
replaced once and the call retried. Refused credentials are a driver error naming them, so the
miner goes FAULT with the reason in its log line.

Polls: `MinerService.GetMinerStats` (power in watts, hashrate) every poll; `GetMinerDetails`
(status: paused or mining) when the miner does not hash, was not ON, or a readback is due; the
readback (every `readback_every` polls) adds `PerformanceService.GetTunerState`, whose power
target is compared with the last acknowledged command (a mismatch is resent). A miner is
adopted at its first good poll: `ConfigurationService.GetConstraints` gives the power target's
min and max (its capabilities: a continuous target, sent in whole watts, with sleep), and the
details its model, checked against the template's.

Commands: RUN -> `PerformanceService.SetPowerTarget(watts)` (after `ActionsService.
ResumeMining` when the miner is paused); SLEEP -> `PauseMining`. The tuner then moves the
miner's power over tens of seconds; the base class verifies that it did.

State: SLEEPING when paused and drawing less than halfway from idle to the lowest target; ON
when it hashes (or, paused, still draws running power); WAKING when mining is on but no hashes
come yet (after a resume); FAULT after FAULT_AFTER consecutive failed calls.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack

import grpclib.exceptions
import numpy as np
from google.protobuf.message import DecodeError
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status

from drivers.base import CommandObserver, DeviceTimeout, DriverError, ProtocolError
from drivers.braiins import api
from drivers.braiins.api import pb
from drivers.braiins.proto import bos_v1_grpc as grpc
from drivers.core.capability import Capabilities
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.state import DeviceState
from drivers.device_driver import FAULT_AFTER, DriverOptions, PerDeviceDriver, Reading
from drivers.slots import ADOPTION, exchange_priority

log = logging.getLogger("rampd.drivers.braiins")

Req = TypeVar("Req")
Rep = TypeVar("Rep")

TOKEN_RENEW_FRACTION = 0.9
"""A token is replaced before use once this share of its lifetime has passed."""
CHANNEL_MAX_CALLS = 1000
"""Calls on one HTTP/2 channel before a fresh one replaces it: h2 remembers every closed
stream of a connection (up to 65,536, for late frames), about 100 bytes each, so a held
channel polled for a day grew by megabytes per miner (the 30-minute soak of the campus's 150
Braiins miners: resident memory +14%). A new connection every 1,000 calls (minutes apart at
the poll rate) bounds that to a few hundred kilobytes per miner."""
POWER_TARGET_STEP_W = 0.0
"""Continuous for the control model: the target goes out in whole watts (Power.watt is an
integer), a grid far finer than the tuner holds power to."""


class RpcError(ProtocolError):
    """The miner answered a call with a non-OK gRPC status."""

    def __init__(self, method: str, status: Status, message: str | None) -> None:
        detail = f": {message}" if message else ""
        super().__init__(f"{method}: {status.name}{detail}")
        self.status = status


class Unauthenticated(RpcError):
    """The miner refused the call's token (lapsed, or unknown since a restart)."""


class LoginRefused(ProtocolError):
    """The miner refused our credentials: a configuration error, not a passing one."""


@dataclass(slots=True)
class _Api:
    """One miner's held channel and the API methods bound to it."""

    channel: Channel
    login: UnaryUnaryMethod[pb.LoginRequest, pb.LoginResponse]
    pause: UnaryUnaryMethod[pb.PauseMiningRequest, pb.PauseMiningResponse]
    resume: UnaryUnaryMethod[pb.ResumeMiningRequest, pb.ResumeMiningResponse]
    tuner_state: UnaryUnaryMethod[pb.GetTunerStateRequest, pb.GetTunerStateResponse]
    set_power_target: UnaryUnaryMethod[pb.SetPowerTargetRequest, pb.SetPowerTargetResponse]
    constraints: UnaryUnaryMethod[pb.GetConstraintsRequest, pb.GetConstraintsResponse]
    details: UnaryUnaryMethod[pb.GetMinerDetailsRequest, pb.GetMinerDetailsResponse]
    stats: UnaryUnaryMethod[pb.GetMinerStatsRequest, pb.GetMinerStatsResponse]
    calls: int = 0
    """Calls begun on this channel (it is replaced after CHANNEL_MAX_CALLS)."""

    @classmethod
    def open(cls, host: str, port: int) -> _Api:
        """The channel connects at its first call (and again after a drop)."""
        channel = Channel(host, port)
        auth = grpc.AuthenticationServiceStub(channel)
        actions = grpc.ActionsServiceStub(channel)
        perf = grpc.PerformanceServiceStub(channel)
        config = grpc.ConfigurationServiceStub(channel)
        miner = grpc.MinerServiceStub(channel)
        return cls(
            channel,
            auth.Login,
            actions.PauseMining,
            actions.ResumeMining,
            perf.GetTunerState,
            perf.SetPowerTarget,
            config.GetConstraints,
            miner.GetMinerDetails,
            miner.GetMinerStats,
        )


@dataclass(frozen=True, slots=True)
class _MinerReading(Reading):
    """Telemetry plus what a readback poll read: paused or not, and the tuner's power target
    (None: not in power-target mode)."""

    readback: bool
    paused: bool
    target_w: float | None


class BraiinsDriver(PerDeviceDriver[_MinerReading]):
    """Drives the Braiins OS+ miners of its port."""

    protocol = "braiins"
    attempt_noun = "calls"
    # Held HTTP/2 channels: a call costs a request on a warm connection, not a connect (as
    # Redfish's keep-alive); re-measure with `rampd bench fanout --protocols braiins`.
    default_concurrency = 128
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        readback_every: int = 6,
        channel_max_calls: int = CHANNEL_MAX_CALLS,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        n = len(self._specs)
        self._readback_every = max(1, readback_every)
        self._channel_max_calls = max(1, channel_max_calls)
        # Reads password files: now, so a missing one fails at start.
        self._creds = [api.credentials(s.access) for s in self._specs]
        self._apis: list[_Api | None] = [None] * n
        self._token: list[str] = [""] * n
        self._token_renew_at = np.zeros(n)  # monotonic; 0: no token
        self._adopted = np.zeros(n, dtype=np.bool_)
        self._model_warned = np.zeros(n, dtype=np.bool_)
        # The power target's bounds the miner accepts (its constraints; the template's until
        # adopted).
        self._min_w = np.array([s.p_min_w for s in self._specs])
        self._max_w = np.array([s.p_max_w for s in self._specs])
        self._paused: list[bool | None] = [None] * n  # None: unknown, read before a RUN
        self._last_state = np.full(n, DeviceState.UNKNOWN, dtype=np.int8)
        self._polls = np.zeros(n, dtype=np.int64)
        self.models: list[str] = [""] * n
        """The model each miner reported at adoption ("" until then)."""
        # Telemetry beyond the process image, by local index.
        self.hashrate_ths = np.full(n, np.nan)
        self.hashrate_at = np.full(n, np.nan)
        # Counters beyond the base's, public for metrics.
        self.exchanges = 0
        self.logins = 0
        self.relogins = 0
        """Logins after the miner refused a token (its restart, a lapse we did not foresee)."""
        self.channel_renewals = 0
        """Channels replaced after CHANNEL_MAX_CALLS calls."""
        self._retired: dict[Channel, asyncio.TimerHandle] = {}
        """Replaced channels, each with the timer that closes it."""

    @property
    def adopting(self) -> int:
        """Miners not adopted yet (logged in, constraints read)."""
        return len(self._adopted) - int(self._adopted.sum())

    def token(self, local: int) -> str:
        return self._token[local]

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for k, held in enumerate(self._apis):
                if held is not None:
                    held.channel.close()
                    self._apis[k] = None
            for channel, handle in self._retired.items():
                handle.cancel()
                channel.close()
            self._retired.clear()

    # --- calls ---

    def _api(self, local: int) -> _Api:
        """The miner's channel for one more call. After CHANNEL_MAX_CALLS a fresh one takes
        over and the old one is closed once its calls can have ended (their timeout)."""
        held = self._apis[local]
        if held is not None and held.calls >= self._channel_max_calls:
            self._retire(local, held)
            held = None
        if held is None:
            spec = self._specs[local]
            held = self._apis[local] = _Api.open(spec.host, spec.port)
        held.calls += 1
        return held

    def _retire(self, local: int, held: _Api) -> None:
        self.channel_renewals += 1
        channel = held.channel

        def close() -> None:
            del self._retired[channel]
            channel.close()

        delay = self._specs[local].timeout_s + 1.0
        self._retired[channel] = asyncio.get_running_loop().call_later(delay, close)

    async def _wire(
        self, local: int, name: str, call: Callable[[float], Coroutine[Any, Any, Rep]]
    ) -> Rep:
        """One request on the miner's channel, in a slot, within its timeout; transport and
        status failures as DriverErrors (RpcError carries the status)."""
        timeout_s = self._specs[local].timeout_s
        # The timeout starts once a slot is taken: waiting for one is not the miner's fault.
        await self._take_slot(local)
        try:
            self.exchanges += 1
            # In a task of its own (wait_for's): grpclib ends a call that times out or loses
            # its connection by cancelling the task awaiting it and raising its own error
            # instead, never uncancelling; in the device's task that pending cancellation
            # would end the task at its next turn (`stop_if_cancelled`).
            return await asyncio.wait_for(call(timeout_s), timeout_s)
        except TimeoutError:
            raise DeviceTimeout(f"{name}: no answer within {timeout_s:g} s") from None
        except grpclib.exceptions.GRPCError as exc:
            kind = Unauthenticated if exc.status == Status.UNAUTHENTICATED else RpcError
            raise kind(name, exc.status, exc.message) from None
        except OSError as exc:
            raise DriverError(f"{name}: {exc.strerror or type(exc).__name__}") from None
        except (
            grpclib.exceptions.StreamTerminatedError,
            grpclib.exceptions.ProtocolError,
        ) as exc:
            raise DriverError(f"{name}: {type(exc).__name__}: {exc}") from None
        except DecodeError as exc:
            raise ProtocolError(f"{name}: undecodable reply: {exc}") from None
        finally:
            self._slots.release()

    async def _call(
        self, local: int, name: str, method: Callable[[_Api], UnaryUnaryMethod[Req, Rep]], req: Req
    ) -> Rep:
        """An authenticated call: a token is obtained first if there is none or it is about
        to lapse; one the miner refuses is replaced once and the call retried."""
        for attempt in range(2):
            if not self._token[local] or time.monotonic() >= self._token_renew_at[local]:
                await self._login(local)
            metadata = ((api.AUTH_METADATA, self._token[local]),)
            call = functools.partial(_unary, method(self._api(local)), req, metadata)
            try:
                return await self._wire(local, name, call)
            except Unauthenticated:
                self._token[local] = ""
                if attempt:
                    raise
                self.relogins += 1
        raise AssertionError("unreachable")

    async def _login(self, local: int) -> None:
        user, password = self._creds[local]
        login = self._api(local).login
        request = pb.LoginRequest(username=user, password=password)

        async def call(timeout_s: float) -> tuple[pb.LoginResponse, str]:
            async with login.open(timeout=timeout_s) as stream:
                await stream.send_message(request, end=True)
                reply = await stream.recv_message()
                meta = stream.initial_metadata
            token = meta.get(api.AUTH_METADATA, "") if meta is not None else ""
            if reply is None:
                raise ProtocolError("Login: no reply message")
            return reply, token if isinstance(token, str) else ""

        try:
            reply, meta_token = await self._wire(local, "Login", call)
        except Unauthenticated as exc:
            raise LoginRefused(
                f"login as {user!r} refused ({exc}): check access.username/password"
            ) from None
        token = reply.token or meta_token
        if not token:
            raise ProtocolError("Login answered no token")
        lifetime = reply.timeout_s or api.TOKEN_TIMEOUT_S
        self._token[local] = token
        self._token_renew_at[local] = time.monotonic() + TOKEN_RENEW_FRACTION * lifetime
        self.logins += 1

    # --- sending ---

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        if intent == Intent.SLEEP:
            await self._call(local, "PauseMining", lambda a: a.pause, pb.PauseMiningRequest())
            self._paused[local] = True
            return
        watts = self._target_for(local, power_w)
        if self._paused[local] is None:
            self._paused[local] = await self._read_paused(local)
        if self._paused[local]:
            await self._call(local, "ResumeMining", lambda a: a.resume, pb.ResumeMiningRequest())
            self._poll_soon[local] = True  # follow the wake closely
        self._paused[local] = False
        reply = await self._call(
            local,
            "SetPowerTarget",
            lambda a: a.set_power_target,
            api.set_power_target_request(watts),
        )
        if reply.power_target.watt != watts:
            raise ProtocolError(f"SetPowerTarget {watts} W answered {reply.power_target.watt} W")

    def _command_failed(self, local: int, exc: DriverError) -> bool:
        self._paused[local] = None  # our view may be stale: read it before retrying
        return True

    def _target_for(self, local: int, power_w: float) -> int:
        """Whole watts within the bounds the miner accepts (it refuses others)."""
        lo, hi = float(self._min_w[local]), float(self._max_w[local])
        return round(min(max(power_w, lo), hi))

    async def _read_paused(self, local: int) -> bool:
        details = await self._call(
            local, "GetMinerDetails", lambda a: a.details, pb.GetMinerDetailsRequest()
        )
        return bool(details.status == api.PAUSED)

    # --- polling ---

    async def _read(self, local: int) -> _MinerReading:
        k = int(self._polls[local])
        self._polls[local] += 1
        stats = await self._call(
            local, "GetMinerStats", lambda a: a.stats, pb.GetMinerStatsRequest()
        )
        watts = self._check_power(local, float(stats.power_stats.approximated_consumption.watt))
        ghs = stats.miner_stats.real_hashrate.last_5s.gigahash_per_second
        if not (math.isfinite(ghs) and ghs >= 0.0):
            raise ProtocolError(f"implausible hashrate {ghs!r} GH/s")
        self.hashrate_ths[local] = ghs / 1e3
        self.hashrate_at[local] = time.monotonic()
        hashing = ghs > 0.0
        readback = k % self._readback_every == 0
        details: pb.GetMinerDetailsResponse | None = None
        if (
            readback
            or not hashing
            or self._last_state[local] != DeviceState.ON
            or not self._adopted[local]
        ):
            details = await self._call(
                local, "GetMinerDetails", lambda a: a.details, pb.GetMinerDetailsRequest()
            )
            self._paused[local] = details.status == api.PAUSED
        target_w: float | None = None
        if readback:
            tuner = await self._call(
                local, "GetTunerState", lambda a: a.tuner_state, pb.GetTunerStateRequest()
            )
            if tuner.WhichOneof("mode_state") == "power_target_mode_state":
                target_w = float(tuner.power_target_mode_state.current_target.watt)
        if not self._adopted[local] and details is not None:
            await self._adopt(local, details)
        paused = bool(self._paused[local])
        return _MinerReading(
            watts, self._state(local, watts, hashing, paused), readback, paused, target_w
        )

    def _state(self, local: int, watts: float, hashing: bool, paused: bool) -> DeviceState:
        spec = self._specs[local]
        if paused:
            # Pausing stops the hashes at once and the power within seconds; one paused but
            # still drawing running power is not asleep (yet).
            asleep = watts < spec.p_idle_w + 0.5 * (float(self._min_w[local]) - spec.p_idle_w)
            return DeviceState.SLEEPING if asleep else DeviceState.ON
        return DeviceState.ON if hashing else DeviceState.WAKING

    async def _adopt(self, local: int, details: pb.GetMinerDetailsResponse) -> None:
        """At the first good poll: the power target's bounds from the miner's constraints
        (the template's when it has none to say), and its model."""
        spec = self._specs[local]
        token = exchange_priority.set(ADOPTION)  # before the fleet's polls: a command may come
        try:
            reply = await self._call(
                local, "GetConstraints", lambda a: a.constraints, pb.GetConstraintsRequest()
            )
            bounds = reply.tuner_constraints.power_target
            lo, hi = float(bounds.min.watt), float(bounds.max.watt)
        except RpcError as exc:
            log.debug("braiins %s: no constraints (%s); template bounds", spec.name, exc)
            lo = hi = 0.0
        finally:
            exchange_priority.reset(token)
        if not 0.0 < lo <= hi:
            lo, hi = spec.p_min_w, spec.p_max_w
        self._min_w[local], self._max_w[local] = lo, hi
        self.port.adopted(
            local, Capabilities.continuous(lo, hi, step_w=POWER_TARGET_STEP_W, can_sleep=True)
        )
        identity = details.miner_identity
        model = identity.miner_model or identity.name
        self.models[local] = model
        self._adopted[local] = True
        log.debug(
            "braiins %s: %s on Braiins OS %s, power target %.0f..%.0f W",
            spec.name,
            model or "unknown model",
            details.bos_version.current or "?",
            lo,
            hi,
        )
        expected = spec.access.model
        if (
            expected
            and model
            and _norm(expected) not in _norm(model)
            and not self._model_warned[local]
        ):
            self._model_warned[local] = True
            log.warning(
                "braiins %s: reports model %r, its template says %r", spec.name, model, expected
            )

    def _polled(self, local: int, reading: _MinerReading) -> None:
        self._last_state[local] = reading.state
        if reading.readback:
            self._check_readback(local, reading)

    def _check_readback(self, local: int, reading: _MinerReading) -> None:
        """A miner that lost our command (reboot, another tool) gets it again."""
        if not self._readback_due(local):
            return
        value, intent = self._acked(local)
        if intent == Intent.SLEEP:
            ok = reading.paused
        else:
            ok = not reading.paused and reading.target_w == self._target_for(local, value)
        if ok:
            return
        self._resend(
            local,
            "miner %s with power target %s, we set %s",
            "paused" if reading.paused else "mining",
            "none" if reading.target_w is None else f"{reading.target_w:.0f} W",
            "sleep" if intent == Intent.SLEEP else f"{value:.0f} W",
        )


async def _unary(
    bound: UnaryUnaryMethod[Req, Rep],
    req: Req,
    metadata: tuple[tuple[str, str], ...],
    timeout_s: float,
) -> Rep:
    return await bound(req, timeout=timeout_s, metadata=metadata)


def _norm(model: str) -> str:
    return "".join(model.lower().split()).removeprefix("antminer")


@register("braiins")
def _braiins(port: DevicePort, ctx: DriverContext) -> BraiinsDriver:
    return BraiinsDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )


__all__ = [
    "FAULT_AFTER",
    "BraiinsDriver",
    "LoginRefused",
    "RpcError",
    "Unauthenticated",
]
