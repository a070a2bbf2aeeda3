"""Simulated Whatsminers (API v2): one TCP listener per miner on its own address and port 4028.

Each connection carries one request and its reply, then closes, as on a real miner. Replies are
built from the physics arrays at request time (power from `reported_w`, hashing from `state`),
so nothing runs per miner per physics tick. Privileged commands write into the physics:
`set_power_pct` sets the setpoint to that percent of the rated power (capped by the power limit),
`adjust_power_limit` sets the limit (the real firmware reboots for it; here it just takes it),
`power_off` / `power_on` set run 0/1.

Per miner the simulator keeps only what the physics does not: the salt of its admin password,
the tokens it handed out (valid `token_ttl_s` after `get_token`, reusable within it as pyasic
expects, or one command each with `single_use_tokens`; at most `max_tokens` alive, then
`get_token` answers 136), the percent and power limit, and the boot time (summary's Elapsed).
Requests it cannot decrypt (wrong password), with an unknown or expired token, and unknown
commands get the firmware's failure answers (`messages`). Faults come from `physics.fault[i]`
per request: SILENT reads the request and never answers, SLOW answers after SLOW_S, ERROR
answers STATUS "E", GARBAGE answers bytes that are not JSON, REBOOT forgets the percent and the
tokens (set_power_pct is a temporary adjustment) and restarts the boot clock.

A reboot is noticed at the next request, also when `physics.step()` already applied it: the
physics command of a row then differs from what this simulator last wrote there, so nothing but
these servers (and reboots) may write the commands of Whatsminer rows.

pyasic identifies a Whatsminer by "BTMINER"/"BITMICRO" in the `devdetails` reply on 4028, its
model from DEVDETAILS[0].Model ("M60S_VK30" -> M60SVK30) and its API generation from
`get_version`'s fw_ver (a build before 2024-11: API v2 on 4028).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from drivers.base import ProtocolError
from drivers.cgminer.server import FaultReplies, MinerApi, MinerServers, served_specs
from drivers.cgminer.sim import MinerRows
from drivers.core.spec import DeviceSpec
from drivers.sim.physics import SitePhysics
from drivers.whatsminer import crypto
from drivers.whatsminer import messages as m

log = logging.getLogger("rampd.sim")

TOKEN_TTL_S = 1800.0
"""A token's life on the miner: 30 minutes (what pyasic and other clients cache it for)."""
MAX_TOKENS = 32
"""Tokens alive at once before `get_token` answers "token over max times" [assumed]."""
GARBAGE = b"\xff\xfeBTM\x00{{{ not json ]]\r\n"
POOL_URL = "stratum+tcp://btc.f2pool.com:1314"
_ALPHABET = string.ascii_letters + string.digits

Json = dict[str, Any]
Handler = Callable[[int, Json], Json]


@dataclass(frozen=True, slots=True)
class MinerModel:
    """Per-model constants of the simulator (hashrate follows power at this efficiency)."""

    efficiency_j_th: float
    chip: str
    freq_mhz: float


# MicroBT datasheets: M60S 186 TH/s at 18.5 J/TH; M50S 126 TH/s at 26 J/TH. Chip names and
# frequencies are what such miners report [assumed]; nothing here depends on them.
MODELS: dict[str, MinerModel] = {
    "M60S": MinerModel(18.5, "K88", 540.0),
    "M50S": MinerModel(26.0, "K68", 600.0),
}
DEFAULT_MODEL = MinerModel(20.0, "K88", 540.0)


def model_name(spec: DeviceSpec) -> str:
    """DEVDETAILS Model as the firmware reports it ("M60S_VK30")."""
    return spec.access.model or spec.kind


def model_of(spec: DeviceSpec) -> MinerModel:
    family = model_name(spec).upper().split("_")[0].split(".")[0]
    return MODELS.get(family, DEFAULT_MODEL)


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


