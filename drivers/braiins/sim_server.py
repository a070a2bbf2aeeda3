"""Simulated Braiins OS+ miners: the public gRPC API (braiins.bos.v1) on each miner's own
address and port 50051, one grpclib server per miner.

Replies are built from the physics arrays at request time (power from `reported_w`, hashing
from `state`), so nothing runs per miner per physics tick. Commands write into the physics:
`SetPowerTarget` sets the setpoint, `PauseMining`/`ResumeMining` set run 0/1. The tuner's
dynamics (a new target settles over tens of seconds; pausing is quick, resuming slow) are the
template's numbers, which the physics applies (ramp, dead time, sleep_s, wake_s).

Authentication as on the firmware: `Login` with the miner's credentials (Braiins OS+'s default
`root` and an empty password, or the template's `access`) answers a token in its reply and in
its initial metadata ("authorization"); every other call must carry a live token in its
"authorization" metadata, else UNAUTHENTICATED. Tokens lapse `token_ttl_s` after the login.
Wrong credentials are UNAUTHENTICATED too.

Faults come from `physics.fault[i]` per call: SILENT never answers (the call does not land),
SLOW answers after SLOW_S, ERROR answers status INTERNAL, GARBAGE answers implausible numbers
(power, the power target echoed), REBOOT forgets every token and returns to the default target,
mining (noticed at the next call, also when `physics.step()` already applied it: nothing but
these servers may write the commands of Braiins rows). STUCK is the physics'.

For tools that identify firmware (pyasic): `api_port` (4028) serves bosminer's cgminer-style
JSON API, read only (`version`, `devdetails`, `summary`), whose replies name BOSer and the model;
`http_port` (80) serves the web UI's landing page, titled "Braiins OS".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from drivers.braiins import api
from drivers.braiins.api import pb
from drivers.braiins.proto import bos_v1_grpc as grpc
from drivers.cgminer.server import FaultReplies, MinerApi, MinerServers, bind, served_specs
from drivers.cgminer.sim import MinerRows
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

log = logging.getLogger("rampd.sim")

Req = TypeVar("Req")
Rep = TypeVar("Rep")

SILENT_HOLD_S = 30.0
"""SILENT holds a call unanswered at most this long."""
CGMINER_MAX_REQUEST_BYTES = 65536
"""A cgminer-API request not complete at this size is answered as it is."""
MAX_TOKENS = 16
"""Live tokens kept per miner (the oldest goes first): every pyasic call logs in anew."""
GARBAGE_W = 10**9
BOS_VERSION = "2024-09-06-0-8d1bd53b-24.08-plus"
"""GetMinerDetails.bos_version.current as Braiins OS+ 24.08 reports it (pyasic reads the
release from its sixth dash-separated field)."""
BOSER_VERSION = "boser-buildroot 0.1.0-8d1bd53b"
CGMINER_API_VERSION = "3.7"

# Nameplate efficiencies (J/TH), for the hashrate the simulator reports at a given power.
EFFICIENCY_J_TH: dict[str, float] = {
    "S21": 17.5,  # Bitmain: 200 TH/s at 3500 W
    "S21 PRO": 15.0,  # Bitmain: 234 TH/s at 3510 W
    "S19J PRO": 29.5,  # Bitmain: 104 TH/s at 3068 W
    "S19 XP": 21.5,  # Bitmain: 140 TH/s at 3010 W
}
DEFAULT_EFFICIENCY_J_TH = 20.0


def efficiency_of(model: str) -> float:
    key = model.upper().removeprefix("ANTMINER").strip()
    return EFFICIENCY_J_TH.get(key, DEFAULT_EFFICIENCY_J_TH)


class BraiinsSim(MinerRows):
    """Braiins OS+ behaviour of the miners at physics rows `rows` (local index k = position)."""

    def __init__(
        self,
        physics: SitePhysics,
        rows: Sequence[int],
        specs: Sequence[DeviceSpec],
        *,
        token_ttl_s: float = float(api.TOKEN_TIMEOUT_S),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(physics, rows, specs, clock)
        self.token_ttl_s = float(token_ttl_s)
        n = len(specs)
        self.models = tuple(api.model_name(s.access.model, s.kind) for s in specs)
        self.efficiency = np.array([efficiency_of(m) for m in self.models])
        self.credentials = [api.credentials(s.access) for s in specs]
        self.tokens: list[dict[str, float]] = [{} for _ in range(n)]
        """Per miner: live token -> when it lapses (clock)."""
        self.counts: Counter[tuple[int, str]] = Counter()
        """Calls served, by (miner, method name): for tests and benchmarks."""

    # --- state derived from the physics ---

    def paused(self, k: int) -> bool:
        return bool(self.physics.cmd_run[self._row(k)] == 0)

    def target_w(self, k: int) -> int:
        return round(float(self.physics.cmd_setpoint_w[self._row(k)]))

    def watts(self, k: int) -> int:
        return max(0, round(float(self.physics.reported_w[self._row(k)])))

    def hashrate_ghs(self, k: int) -> float:
        """Hashes while running and not paused: pausing stops the work at once, the power
        follows within the physics' sleep_s."""
        i = self._row(k)
        if self.physics.state[i] != DeviceState.ON or self.paused(k):
            return 0.0
        return float(self.physics.power_w[i]) / float(self.efficiency[k]) * 1e3

    def bounds(self, k: int) -> tuple[int, int, int]:
        """The power target's (min, max, default) this miner accepts: its physics bounds."""
        spec, i = self.specs[k], self._row(k)
        default = float(self.physics.default_setpoint_w[i])
        return round(spec.p_min_w), round(spec.p_max_w), round(default)

    def _restarted(self, k: int, flagged: bool) -> None:
        super()._restarted(k, flagged)
        self.tokens[k].clear()

    # --- authentication ---

    def login(self, k: int, req: pb.LoginRequest) -> pb.LoginResponse:
        if (req.username, req.password) != self.credentials[k]:
            raise GRPCError(Status.UNAUTHENTICATED, "Invalid username or password")
        now = self._clock()
        tokens = self.tokens[k]
        for t, until in list(tokens.items()):
            if until <= now:
                del tokens[t]
        while len(tokens) >= MAX_TOKENS:
            del tokens[next(iter(tokens))]
        token = secrets.token_urlsafe(18)
        tokens[token] = now + self.token_ttl_s
        return pb.LoginResponse(token=token, timeout_s=max(1, round(self.token_ttl_s)))

    def authorize(self, k: int, token: str | None) -> None:
        if not token:
            raise GRPCError(Status.UNAUTHENTICATED, "Missing authorization token")
        until = self.tokens[k].get(token)
        if until is None:
            raise GRPCError(Status.UNAUTHENTICATED, "Invalid authorization token")
        if until <= self._clock():
            del self.tokens[k][token]
            raise GRPCError(Status.UNAUTHENTICATED, "Authorization token expired")

    def forget_tokens(self, k: int) -> None:
        """The miner's API restarted (as after a firmware upgrade): every token is gone."""
        self.tokens[k].clear()

    # --- calls (authorized, faults aside) ---

    def pause(self, k: int, _req: pb.PauseMiningRequest) -> pb.PauseMiningResponse:
        if self.paused(k):
            return pb.PauseMiningResponse(already_paused=True)
        self._command(k, run=0)
        return pb.PauseMiningResponse(already_paused=False)

    def resume(self, k: int, _req: pb.ResumeMiningRequest) -> pb.ResumeMiningResponse:
        if not self.paused(k):
            return pb.ResumeMiningResponse(already_mining=True)
        self._command(k, run=1)
        return pb.ResumeMiningResponse(already_mining=False)

    def set_power_target(self, k: int, req: pb.SetPowerTargetRequest) -> pb.SetPowerTargetResponse:
        lo, hi, _ = self.bounds(k)
        watts = int(req.power_target.watt)
        if not lo <= watts <= hi:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"Power target {watts} W is out of the allowed range [{lo} W, {hi} W]",
            )
        self._command(k, setpoint_w=float(watts))
        echoed = 0 if self.fault(k) == Fault.GARBAGE else watts
        return pb.SetPowerTargetResponse(power_target=pb.Power(watt=echoed))

    def tuner_state(self, k: int, _req: pb.GetTunerStateRequest) -> pb.GetTunerStateResponse:
        target = self.target_w(k)
        watts = self.watts(k)
        i = self._row(k)
        if self.paused(k):
            overall = pb.TUNER_STATE_DISABLED
        elif self.physics.state[i] == DeviceState.ON and abs(watts - target) <= max(
            self.specs[k].noise_w * 3.0, 0.01 * target
        ):
            overall = pb.TUNER_STATE_STABLE
        else:
            overall = pb.TUNER_STATE_TUNING
        profile = pb.PowerTargetProfile(
            target=pb.Power(watt=target),
            measured_hashrate=pb.GigaHashrate(gigahash_per_second=self.hashrate_ghs(k)),
            estimated_power_consumption=pb.Power(watt=watts),
        )
        return pb.GetTunerStateResponse(
            overall_tuner_state=overall,
            power_target_mode_state=pb.PowerTargetModeState(
                profile=profile, current_target=pb.Power(watt=target)
            ),
        )

    def performance_mode(self, k: int, _req: pb.GetPerformanceModeRequest) -> pb.PerformanceMode:
        target = pb.PowerTargetMode(power_target=pb.Power(watt=self.target_w(k)))
        return pb.PerformanceMode(tuner_mode=pb.TunerPerformanceMode(power_target=target))

    def configuration(
        self, k: int, _req: pb.GetMinerConfigurationRequest
    ) -> pb.GetMinerConfigurationResponse:
        return pb.GetMinerConfigurationResponse(
            tuner=pb.TunerConfiguration(
                enabled=True,
                tuner_mode=pb.TUNER_MODE_POWER_TARGET,
                power_target=pb.Power(watt=self.target_w(k)),
            )
        )

    def constraints(self, k: int, _req: pb.GetConstraintsRequest) -> pb.GetConstraintsResponse:
        lo, hi, default = self.bounds(k)
        eff = float(self.efficiency[k])
        return pb.GetConstraintsResponse(
            tuner_constraints=pb.TunerConstraints(
                power_target=pb.PowerConstraints(
                    default=pb.Power(watt=default), min=pb.Power(watt=lo), max=pb.Power(watt=hi)
                ),
                hashrate_target=pb.HashrateConstraints(
                    default=pb.TeraHashrate(terahash_per_second=default / eff),
                    min=pb.TeraHashrate(terahash_per_second=lo / eff),
                    max=pb.TeraHashrate(terahash_per_second=hi / eff),
                ),
                enabled=pb.BooleanConstraint(default=True),
                default_mode=pb.TUNER_MODE_POWER_TARGET,
            )
        )

    def details(self, k: int, _req: pb.GetMinerDetailsRequest) -> pb.GetMinerDetailsResponse:
        spec, i = self.specs[k], self._row(k)
        uptime = max(0, round(self._clock() - float(self.boot_t[k])))
        sticker = spec.p_max_w / float(self.efficiency[k]) * 1e3
        return pb.GetMinerDetailsResponse(
            uid=f"rampd-sim-{i:08x}",
            miner_identity=pb.MinerIdentity(
                brand=pb.MINER_BRAND_ANTMINER, name=self.models[k], miner_model=self.models[k]
            ),
            bos_version=pb.BosVersion(current=BOS_VERSION, major="24.08", bos_plus=True),
            hostname=spec.name,
            mac_address="02:00:{:02x}:{:02x}:{:02x}:{:02x}".format(*i.to_bytes(4, "big")),
            sticker_hashrate=pb.GigaHashrate(gigahash_per_second=sticker),
            bosminer_uptime_s=uptime,
            system_uptime_s=uptime,
            status=api.PAUSED if self.paused(k) else api.NORMAL,
        )

    def stats(self, k: int, _req: pb.GetMinerStatsRequest) -> pb.GetMinerStatsResponse:
        ghs = self.hashrate_ghs(k)
        watts = self.watts(k)
        if self.fault(k) == Fault.GARBAGE:
            watts = GARBAGE_W
        rate = pb.GigaHashrate(gigahash_per_second=ghs)
        eff = watts / (ghs / 1e3) if ghs > 0 else 0.0
        return pb.GetMinerStatsResponse(
            miner_stats=pb.WorkSolverStats(
                real_hashrate=pb.RealHashrate(
                    last_5s=rate, last_15s=rate, last_30s=rate, last_1m=rate, last_5m=rate
                ),
                nominal_hashrate=pb.GigaHashrate(
                    gigahash_per_second=self.specs[k].p_max_w / float(self.efficiency[k]) * 1e3
                ),
            ),
            power_stats=pb.MinerPowerStats(
                approximated_consumption=pb.Power(watt=watts),
                efficiency=pb.PowerEfficiency(joule_per_terahash=eff),
            ),
        )

    # --- the cgminer-style API (identification) ---

    def cgminer_reply(self, k: int, request: bytes) -> dict[str, Any]:
        when = int(time.time())
        description = f"BOSer {BOSER_VERSION}"
        try:
            command = str(json.loads(request).get("command", ""))
        except (ValueError, AttributeError):
            command = ""

        def status(code: int, msg: str, ok: bool = True) -> list[dict[str, Any]]:
            return [
                {
                    "STATUS": "S" if ok else "E",
                    "When": when,
                    "Code": code,
                    "Msg": msg,
                    "Description": description,
                }
            ]

        if command == "version":
            return {
                "STATUS": status(22, "BOSer versions"),
                "VERSION": [{"BOSer": BOSER_VERSION, "API": CGMINER_API_VERSION}],
                "id": 1,
            }
        if command == "devdetails":
            chains = [
                {
                    "DEVDETAILS": n,
                    "Name": "Chain",
                    "ID": n,
                    "Driver": "bitmain",
                    "Kernel": "",
                    "Model": self.models[k],
                }
                for n in range(3)
            ]
            return {"STATUS": status(69, "Device Details"), "DEVDETAILS": chains, "id": 1}
        if command == "summary":
            mhs = self.hashrate_ghs(k) * 1e3
            elapsed = max(0, round(self._clock() - float(self.boot_t[k])))
            summary = {"Elapsed": elapsed, "MHS av": mhs, "MHS 5s": mhs, "MHS 1m": mhs}
            return {"STATUS": status(11, "Summary"), "SUMMARY": [summary], "id": 1}
        return {"STATUS": status(14, "Invalid command", ok=False), "id": 1}


