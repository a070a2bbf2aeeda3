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

import logging
import math
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from drivers.base import ProtocolError
from drivers.cgminer.server import FaultReplies, MinerApi, MinerServers, served_specs
from drivers.cgminer.sim import MinerRows
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.luxos import messages as m
from drivers.sim.physics import SitePhysics

log = logging.getLogger("rampd.sim")

GARBAGE = b"\xff\xfeLUX\x00{{{ not json ]]\r\n"
POOL_URL = "stratum+tcp://btc.global.luxor.tech:700"

Handler = Callable[[int, tuple[str, ...]], m.Json]


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


class LuxosSim(MinerRows):
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
        super().__init__(physics, rows, specs, clock)
        self.session_ttl_s = float(session_ttl_s)
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

    def _psu_on(self, k: int) -> bool:
        return int(self.physics.state[self._row(k)]) != DeviceState.SLEEPING

    def _curtailed(self, k: int) -> bool:
        return int(self.physics.cmd_run[self._row(k)]) == 0

    def _watts(self, k: int) -> float:
        return max(float(self.physics.reported_w[self._row(k)]), 0.0)

    def _ghs(self, k: int) -> float:
        if not self.hashing(k):
            return 0.0
        return self._watts(k) / self.models[k].efficiency_j_th * 1e3

    def current_profile(self, k: int) -> m.Profile:
        return m.choose_profile(self.profiles[k], float(self.physics.cmd_setpoint_w[self._row(k)]))

    def _restarted(self, k: int, flagged: bool) -> None:
        super()._restarted(k, flagged)
        self.session[k] = ""

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
        self.check_reboot(k)
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
        return m.summary_reply(ghs, ghs, self.elapsed(k))

    def _stats(self, k: int, _p: tuple[str, ...]) -> m.Json:
        ideal = self.current_profile(k).hashrate_ths * 1e3 if self.hashing(k) else 0.0
        return m.stats_reply(self._ghs(k), ideal, self.elapsed(k))

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
        return m.fans_reply(5400, 60) if self.hashing(k) else m.fans_reply(0, 0)

    def _tempctrl(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.tempctrl_reply()

    def _pools(self, k: int, _p: tuple[str, ...]) -> m.Json:
        return m.pools_reply(POOL_URL, f"rampd.{self.specs[k].name}", self.hashing(k))

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


class LuxosServers(MinerServers[LuxosSim]):
    """The listeners of a set of simulated miners; `close()` stops them and their connections."""

    def __init__(self, sim: LuxosSim) -> None:
        super().__init__(sim)
        self.api = MinerApi(self._reply, sim.fault, FaultReplies(GARBAGE, self._error))

    def _reply(self, k: int, request: bytes) -> bytes:
        try:
            reply = self.sim.handle(k, m.decode_request(request))
        except ProtocolError as exc:
            reply = m.error_reply(m.Code.INVALID_COMMAND, f"Invalid JSON: {exc}"[:80])
        return m.encode_reply(reply)

    def _error(self, k: int) -> bytes:
        return m.encode_reply(m.error_reply(m.Code.INTERNAL, "Internal error"))

    def landing_page(self, k: int) -> str:
        """The web UI's landing page, reduced to what identifies the firmware."""
        return (
            "<!DOCTYPE html><html><head><title>Luxor Firmware</title></head>"
            f"<body>LuxOS {m.LUXMINER_VERSION} on {self.sim.type_names[k]}</body></html>"
        )


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
    rows, mine = served_specs(physics, indices, specs)
    sim = LuxosSim(physics, rows, mine, session_ttl_s=session_ttl_s)
    out = LuxosServers(sim)
    try:
        for k, spec in enumerate(mine):
            await out.listen_api(out.api, k, spec, spec.port)
            if http_port is not None:
                await out.listen_page(sim.fault, k, spec, http_port, out.landing_page(k))
    except BaseException:
        await out.close()
        raise
    if rows:
        log.info("sim: %d LuxOS miners listening", len(rows))
    return out


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