class WhatsminerSim(MinerRows):
    """Whatsminer behaviour of the miners at physics rows `rows` (local index k = position)."""

    def __init__(
        self,
        physics: SitePhysics,
        rows: Sequence[int],
        specs: Sequence[DeviceSpec],
        *,
        token_ttl_s: float = TOKEN_TTL_S,
        single_use_tokens: bool = False,
        max_tokens: int = MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(physics, rows, specs, clock)
        self.token_ttl_s = float(token_ttl_s)
        self.single_use_tokens = single_use_tokens
        self.max_tokens = max_tokens
        n = len(specs)
        self.models = tuple(model_of(s) for s in specs)
        self.model_names = tuple(model_name(s) for s in specs)
        self.passwords = [m.password_of(s.access) for s in specs]
        self.salts = [_random(8) for _ in range(n)]
        self.rated_w = np.array([s.p_max_w for s in specs], dtype=np.float64)
        self.limit_w = self.rated_w.copy()
        self.pct = np.full(n, m.PCT_MAX, dtype=np.int64)
        self.tokens: list[dict[str, float]] = [{} for _ in range(n)]
        """Per miner: token sign -> when it was handed out."""
        self.counts: Counter[tuple[int, str]] = Counter()
        """Requests served, by (miner, command); failures under "!<code>"."""
        self._plain: dict[str, Handler] = {
            "summary": self._summary,
            "devs": self._devs,
            "edevs": self._devs,
            "devdetails": self._devdetails,
            "pools": self._pools,
            "get_version": self._get_version,
            "status": self._status,
            "get_psu": self._get_psu,
            "get_miner_info": self._get_miner_info,
            "get_error_code": self._get_error_code,
            "get_token": self._get_token,
        }
        self._privileged: dict[str, Handler] = {
            "set_power_pct": self._set_power_pct,
            "set_power_pct_v2": self._set_power_pct,
            "power_off": self._power_off,
            "power_on": self._power_on,
            "adjust_power_limit": self._adjust_power_limit,
        }

    # --- state derived from the physics ---

    def _mineroff(self, k: int) -> bool:
        return int(self.physics.cmd_run[self._row(k)]) == 0

    def _watts(self, k: int) -> float:
        return max(float(self.physics.reported_w[self._row(k)]), 0.0)

    def _ghs(self, k: int) -> float:
        if not self.hashing(k):
            return 0.0
        return self._watts(k) / self.models[k].efficiency_j_th * 1e3

    def setpoint_w(self, k: int) -> float:
        """What the miner aims at: its percent of the rated power, capped by its limit."""
        return min(float(self.pct[k]) / 100.0 * float(self.rated_w[k]), float(self.limit_w[k]))

    def _mac(self, k: int) -> str:
        return "C6:07:{:02X}:{:02X}:{:02X}:{:02X}".format(*self._row(k).to_bytes(4, "big"))

    def _restarted(self, k: int, flagged: bool) -> None:
        self.pct[k] = m.PCT_MAX  # set_power_pct is not kept across a restart
        self.tokens[k].clear()
        self._command(k, setpoint_w=self.setpoint_w(k), run=1)

    # --- tokens ---

    def _live_tokens(self, k: int) -> dict[str, float]:
        tokens, now = self.tokens[k], self._clock()
        for sign in [s for s, t in tokens.items() if now - t > self.token_ttl_s]:
            del tokens[sign]
        return tokens

    def key(self, k: int) -> bytes:
        return crypto.aes_key(self.passwords[k], self.salts[k])

    # --- dispatch ---

    def handle(self, k: int, request: bytes) -> Json:
        """The reply to one request for miner k (faults aside), not yet encoded."""
        self.check_reboot(k)
        try:
            obj = m.decode_object(request)
        except ProtocolError:
            return self._fail(k, m.Code.INVALID_JSON, m.MSG_INVALID_JSON)
        if "enc" in obj:
            return self._encrypted(k, obj)
        command = obj.get("command", obj.get("cmd"))
        if not isinstance(command, str) or not command:
            return self._fail(k, m.Code.INVALID_JSON, m.MSG_INVALID_JSON)
        if "+" in command:
            parts = command.split("+")
            if all(p in m.CGMINER_COMMANDS for p in parts):
                return m.multi_reply({p: self._plain_one(k, p, obj) for p in parts})
            return self._fail(k, m.Code.INVALID_COMMAND, m.MSG_INVALID_COMMAND)
        return self._plain_one(k, command, obj)

    def _fail(self, k: int, code: int, msg: str) -> Json:
        self.counts[k, f"!{int(code)}"] += 1
        return m.error_reply(code, msg)

    def _plain_one(self, k: int, command: str, obj: Json) -> Json:
        handler = self._plain.get(command)
        if handler is None:
            if command in self._privileged:  # a write command sent in the clear
                return self._fail(k, m.Code.PERMISSION_DENIED, "permission denied")
            return self._fail(k, m.Code.INVALID_COMMAND, m.MSG_INVALID_COMMAND)
        self.counts[k, command] += 1
        return handler(k, obj)

    def _encrypted(self, k: int, obj: Json) -> Json:
        data = obj.get("data")
        if not isinstance(data, str):
            return self._fail(k, m.Code.INVALID_JSON, m.MSG_INVALID_JSON)
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return self._fail(k, m.Code.BASE64, m.MSG_BASE64)
        key = self.key(k)
        try:
            cmd = crypto.decrypt(key, data)
        except crypto.CryptoError:  # another key: the client's password is not ours
            return self._fail(k, m.Code.INVALID_JSON, m.MSG_INVALID_JSON)
        sign = cmd.get("token")
        issued = self.tokens[k].get(sign) if isinstance(sign, str) else None
        if issued is None:
            return self._fail(k, m.Code.TOKEN_CHECK, m.MSG_TOKEN_INVALID)
        if self._clock() - issued > self.token_ttl_s:
            del self.tokens[k][cast(str, sign)]
            return self._fail(k, m.Code.TOKEN_CHECK, m.MSG_TOKEN_EXPIRED)
        if self.single_use_tokens:
            del self.tokens[k][cast(str, sign)]
        command = cmd.get("cmd")
        handler = self._privileged.get(command) if isinstance(command, str) else None
        if handler is None:
            self.counts[k, f"!{int(m.Code.INVALID_COMMAND)}"] += 1
            reply = m.error_reply(m.Code.INVALID_COMMAND, m.MSG_INVALID_COMMAND)
        else:
            self.counts[k, cast(str, command)] += 1
            reply = handler(k, cmd)
        return m.encrypted_reply(key, reply)

    # --- plain commands ---

    def _summary(self, k: int, _o: Json) -> Json:
        mdl = self.models[k]
        fields = m.SummaryFields(
            power_w=self._watts(k),
            ghs=self._ghs(k),
            factory_ghs=float(self.rated_w[k]) / mdl.efficiency_j_th * 1e3,
            power_limit_w=float(self.limit_w[k]),
            elapsed_s=self.elapsed(k),
            mac=self._mac(k),
            freq_mhz=mdl.freq_mhz * self.setpoint_w(k) / float(self.rated_w[k])
            if self.hashing(k)
            else 0.0,
            fan_rpm=4800 if self.hashing(k) else 0,
        )
        return m.summary_reply(fields)

    def _devs(self, k: int, _o: Json) -> Json:
        mdl = self.models[k]
        factory = float(self.rated_w[k]) / mdl.efficiency_j_th * 1e3
        return m.devs_reply(self._ghs(k), factory, mdl.freq_mhz if self.hashing(k) else 0.0)

    def _devdetails(self, k: int, _o: Json) -> Json:
        return m.devdetails_reply(self.model_names[k])

    def _pools(self, k: int, _o: Json) -> Json:
        return m.pools_reply(POOL_URL, f"rampd.{self.specs[k].name}", self.hashing(k))

    def _get_version(self, k: int, _o: Json) -> Json:
        return m.version_reply(self.models[k].chip)

    def _status(self, k: int, _o: Json) -> Json:
        return m.status_reply(self._mineroff(k))

    def _get_psu(self, k: int, _o: Json) -> Json:
        return m.psu_reply(self._watts(k), self.hashing(k))

    def _get_miner_info(self, k: int, _o: Json) -> Json:
        spec = self.specs[k]
        serial = f"HTM{self._row(k):012d}"
        return m.miner_info_reply(spec.host, spec.name, self._mac(k), serial)

    def _get_error_code(self, k: int, _o: Json) -> Json:
        return m.error_code_reply()

    def _get_token(self, k: int, _o: Json) -> Json:
        tokens = self._live_tokens(k)
        if len(tokens) >= self.max_tokens:
            self.counts[k, f"!{int(m.Code.TOKEN_MAX)}"] += 1
            return m.error_reply(m.Code.TOKEN_MAX, m.MSG_TOKEN_MAX)
        time_s = f"{int(time.time()) % 10000:04d}"
        newsalt = _random(8)
        sign = crypto.token_sign(self.passwords[k], self.salts[k], time_s, newsalt)
        tokens[sign] = self._clock()
        return m.token_reply(time_s, self.salts[k], newsalt)

    # --- privileged commands (token checked) ---

    def _set_power_pct(self, k: int, cmd: Json) -> Json:
        value = cmd.get("percent")
        try:
            pct = int(str(value).strip())
        except ValueError:
            pct = -1
        if not m.PCT_MIN <= pct <= m.PCT_MAX:
            return m.error_reply(m.Code.COMMAND_ERROR, "invalid percent")
        self.pct[k] = pct
        self._command(k, setpoint_w=self.setpoint_w(k))
        return m.ok_reply()

    def _power_off(self, k: int, _c: Json) -> Json:
        self._command(k, run=0)
        return m.ok_reply()

    def _power_on(self, k: int, _c: Json) -> Json:
        self._command(k, run=1)
        return m.ok_reply()

    def _adjust_power_limit(self, k: int, cmd: Json) -> Json:
        try:
            limit = int(str(cmd.get("power_limit")).strip())
        except ValueError:
            limit = 0
        if limit == 99999:  # the documented reset to the miner's own maximum
            limit = int(self.rated_w[k])
        if not 0 < limit <= self.rated_w[k]:
            return m.error_reply(m.Code.COMMAND_ERROR, "invalid power limit")
        self.limit_w[k] = limit
        self._command(k, setpoint_w=self.setpoint_w(k))
        return m.ok_reply()


class WhatsminerServers(MinerServers[WhatsminerSim]):
    """The listeners of a set of simulated miners; `close()` stops them and their connections."""

    def __init__(self, sim: WhatsminerSim) -> None:
        super().__init__(sim)
        self.api = MinerApi(self._reply, sim.fault, FaultReplies(GARBAGE, self._error))

    def _reply(self, k: int, request: bytes) -> bytes:
        return m.encode_reply(self.sim.handle(k, request))

    def _error(self, k: int) -> bytes:
        return m.encode_reply(m.error_reply(m.Code.COMMAND_ERROR, "internal error"))


async def start_whatsminer_servers(
    physics: SitePhysics,
    indices: Sequence[int],
    specs: Sequence[DeviceSpec],
    *,
    token_ttl_s: float = TOKEN_TTL_S,
    single_use_tokens: bool = False,
    max_tokens: int = MAX_TOKENS,
) -> WhatsminerServers:
    """Serve physics rows `indices` as Whatsminers on (spec.host, spec.port).

    `specs` is either parallel to `indices` or the whole site's list (indexed by row).
    """
    rows, mine = served_specs(physics, indices, specs)
    if not math.isfinite(token_ttl_s) or token_ttl_s <= 0:
        raise ValueError("token_ttl_s must be a positive number of seconds")
    sim = WhatsminerSim(
        physics,
        rows,
        mine,
        token_ttl_s=token_ttl_s,
        single_use_tokens=single_use_tokens,
        max_tokens=max_tokens,
    )
    out = WhatsminerServers(sim)
    try:
        for k, spec in enumerate(mine):
            await out.listen_api(out.api, k, spec, spec.port)
    except BaseException:
        await out.close()
        raise
    if rows:
        log.info("sim: %d Whatsminers listening", len(rows))
    return out


__all__ = [
    "MODELS",
    "MinerModel",
    "WhatsminerServers",
    "WhatsminerSim",
    "model_name",
    "model_of",
    "start_whatsminer_servers",
]