class _MinerApi(
    grpc.AuthenticationServiceBase,
    grpc.ActionsServiceBase,
    grpc.PerformanceServiceBase,
    grpc.ConfigurationServiceBase,
    grpc.MinerServiceBase,
):
    """The gRPC services of one simulated miner (one grpclib server per miner address)."""

    def __init__(self, servers: BraiinsServers, k: int) -> None:
        self._servers = servers
        self._sim = servers.sim
        self._k = k

    def __mapping__(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for base in (
            grpc.AuthenticationServiceBase,
            grpc.ActionsServiceBase,
            grpc.PerformanceServiceBase,
            grpc.ConfigurationServiceBase,
            grpc.MinerServiceBase,
        ):
            out.update(base.__mapping__(self))
        return out

    async def _serve(
        self,
        stream: Stream[Req, Rep],
        name: str,
        answer: Callable[[int, Req], Rep],
        *,
        auth: bool = True,
    ) -> Rep | None:
        """One call: faults, reboot, token, then the answer (sent unless it is the login's,
        which sends its own metadata first)."""
        sim, k = self._sim, self._k
        req = await stream.recv_message()
        sim.counts[k, name] += 1
        fault = sim.fault(k)
        if fault == Fault.SILENT:
            await asyncio.sleep(SILENT_HOLD_S)
            raise GRPCError(Status.UNAVAILABLE, "no answer")
        if fault == Fault.SLOW:
            await asyncio.sleep(SLOW_S)
        if sim.fault(k) == Fault.ERROR:
            raise GRPCError(Status.INTERNAL, "bosminer: internal error")
        sim.check_reboot(k)
        if req is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request message")
        if auth:
            token = stream.metadata.get(api.AUTH_METADATA) if stream.metadata else None
            sim.authorize(k, token if isinstance(token, str) else None)
        reply = answer(k, req)
        if name != "Login":
            await stream.send_message(reply)
        return reply

    async def Login(self, stream: Stream[pb.LoginRequest, pb.LoginResponse]) -> None:
        reply = await self._serve(stream, "Login", self._sim.login, auth=False)
        if reply is not None:
            await stream.send_initial_metadata(metadata={api.AUTH_METADATA: reply.token})
            await stream.send_message(reply)

    async def PauseMining(
        self, stream: Stream[pb.PauseMiningRequest, pb.PauseMiningResponse]
    ) -> None:
        await self._serve(stream, "PauseMining", self._sim.pause)

    async def ResumeMining(
        self, stream: Stream[pb.ResumeMiningRequest, pb.ResumeMiningResponse]
    ) -> None:
        await self._serve(stream, "ResumeMining", self._sim.resume)

    async def GetTunerState(
        self, stream: Stream[pb.GetTunerStateRequest, pb.GetTunerStateResponse]
    ) -> None:
        await self._serve(stream, "GetTunerState", self._sim.tuner_state)

    async def SetPowerTarget(
        self, stream: Stream[pb.SetPowerTargetRequest, pb.SetPowerTargetResponse]
    ) -> None:
        await self._serve(stream, "SetPowerTarget", self._sim.set_power_target)

    async def GetActivePerformanceMode(
        self, stream: Stream[pb.GetPerformanceModeRequest, pb.PerformanceMode]
    ) -> None:
        await self._serve(stream, "GetActivePerformanceMode", self._sim.performance_mode)

    async def GetMinerConfiguration(
        self, stream: Stream[pb.GetMinerConfigurationRequest, pb.GetMinerConfigurationResponse]
    ) -> None:
        await self._serve(stream, "GetMinerConfiguration", self._sim.configuration)

    async def GetConstraints(
        self, stream: Stream[pb.GetConstraintsRequest, pb.GetConstraintsResponse]
    ) -> None:
        await self._serve(stream, "GetConstraints", self._sim.constraints)

    async def GetMinerDetails(
        self, stream: Stream[pb.GetMinerDetailsRequest, pb.GetMinerDetailsResponse]
    ) -> None:
        await self._serve(stream, "GetMinerDetails", self._sim.details)

    async def GetMinerStats(
        self, stream: Stream[pb.GetMinerStatsRequest, pb.GetMinerStatsResponse]
    ) -> None:
        await self._serve(stream, "GetMinerStats", self._sim.stats)


class _Connection(asyncio.Protocol):
    """grpclib's HTTP/2 protocol for one client connection, with its transport known to the
    servers: grpclib's `Server.close()` stops listening and cancels calls but leaves
    connections open, and a closed simulator must drop its clients as a dead miner does."""

    def __init__(self, inner: asyncio.Protocol, servers: BraiinsServers, k: int) -> None:
        self._inner = inner
        self._transports = servers.transports
        self._transport: asyncio.Transport | None = None
        servers.accepted[k] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transports.add(self._transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transports.discard(self._transport)
        self._inner.connection_lost(exc)


class _Server(Server):
    """A grpclib server whose connections `BraiinsServers.close()` can drop."""

    def __init__(self, servers: BraiinsServers, k: int) -> None:
        super().__init__([_MinerApi(servers, k)])
        self._servers = servers
        self._k = k

    def _protocol_factory(self) -> _Connection:  # type: ignore[override]
        return _Connection(super()._protocol_factory(), self._servers, self._k)


class BraiinsServers(MinerServers[BraiinsSim]):
    """The listeners of a set of simulated miners; `close()` stops them and their calls."""

    def __init__(self, sim: BraiinsSim) -> None:
        super().__init__(sim)
        self.grpc: list[Server] = []
        self.accepted = np.zeros(len(sim.specs), dtype=np.int64)
        """gRPC connections accepted, per miner (a client holding its channel opens one)."""
        # Only identification tools use the cgminer-style API: of the faults, SILENT alone
        # reaches it (the others are the gRPC calls').
        self.cgminer_api = MinerApi(
            self._cgminer_reply,
            sim.fault,
            FaultReplies(slow=False),
            max_request_bytes=CGMINER_MAX_REQUEST_BYTES,
        )

    def _cgminer_reply(self, k: int, request: bytes) -> bytes:
        return json.dumps(self.sim.cgminer_reply(k, request)).encode() + b"\x00"

    def landing_page(self, k: int) -> str:
        """The web UI's landing page, reduced to what identifies the firmware."""
        return (
            "<!DOCTYPE html><html><head><title>Braiins OS</title></head>"
            f"<body>Braiins OS+ {BOS_VERSION} on {self.sim.models[k]}</body></html>"
        )

    async def close(self) -> None:
        for server in self.grpc:
            server.close()
        await super().close()  # drops the gRPC connections too (their transports are ours)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(*(s.wait_closed() for s in self.grpc), return_exceptions=True)
        self.grpc.clear()


async def start_braiins_servers(
    physics: SitePhysics,
    indices: Sequence[int],
    specs: Sequence[DeviceSpec],
    *,
    token_ttl_s: float = float(api.TOKEN_TIMEOUT_S),
    api_port: int | None = None,
    http_port: int | None = None,
) -> BraiinsServers:
    """Serve physics rows `indices` as Braiins OS+ miners: gRPC on (spec.host, spec.port).

    `specs` is either parallel to `indices` or the whole site's list (indexed by row).
    `api_port` (e.g. 4028) also serves bosminer's cgminer-style API on each miner's address,
    `http_port` (e.g. 80) the web UI's landing page: what firmware scanners such as pyasic
    identify Braiins OS+ and the model by.
    """
    rows, mine = served_specs(physics, indices, specs)
    sim = BraiinsSim(physics, rows, mine, token_ttl_s=token_ttl_s)
    out = BraiinsServers(sim)
    try:
        for k, spec in enumerate(mine):
            server = _Server(out, k)
            await bind(spec, spec.port, server.start(spec.host, spec.port, backlog=64))
            out.grpc.append(server)
            if api_port is not None:
                await out.listen_api(out.cgminer_api, k, spec, api_port)
            if http_port is not None:
                await out.listen_page(sim.fault, k, spec, http_port, out.landing_page(k))
    except BaseException:
        await out.close()
        raise
    if rows:
        log.info("sim: %d Braiins OS+ miners listening", len(rows))
    return out


__all__ = [
    "BraiinsServers",
    "BraiinsSim",
    "efficiency_of",
    "start_braiins_servers",
]
