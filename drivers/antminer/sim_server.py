"""Simulated Antminers on stock firmware: the digest-protected web interface on each miner's
address (spec.port, 80 as on a real miner), optionally the cgminer-style RPC on `rpc_port`.

All miners share one aiohttp application and runner; each listens on its own (host, port) and a
request is routed to its miner by the local address it arrived on, so a site of thousands of
miners costs one listening socket each. Replies are built from the physics arrays at request
time (`drivers.antminer.web` builds them): the hashrate is `physics.reported_w` over the model's
efficiency while the row is ON, the expected hashrate is the configured mode's preset over the
same efficiency. No power is reported anywhere, as on real stock firmware.

The mode lives in the physics' command of the row: normal runs at the setpoint p_max, low power
at p_min (the template's low-power preset), sleep is run=0; `set_miner_conf` writes it there.
Mode changes restart the mining process on a real miner; the template's dead time and wake
time stand for that. Per miner the simulator keeps only what the physics does not: the stored
configuration (pools, fan settings), the boot time and a boot counter (nonces of an earlier
boot are stale). The cgi rewrites the stored configuration from the body of every set (fields
left out are lost: pools included), which is why clients send the whole configuration back.
[assumed: firmware differ here; sending the whole configuration is right on all of them.]

Authentication as lighttpd does it: every path, the landing page included, needs digest auth
(realm "antMiner Configuration", MD5, qop "auth"); a request without it, with a wrong
password, or with a nonce this miner did not issue gets 401 and a fresh challenge; a nonce
older than NONCE_TTL_S or from before a reboot gets 401 with `stale=true`. Nonces are stateless
(an HMAC of the miner, its boot count and the time), so thousands of clients cost no memory.

Faults from `physics.fault[i]`: SILENT never answers (the handler waits until the fault clears
or the client gives up), SLOW answers after SLOW_S, ERROR answers 500 from lighttpd, GARBAGE
answers 200 with a body that is not JSON, REBOOT is noticed at the next request (also after
`physics.step()` applied it: the physics command then differs from what this simulator wrote):
the mode returns to the physics default (normal), the uptime and nonces start again. [A real
miner keeps its stored mode across a reboot; the physics' reboot model is a miner whose mode
did not survive, the case a driver's readback exists for.]

pyasic 0.79 identifies a stock Antminer by the 401 on http://<ip>/ whose WWW-Authenticate
names realm "antMiner...", rules out Marathon firmware by a 404 (not JSON) on
/kaonsu/v1/brief, and reads the model from get_system_info.cgi's `minertype` (or the RPC's
VERSION[0].Type), keying "ANTMINER S21" to its BMMinerS21 class (AntminerModern). Its
hashrate and uptime come from the RPC (`rpc_port` 4028).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from drivers.antminer import web as w
from drivers.cgminer.server import FaultReplies, MinerApi, MinerServers, bind, served_specs
from drivers.cgminer.sim import MinerRows
from drivers.core.spec import DeviceSpec
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

log = logging.getLogger("rampd.sim")

NONCE_TTL_S = 600.0
"""A nonce older than this is stale (a new challenge with stale=true) [assumed: lighttpd's
digest nonces carry their issue time and expire after minutes]."""
_SILENT_POLL_S = 0.05
SETS_KEPT = 10_000
"""Accepted set bodies kept for tests (bounded: a long simulated run sends millions)."""
RPC_MAX_REQUEST_BYTES = 4096
"""An RPC request not complete at this size is answered as it is (bmminer's are small)."""
GARBAGE = b'{"STATUS":{"STATUS":"S","when":\xff\xfe,,"rate_5s":'
_HTML_401 = (
    "<html><head><title>401 Unauthorized</title></head>"
    "<body><h1>401 Unauthorized</h1></body></html>"
)
_HTML_404 = (
    "<html><head><title>404 Not Found</title></head><body><h1>404 Not Found</h1></body></html>"
)
_HTML_500 = (
    "<html><head><title>500 Internal Server Error</title></head>"
    "<body><h1>500 Internal Server Error</h1></body></html>"
)
_LANDING = (
    "<!DOCTYPE html><html><head><title>Antminer</title></head>"
    "<body><div id='app'>Antminer web console</div></body></html>"
)
Json = dict[str, Any]
DEFAULT_POOLS: tuple[Json, ...] = (
    {"url": "stratum+tcp://btc.example.net:3333", "user": "rampd.{name}", "pass": "x"},
    {"url": "", "user": "", "pass": ""},
    {"url": "", "user": "", "pass": ""},
)


@dataclass(frozen=True, slots=True)
class Model:
    """What the simulator needs of a model: nameplate efficiency (W per TH/s) and board count."""

    efficiency_j_th: float
    chains: int = 3
    asics: int = 108


# Nameplate efficiencies from Bitmain's spec sheets.
MODELS: dict[str, Model] = {
    "S21": Model(17.5),  # 200 TH/s, 3500 W
    "S21 PRO": Model(15.0, 3, 65),  # 234 TH/s, 3510 W
    "S19J PRO": Model(29.5, 3, 126),  # 104 TH/s, 3068 W
    "S19 XP": Model(21.5, 3, 110),  # 140 TH/s, 3010 W
}
DEFAULT_MODEL = Model(20.0)


def type_name(spec: DeviceSpec) -> str:
    """`minertype` / VERSION.Type: "Antminer S21"."""
    model = spec.access.model
    if not model:
        return "Antminer S21"
    return model if model.lower().startswith("antminer") else f"Antminer {model}"


def model_of(spec: DeviceSpec) -> Model:
    return MODELS.get(type_name(spec).upper().removeprefix("ANTMINER").strip(), DEFAULT_MODEL)


class AntminerSim(MinerRows):
    """Stock-firmware behaviour of the miners at physics rows `rows` (local index k)."""

    def __init__(
        self,
        physics: SitePhysics,
        rows: Sequence[int],
        specs: Sequence[DeviceSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(physics, rows, specs, clock)
        n = len(specs)
        self.type_names = tuple(type_name(s) for s in specs)
        self.models = tuple(model_of(s) for s in specs)
        self.credentials = tuple(
            (s.access.username or w.DEFAULT_USERNAME, _password(s)) for s in specs
        )
        self._secret = secrets.token_bytes(16)
        self.stored: list[Json | None] = [None] * n
        """Configuration fields as last set (None: the factory configuration)."""
        self.boots = np.zeros(n, dtype=np.int64)
        self.counts: Counter[tuple[int, str]] = Counter()
        """Authenticated requests answered, by (miner, path); for tests and benchmarks."""
        self.auth_failures: Counter[int] = Counter()
        """401s for wrong credentials or foreign nonces (not the first, unauthenticated try)."""
        self.sets: deque[tuple[int, Json]] = deque(maxlen=SETS_KEPT)
        """The set_miner_conf bodies accepted, in order: (miner, body); the latest SETS_KEPT."""

    # --- state derived from the physics ---

    def mode(self, k: int) -> w.Mode:
        i = self._row(k)
        if int(self.physics.cmd_run[i]) == 0:
            return w.Mode.SLEEP
        spec = self.specs[k]
        mid = 0.5 * (spec.p_min_w + spec.p_max_w)
        return w.Mode.NORMAL if float(self.physics.cmd_setpoint_w[i]) >= mid else w.Mode.LOW

    def preset_w(self, k: int, mode: w.Mode) -> float:
        spec = self.specs[k]
        return spec.p_max_w if mode == w.Mode.NORMAL else spec.p_min_w

    def rate_ghs(self, k: int) -> float:
        if not self.hashing(k):
            return 0.0
        watts = max(float(self.physics.reported_w[self._row(k)]), 0.0)
        return watts / self.models[k].efficiency_j_th * 1e3

    def ideal_ghs(self, k: int) -> float:
        """What the firmware expects at its configured mode (it knows nothing of the chips)."""
        mode = self.mode(k)
        if mode == w.Mode.SLEEP:
            return 0.0
        return self.preset_w(k, mode) / self.models[k].efficiency_j_th * 1e3

    def serial(self, k: int) -> str:
        return f"SMTTB{self._row(k):010d}"

    def mac(self, k: int) -> str:
        return "02:a0:{:02x}:{:02x}:{:02x}:{:02x}".format(*self._row(k).to_bytes(4, "big"))

    def stored_conf(self, k: int) -> Json:
        stored = self.stored[k]
        if stored is not None:
            return stored
        name = self.specs[k].name
        return {"pools": [{**p, "user": p["user"].format(name=name)} for p in DEFAULT_POOLS]}

    def _set_mode(self, k: int, mode: w.Mode) -> None:
        if mode == w.Mode.SLEEP:
            self._command(k, run=0)
        else:
            self._command(k, setpoint_w=self.preset_w(k, mode), run=1)

    def _restarted(self, k: int, flagged: bool) -> None:
        super()._restarted(k, flagged)
        self.boots[k] += 1  # the nonces of the earlier boot are stale

    # --- digest authentication ---

    def nonce(self, k: int) -> str:
        stamp = f"{int(self._clock() * 1000):x}"
        return stamp + self._nonce_mac(k, stamp, int(self.boots[k]))

    def _nonce_mac(self, k: int, stamp: str, boot: int) -> str:
        msg = f"{k}:{boot}:{stamp}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:24]

    def check_auth(self, k: int, method: str, uri: str, header: str | None) -> str:
        """ "ok", "missing" (no digest header), "stale" (our nonce, expired or from an earlier
        boot) or "denied" (wrong user or password, a nonce we never issued, a bad uri)."""
        if not header:
            return "missing"
        p = w.parse_authorization(header)
        if p is None:
            return "missing"
        nonce = p.get("nonce", "")
        stamp, mac = nonce[:-24], nonce[-24:]
        user, password = self.credentials[k]
        try:
            issued = int(stamp, 16) / 1000.0
        except ValueError:
            return "denied"
        if p.get("username") != user or p.get("realm") != w.REALM or p.get("uri") != uri:
            return "denied"
        expected = w.digest_response(
            user,
            password,
            method,
            uri,
            nonce,
            p.get("nc", ""),
            p.get("cnonce", ""),
            p.get("qop", ""),
        )
        if not hmac.compare_digest(p.get("response", ""), expected):
            return "denied"
        boot = int(self.boots[k])
        if hmac.compare_digest(mac, self._nonce_mac(k, stamp, boot)):
            return "stale" if self._clock() - issued > NONCE_TTL_S else "ok"
        # Issued before a recent reboot: the client is told to retry with a fresh nonce.
        if any(
            hmac.compare_digest(mac, self._nonce_mac(k, stamp, b))
            for b in range(max(boot - 3, 0), boot)
        ):
            return "stale"
        return "denied"

    # --- the cgi scripts ---

    def get(self, k: int, path: str) -> Json | None:
        """The JSON answer of a GET (None: no such page)."""
        now = int(time.time())
        name = self.type_names[k]
        if path == w.SYSTEM_INFO:
            spec = self.specs[k]
            return w.system_info_reply(name, spec.name, spec.host, self.mac(k), self.serial(k))
        if path == w.SUMMARY:
            return w.summary_reply(name, now, self.rate_ghs(k), self.ideal_ghs(k), self.elapsed(k))
        if path == w.STATS:
            model = self.models[k]
            return w.stats_reply(
                name,
                now,
                self.rate_ghs(k),
                self.ideal_ghs(k),
                self.elapsed(k),
                self.mode(k),
                self.serial(k),
                model.chains,
                model.asics,
            )
        if path == w.GET_CONF:
            return w.conf_reply(self.mode(k), self.stored_conf(k))
        if path == "/cgi-bin/get_blink_status.cgi":
            return {"blink": False}
        return None

    def set_conf(self, k: int, body: bytes) -> Json:
        try:
            conf = w.decode(body)
        except Exception:
            return w.set_reply(False, "Invalid configuration")
        mode: w.Mode | None = None
        if "miner-mode" in conf:
            try:
                mode = w.parse_mode(conf["miner-mode"])
            except Exception:
                return w.set_reply(False, "Invalid miner-mode")
        pools = conf.get("pools", [])
        if not isinstance(pools, list) or not all(isinstance(p, dict) for p in pools):
            return w.set_reply(False, "Invalid pools")
        pools = [
            {
                "url": str(p.get("url", "")),
                "user": str(p.get("user", "")),
                "pass": str(p.get("pass", "")),
            }
            for p in pools[:3]
        ]
        pools += [{"url": "", "user": "", "pass": ""}] * (3 - len(pools))
        # The cgi writes the configuration from the body: what it left out is gone.
        self.stored[k] = {
            "pools": pools,
            "bitmain-fan-ctrl": bool(conf.get("bitmain-fan-ctrl", False)),
            "bitmain-fan-pwm": str(conf.get("bitmain-fan-pwm", "100")),
            "freq-level": str(conf.get("freq-level", "100")),
        }
        if mode is not None:
            self._set_mode(k, mode)
        self.sets.append((k, conf))
        return w.set_reply(True)

    # --- the cgminer-style RPC (bmminer) ---

    def rpc(self, k: int, request: bytes) -> Json:
        now = int(time.time())
        try:
            req = json.loads(request)
            command = str(req["command"])
        except (ValueError, KeyError, TypeError):
            return _rpc_status("E", 23, "Invalid JSON", now)
        name = self.type_names[k]
        ghs, ideal, elapsed = self.rate_ghs(k), self.ideal_ghs(k), self.elapsed(k)
        self.counts[k, f"rpc:{command}"] += 1
        if command == "version":
            return _rpc_status("S", 22, "BMMiner versions", now) | {
                "VERSION": [
                    {
                        "BMMiner": "1.0.0",
                        "API": "3.1",
                        "Miner": "uart_trans.1.3",
                        "CompileTime": w.FIRMWARE_DATE,
                        "Type": name,
                    }
                ]
            }
        if command == "summary":
            return _rpc_status("S", 11, "Summary", now) | {
                "SUMMARY": [
                    {
                        "Elapsed": elapsed,
                        "GHS 5s": round(ghs, 2),
                        "GHS av": round(ghs, 2),
                        "GHS 30m": round(ghs, 2),
                        "Found Blocks": 0,
                        "Accepted": 0,
                        "Rejected": 0,
                        "Hardware Errors": 0,
                        "Best Share": 0,
                    }
                ]
            }
        if command == "stats":
            model = self.models[k]
            hashing = ghs > 0
            item: Json = {
                "STATS": 0,
                "ID": "BC50",
                "Elapsed": elapsed,
                "GHS 5s": round(ghs, 2),
                "GHS av": round(ghs, 2),
                "miner_count": model.chains,
                "frequency": 490,
                "fan_num": 4,
                "total_rateideal": round(ideal, 2),
                "rate_unit": "GH",
                "total_rate": round(ghs, 2),
                "total_acn": model.chains * model.asics,
                "miner_version": "uart_trans.1.3",
                "miner_id": self.serial(k),
            }
            for f in range(1, 5):
                item[f"fan{f}"] = 4200 if hashing else 0
            for c in range(1, model.chains + 1):
                item[f"chain_acn{c}"] = model.asics
                item[f"chain_rate{c}"] = f"{ghs / model.chains:.2f}"
                item[f"temp{c}"] = 67 if hashing else 25
                item[f"temp2_{c}"] = 75 if hashing else 25
            version = {
                "BMMiner": "1.0.0",
                "Miner": "uart_trans.1.3",
                "CompileTime": w.FIRMWARE_DATE,
                "Type": name,
            }
            return _rpc_status("S", 70, "BMMiner stats", now) | {"STATS": [version, item]}
        if command == "pools":
            pools = self.stored_conf(k)["pools"]
            return _rpc_status("S", 7, f"{len(pools)} Pool(s)", now) | {
                "POOLS": [
                    {
                        "POOL": n,
                        "URL": p["url"],
                        "User": p["user"],
                        "Status": "Alive" if p["url"] else "Dead",
                        "Priority": n,
                        "Accepted": 0,
                        "Rejected": 0,
                        "Get Failures": 0,
                        "Remote Failures": 0,
                        "Stratum Active": n == 0 and self.hashing(k),
                    }
                    for n, p in enumerate(pools)
                ]
            }
        return _rpc_status("E", 14, "Invalid command", now)


def _rpc_status(status: str, code: int, msg: str, when: int) -> Json:
    return {
        "STATUS": [
            {
                "STATUS": status,
                "When": when,
                "Code": code,
                "Msg": msg,
                "Description": "bmminer 1.0.0",
            }
        ],
        "id": 1,
    }


def _password(spec: DeviceSpec) -> str:
    """The miner's web password: the spec's, else the factory one (files read at start)."""
    if spec.access.password is not None:
        return spec.access.password
    if spec.access.password_file is not None:
        text = spec.access.password_file.read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    return w.DEFAULT_PASSWORD


class AntminerServers(MinerServers[AntminerSim]):
    """The web listeners (one runner) and RPC listeners of a set of simulated miners."""

    def __init__(self, sim: AntminerSim) -> None:
        super().__init__(sim)
        self.runner: web.AppRunner | None = None
        self.closing = asyncio.Event()
        self._by_addr: dict[tuple[str, int], int] = {
            (s.host, s.port): k for k, s in enumerate(sim.specs)
        }
        # GARBAGE is sent before the reboot check, ERROR and the answers after it.
        self.rpc_api = MinerApi(
            self._rpc_reply,
            self._fault,
            FaultReplies(GARBAGE, self._rpc_error),
            max_request_bytes=RPC_MAX_REQUEST_BYTES,
        )

    def _fault(self, k: int) -> int:
        return int(self.sim.physics.fault[int(self.sim.rows[k])])

    def _rpc_reply(self, k: int, request: bytes) -> bytes:
        self.sim.check_reboot(k)
        return json.dumps(self.sim.rpc(k, request)).encode() + b"\x00"

    def _rpc_error(self, k: int) -> bytes:
        self.sim.check_reboot(k)
        reply = _rpc_status("E", 45, "Internal error", int(time.time()))
        return json.dumps(reply).encode() + b"\x00"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        k = self._by_addr.get((str(sock[0]), int(sock[1]))) if sock else None
        if k is None:
            return web.Response(status=404, text=_HTML_404, content_type="text/html")
        fault = await self._fault_gate(k)
        sim = self.sim
        sim.check_reboot(k)
        verdict = sim.check_auth(
            k, request.method, request.raw_path, request.headers.get("Authorization")
        )
        if verdict != "ok":
            if verdict == "denied":
                sim.auth_failures[k] += 1
            header = w.challenge(sim.nonce(k), stale=verdict == "stale")
            return web.Response(
                status=401,
                text=_HTML_401,
                content_type="text/html",
                headers={"WWW-Authenticate": header},
            )
        if fault == Fault.ERROR:
            return web.Response(status=500, text=_HTML_500, content_type="text/html")
        if fault == Fault.GARBAGE:
            return web.Response(status=200, body=GARBAGE, content_type="application/json")
        path = request.path
        if request.method == "POST" and path == w.SET_CONF:
            body = await request.read()
            sim.counts[k, path] += 1
            return _json(sim.set_conf(k, body))
        if request.method == "GET":
            if path in ("/", "/index.html"):
                sim.counts[k, "/"] += 1
                return web.Response(text=_LANDING, content_type="text/html")
            reply = sim.get(k, path)
            if reply is not None:
                sim.counts[k, path] += 1
                return _json(reply)
        return web.Response(status=404, text=_HTML_404, content_type="text/html")

    async def _fault_gate(self, k: int) -> int:
        fault = self._fault(k)
        if fault == Fault.SILENT:
            # Never answer: hold the request until the fault clears or the site stops (the
            # client times out first; aiohttp cancels this handler when it disconnects).
            while self._fault(k) == Fault.SILENT and not self.closing.is_set():
                with suppress(TimeoutError):
                    async with asyncio.timeout(_SILENT_POLL_S):
                        await self.closing.wait()
            fault = self._fault(k)
        if fault == Fault.SLOW:
            await asyncio.sleep(SLOW_S)
            fault = self._fault(k)
            if fault == Fault.SLOW:
                fault = Fault.NONE  # slow, then a normal answer
        return fault

    async def close(self) -> None:
        self.closing.set()  # releases handlers held by SILENT
        await super().close()
        if self.runner is not None:
            await self.runner.cleanup()


def _json(obj: Json) -> web.Response:
    # lighttpd's cgi answers carry no charset; a compact body like the firmware's.
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(), content_type="application/json"
    )


async def start_antminer_servers(
    physics: SitePhysics,
    indices: Sequence[int],
    specs: Sequence[DeviceSpec],
    *,
    rpc_port: int | None = None,
) -> AntminerServers:
    """Serve physics rows `indices` as stock Antminers: the web interface on (spec.host,
    spec.port); with `rpc_port` (4028 on a real miner) also the RPC on each host.

    `specs` is either parallel to `indices` or the whole site's list (indexed by row).
    """
    rows, mine = served_specs(physics, indices, specs)
    sim = AntminerSim(physics, rows, mine)
    out = AntminerServers(sim)
    app = web.Application(client_max_size=w.MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", out.handle)
    # handler_cancellation: a client that gives up cancels its request (SILENT, SLOW faults).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    out.runner = runner
    try:
        for k, spec in enumerate(mine):
            await bind(
                spec, spec.port, web.TCPSite(runner, spec.host, spec.port, backlog=64).start()
            )
            if rpc_port is not None:
                await out.listen_api(out.rpc_api, k, spec, rpc_port)
    except BaseException:
        await out.close()
        raise
    if rows:
        log.info("sim: %d stock Antminers listening", len(rows))
    return out


__all__ = [
    "MODELS",
    "AntminerServers",
    "AntminerSim",
    "Model",
    "model_of",
    "start_antminer_servers",
    "type_name",
]
