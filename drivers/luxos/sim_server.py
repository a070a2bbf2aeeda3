"""Simulated LuxOS miners: one TCP listener per miner on its own address and port 4028.

Each connection carries one command and its reply, then closes, as on a real miner. Replies
are built from the physics arrays at request time (power from `reported_w`, hashing from
`state`), so nothing runs per miner per physics tick. Commands write into the physics:
`profileset` sets the setpoint to the profile's watts, `curtail sleep|wakeup` sets run 0/1.

Per miner the simulator keeps only what the physics does not: the session (one at a time,
expiring `session_ttl_s` after its last use, checked lazily), the ATM flag and the boot time.
Faults come from `physics.fault[i]` per request: SILENT reads the request and never answers
(the command does not land), SLOW answers after SLOW_S, ERROR answers STATUS "E", GARBAGE
answers bytes that are not JSON, REBOOT drops the session and returns to the default profile.

A reboot is noticed at the next request, also when `physics.step()` already applied it and
cleared the flag: the physics command of a row then differs from what this simulator last
wrote there. So nothing but these servers (and reboots) may write the commands of LuxOS rows.

pyasic identifies a LuxOS miner from the `version`/`devdetails` replies on 4028 (it looks for
"LUXMINER" in the text) and its model from VERSION[0].Type ("Antminer S21"). It also probes
http://<ip>/ for "Luxor Firmware"; that page is optional here (`http_port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import numpy as np
import numpy.typing as npt

from drivers.base import ProtocolError
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.luxos import messages as m
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

log = logging.getLogger("rampd.sim")

REQUEST_TIMEOUT_S = 5.0
"""A client that connects and sends no complete request within this is dropped."""
SILENT_HOLD_S = 30.0
"""SILENT holds a connection open (answering nothing) at most this long."""
GARBAGE = b"\xff\xfeLUX\x00{{{ not json ]]\r\n"
POOL_URL = "stratum+tcp://btc.global.luxor.tech:700"

Handler = Callable[[int, tuple[str, ...]], m.Json]
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


@dataclass(frozen=True, slots=True)
class MinerModel:
    """Per-model constants of the simulator (hashrate follows power at this efficiency)."""

    efficiency_j_th: float
    default_mhz: float
    default_v: float


# Efficiencies are the vendors' nameplate figures (W per TH/s); default frequencies are the
# EEPROM settings LuxOS builds its 25 MHz profile ladder around.
MODELS: dict[str, MinerModel] = {
    "S21": MinerModel(17.5, 490.0, 13.0),  # Bitmain: 200 TH/s, 3500 W; 490 MHz stock
    "S21 PRO": MinerModel(15.0, 500.0, 13.0),  # Bitmain: 234 TH/s, 3510 W
    "S19J PRO": MinerModel(29.5, 545.0, 13.4),  # Bitmain: 104 TH/s, 3068 W; Luxor docs 545 MHz
    "S19 XP": MinerModel(21.5, 500.0, 13.0),  # Bitmain: 140 TH/s, 3010 W
}
DEFAULT_MODEL = MinerModel(20.0, 500.0, 13.0)


def type_name(spec: DeviceSpec) -> str:
    """VERSION.Type as LuxOS reports it: "Antminer S21"; pyasic keys its classes on it."""
    model = spec.access.model
    if not model:
        return spec.kind
    return model if model.lower().startswith("antminer") else f"Antminer {model}"


def model_of(spec: DeviceSpec) -> MinerModel:
    key = type_name(spec).upper().removeprefix("ANTMINER").strip()
    return MODELS.get(key, DEFAULT_MODEL)


@lru_cache(maxsize=256)
def profile_ladder(
    p_min_w: float, p_max_w: float, step_w: float, model: MinerModel
) -> tuple[m.Profile, ...]:
    """Profiles from "default" (p_max) down in steps of step_w to p_min, lowest first.

    LuxOS builds its presets in 25 MHz / 0.1 V steps around the EEPROM default; here each step
    costs step_w (the template's profile spacing), so the profiles are exactly the powers the
    physics can settle at. A continuous device (step 0) gets 8 evenly spaced profiles.
    """
    if step_w > 0:
        n = math.floor((p_max_w - p_min_w) / step_w + 1e-9)
        watts = [p_max_w - k * step_w for k in range(n + 1)]
        if watts[-1] > p_min_w + 1e-6:
            watts.append(p_min_w)
    elif p_max_w > p_min_w:
        watts = list(np.linspace(p_max_w, p_min_w, 8))
    else:
        watts = [p_max_w]
    out = []
    for k, w in enumerate(watts):
        mhz = model.default_mhz - 25.0 * k
        name = "default" if k == 0 else (f"{mhz:g}MHz" if mhz > 0 else f"-{k}")
        out.append(
            m.Profile(
                name=name,
                watts=round(float(w), 3),
                hashrate_ths=round(float(w), 3) / model.efficiency_j_th,
                frequency_mhz=max(mhz, 0.0),
                voltage_v=model.default_v - 0.1 * k,
                step=str(-k),
            )
        )
    return tuple(sorted(out, key=lambda p: p.watts))


class LuxosSim:
    """LuxOS behaviour of the miners at physics rows `rows` (local index k = position)."""

    def __init__(
        self,
        physics: SitePhysics,
        rows: Sequence[int],
        specs: Sequence[DeviceSpec],
        *,
        session_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(rows) != len(specs):
            raise ValueError(f"{len(rows)} rows but {len(specs)} specs")
        self.physics = physics
        self.rows: npt.NDArray[np.intp] = np.asarray(rows, dtype=np.intp)
        self.specs = tuple(specs)
        self.session_ttl_s = float(session_ttl_s)
        self._clock = clock
        n = len(specs)
        self.type_names = tuple(type_name(s) for s in specs)
        self.models = tuple(model_of(s) for s in specs)
        self.profiles = tuple(
            profile_ladder(s.p_min_w, s.p_max_w, s.step_w, mdl)
            for s, mdl in zip(specs, self.models, strict=True)
        )
        self.session: list[str] = [""] * n
        self.session_used = np.zeros(n)
        self.atm_enabled = np.ones(n, dtype=np.bool_)  # LuxOS ships with ATM on
        now = clock()
        self.boot_t = np.full(n, now)
        self.reboots = np.zeros(n, dtype=np.int64)
        # What this simulator last wrote into the physics commands; a difference is a reboot.
        self._sent_sp = physics.cmd_setpoint_w[self.rows].copy()
        self._sent_run = physics.cmd_run[self.rows].copy()
        self._reboot_seen = np.zeros(n, dtype=np.bool_)
        self.counts: Counter[tuple[int, str]] = Counter()
        """Commands served, by (miner, command): for tests and benchmarks."""
        self._handlers: dict[str, Handler] = {
            "version": self._version,
            "devdetails": self._devdetails,
            "power": self._power,
            "summary": self._summary,
            "stats": self._stats,
            "config": self._config,
            "profiles": self._profiles,
            "fans": self._fans,
            "tempctrl": self._tempctrl,
            "pools": self._pools,
            "groups": self._groups,
            "atm": self._atm,
            "session": self._session,
            "logon": self._logon,
            "logoff": self._logoff,
            "profileset": self._profileset,
            "curtail": self._curtail,
            "atmset": self._atmset,
        }

    # --- state derived from the physics ---

    def _row(self, k: int) -> int:
        return int(self.rows[k])

    def _hashing(self, k: int) -> bool:
        return int(self.physics.state[self._row(k)]) == DeviceState.ON

    def _psu_on(self, k: int) -> bool:
        return int(self.physics.state[self._row(k)]) != DeviceState.SLEEPING

    def _curtailed(self, k: int) -> bool:
        return int(self.physics.cmd_run[self._row(k)]) == 0

    def _watts(self, k: int) -> float:
        return max(float(self.physics.reported_w[self._row(k)]), 0.0)

    def _ghs(self, k: int) -> float:
        if not self._hashing(k):
            return 0.0
        return self._watts(k) / self.models[k].efficiency_j_th * 1e3

    def current_profile(self, k: int) -> m.Profile:
        return m.choose_profile(self.profiles[k], float(self.physics.cmd_setpoint_w[self._row(k)]))

    def _elapsed(self, k: int) -> int:
        return int(self._clock() - self.boot_t[k])

    def _command(self, k: int, setpoint_w: float | None = None, run: int | None = None) -> None:
        i = self._row(k)
        self.physics.command(i, setpoint_w=setpoint_w, run=run)
        self._sent_sp[k] = self.physics.cmd_setpoint_w[i]
        self._sent_run[k] = self.physics.cmd_run[i]

    def _check_reboot(self, k: int) -> None:
        ph, i = self.physics, self._row(k)
        flagged = int(ph.fault[i]) == Fault.REBOOT
        if not flagged:
            self._reboot_seen[k] = False
        changed = ph.cmd_setpoint_w[i] != self._sent_sp[k] or ph.cmd_run[i] != self._sent_run[k]
        if (flagged and not self._reboot_seen[k]) or changed:
            self._reboot_seen[k] = flagged
            if flagged:  # the restart lands now; physics.step() repeats it harmlessly
                self._command(k, setpoint_w=float(ph.default_setpoint_w[i]), run=1)
            self._sent_sp[k] = ph.cmd_setpoint_w[i]
            self._sent_run[k] = ph.cmd_run[i]
            self.session[k] = ""
            self.boot_t[k] = self._clock()
            self.reboots[k] += 1

    # --- sessions ---

    def active_session(self, k: int) -> str:
        sid = self.session[k]
        if sid and self._clock() - self.session_used[k] > self.session_ttl_s:
            self.session[k] = sid = ""
        return sid

    def _authorized(self, k: int, params: tuple[str, ...]) -> bool:
        sid = self.active_session(k)
        if not sid or not params or params[0] != sid:
            return False
        self.session_used[k] = self._clock()
        return True

    # --- dispatch ---

    def handle(self, k: int, req: m.Request) -> m.Json:
        """The reply to one request for miner k (faults aside)."""
        self._check_reboot(k)
        if "+" in req.command:
            if req.params:
                return m.error_reply(m.Code.INVALID_PARAMETER, "Multi-command takes no parameter")
            return m.multi_reply({c: self._one(k, c, ()) for c in req.commands})
        return self._one(k, req.command, req.params)

    def _one(self, k: int, command: str, params: tuple[str, ...]) -> m.Json:
        self.counts[k, command] += 1
        handler = self._handlers.get(command)
        if handler is None:
            return m.error_reply(m.Code.INVALID_COMMAND, f"Invalid command '{command[:40]}'")
        if command in m.PRIVILEGED and not self._authorized(k, params):
            return m.error_reply(m.Code.INVALID_SESSION, "Invalid session_id")
        return handler(k, params)

    # --- read commands ---

    def _version(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.version_reply(self.type_names[k])

    def _devdetails(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.devdetails_reply(self.type_names[k])

    def _power(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.power_reply(self._watts(k), self._psu_on(k))

    def _summary(self, k: int, _p: tuple[str, ...]) -> m.Json:
        ghs = self._ghs(k)
        return m.summary_reply(ghs, ghs, self._elapsed(k))

    def _stats(self, k: int, _p: tuple[str, ...]) -> m.Json:
        ideal = self.current_profile(k).hashrate_ths * 1e3 if self._hashing(k) else 0.0
        return m.stats_reply(self._ghs(k), ideal, self._elapsed(k))

    def _config(self, k: int, _p: tuple[str, ...]) -> m.Json:
        i = self._row(k)
        return m.config_reply(
            type_name=self.type_names[k],
            profile=self.current_profile(k).name,
            curtailed=self._curtailed(k),
            psu_on=self._psu_on(k),
            atm_enabled=bool(self.atm_enabled[k]),
            hostname=self.specs[k].name,
            mac="02:00:{:02x}:{:02x}:{:02x}:{:02x}".format(*i.to_bytes(4, "big")),
        )

    def _profiles(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.profiles_reply(self.profiles[k])

    def _fans(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.fans_reply(5400, 60) if self._hashing(k) else m.fans_reply(0, 0)

    def _tempctrl(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.tempctrl_reply()

    def _pools(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.pools_reply(POOL_URL, f"rampd.{self.specs[k].name}", self._hashing(k))

    def _groups(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.groups_reply()

    def _atm(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.atm_reply(bool(self.atm_enabled[k]))

    # --- sessions ---

    def _session(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.session_reply(self.active_session(k), created=False)

    def _logon(self, k: int, _p: tuple[str, ...]) -> m.Json:
        if self.active_session(k):
            return m.error_reply(m.Code.SESSION_BUSY, "Another session is active")
        alphabet = string.ascii_letters + string.digits
        sid = "".join(secrets.choice(alphabet) for _ in range(8))
        self.session[k] = sid
        self.session_used[k] = self._clock()
        return m.session_reply(sid, created=True)

    def _logoff(self, k: int, _p: tuple[str, ...]) -> m.Json:
        self.session[k] = ""
        return m.ok_reply(m.Code.SESSION_DROPPED, "Session dropped")

    # --- privileged (session already checked) ---

    def _profileset(self, k: int, p: tuple[str, ...]) -> m.Json:
        if len(p) < 2 or not p[1]:
            return m.error_reply(m.Code.INVALID_PARAMETER, "Missing profile name")
        if self._curtailed(k):
            return m.error_reply(m.Code.CURTAILED, "Cannot set profile: curtail mode is sleep")
        for prof in self.profiles[k]:
            if prof.name == p[1]:
                self._command(k, setpoint_w=prof.watts)
                return m.profileset_reply(prof.name)
        return m.error_reply(m.Code.INVALID_PARAMETER, f"Invalid profile '{p[1][:40]}'")

    def _curtail(self, k: int, p: tuple[str, ...]) -> m.Json:
        action = p[1].lower() if len(p) > 1 else ""
        if action == m.SLEEP:
            self._command(k, run=0)
        elif action == m.WAKEUP:
            if not self._curtailed(k):
                return m.error_reply(m.Code.ALREADY_ACTIVE, "Miner is already active")
            self._command(k, run=1)
        else:
            return m.error_reply(m.Code.INVALID_PARAMETER, "Action must be sleep or wakeup")
        return m.curtail_reply(action)

    def _atmset(self, k: int, p: tuple[str, ...]) -> m.Json:
        for item in p[1:]:
            key, _, value = item.partition("=")
            if key.strip().lower() == "enabled":
                if value.strip().lower() not in ("true", "false"):
                    return m.error_reply(m.Code.INVALID_PARAMETER, "enabled must be true or false")
                self.atm_enabled[k] = value.strip().lower() == "true"
        return m.ok_reply(m.Code.ATM_SET, "Advanced Thermal Management configuration updated")


class _ApiConnection(asyncio.Protocol):
    """One connection to a miner's API: a request in, the reply out, closed.

    A bare Protocol, not streams and a task: a site's thousands of miners answer every poll and
    every command on a new connection, and the simulator must stay cheaper than the clients it
    serves. Only a SLOW fault takes a task (it sleeps); SILENT holds the connection on a timer.
    """

    def __init__(self, servers: LuxosServers, k: int) -> None:
        self._servers = servers
        self._k = k
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._servers.transports.add(self._transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REQUEST_TIMEOUT_S, self._transport.close)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # SILENT reads and discards
        self._buf += data
        try:
            end = m.object_end(self._buf)
        except ProtocolError:
            end = len(self._buf)  # not JSON: answer it as such
        if end is None and len(self._buf) <= m.MAX_MESSAGE_BYTES:
            return
        self._answer(bytes(self._buf[: end or len(self._buf)]))

    def eof_received(self) -> bool:
        if not self._answered:
            if self._buf:
                self._answer(bytes(self._buf))
                return True  # keep our side open until the reply is out
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._servers.transports.discard(self._transport)

    def _answer(self, request: bytes) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fault() == Fault.SLOW:
            task = asyncio.get_running_loop().create_task(self._slow(request))
            self._servers.conns.add(task)
            task.add_done_callback(self._servers.conns.discard)
        else:
            self._reply(request)

    async def _slow(self, request: bytes) -> None:
        await asyncio.sleep(SLOW_S)
        self._reply(request)

    def _fault(self) -> int:
        return int(self._servers.sim.physics.fault[int(self._servers.sim.rows[self._k])])

    def _reply(self, request: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        fault = self._fault()
        if fault == Fault.SILENT:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(SILENT_HOLD_S, transport.close)
            return
        if fault == Fault.GARBAGE:
            transport.write(GARBAGE)
        elif fault == Fault.ERROR:
            transport.write(m.encode_reply(m.error_reply(m.Code.INTERNAL, "Internal error")))
        else:
            try:
                reply = self._servers.sim.handle(self._k, m.decode_request(request))
            except ProtocolError as exc:
                reply = m.error_reply(m.Code.INVALID_COMMAND, f"Invalid JSON: {exc}"[:80])
            transport.write(m.encode_reply(reply))
        transport.close()  # after the buffered reply is written


class LuxosServers:
    """The listeners of a set of simulated miners; `close()` stops them and their connections."""

    def __init__(self, sim: LuxosSim) -> None:
        self.sim = sim
        self.servers: list[asyncio.Server] = []
        self.conns: set[asyncio.Task[None]] = set()
        self.transports: set[asyncio.Transport] = set()

    @property
    def physics(self) -> SitePhysics:
        return self.sim.physics

    async def serve_http(self, k: int, reader: Reader, w: Writer) -> None:
        """The web UI's landing page, reduced to what identifies the firmware."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await reader.readuntil(b"\r\n\r\n")
            if int(self.sim.physics.fault[int(self.sim.rows[k])]) == Fault.SILENT:
                return
            body = (
                "<!DOCTYPE html><html><head><title>Luxor Firmware</title></head>"
                f"<body>LuxOS {m.LUXMINER_VERSION} on {self.sim.type_names[k]}</body></html>"
            ).encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            w.write(head + body)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await w.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for transport in list(self.transports):
            transport.abort()
        for task in list(self.conns):
            task.cancel()
        if self.conns:
            await asyncio.wait(list(self.conns), timeout=2.0)
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()
        self.servers.clear()


async def start_luxos_servers(
    physics: SitePhysics,
    indices: Sequence[int],
    specs: Sequence[DeviceSpec],
    *,
    session_ttl_s: float = 60.0,
    http_port: int | None = None,
) -> LuxosServers:
    """Serve physics rows `indices` as LuxOS miners on (spec.host, spec.port).

    `specs` is either parallel to `indices` or the whole site's list (indexed by row).
    `http_port` (e.g. 80) also serves the firmware's landing page on each miner's address.
    """
    rows = [int(i) for i in indices]
    if len(specs) == len(rows):
        mine = list(specs)
    elif len(specs) == physics.n:
        mine = [specs[i] for i in rows]
    else:
        raise ValueError(f"{len(specs)} specs for {len(rows)} miners of {physics.n} rows")
    sim = LuxosSim(physics, rows, mine, session_ttl_s=session_ttl_s)
    out = LuxosServers(sim)
    try:
        for k, spec in enumerate(mine):
            out.servers.append(await _listen(out, k, spec.host, spec.port, http=False))
            if http_port is not None:
                out.servers.append(await _listen(out, k, spec.host, http_port, http=True))
    except BaseException:
        await out.close()
        raise
    if rows:
        log.info("sim: %d LuxOS miners listening", len(rows))
    return out


async def _listen(out: LuxosServers, k: int, host: str, port: int, *, http: bool) -> asyncio.Server:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # so close() can end connections a fault holds open
            out.conns.add(task)
        try:
            await out.serve_http(k, reader, writer)
        finally:
            if task is not None:
                out.conns.discard(task)

    try:
        if not http:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: _ApiConnection(out, k), host, port, backlog=64)
        return await asyncio.start_server(on_connect, host, port, backlog=64)
    except OSError as exc:
        name = out.sim.specs[k].name
        raise OSError(f"sim: cannot listen on {host}:{port} for {name}: {exc.strerror}") from None


__all__ = [
    "MODELS",
    "LuxosServers",
    "LuxosSim",
    "MinerModel",
    "model_of",
    "profile_ladder",
    "start_luxos_servers",
    "type_name",
]
