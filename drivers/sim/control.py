"""The simulator's control endpoint: inspect devices and inject faults over HTTP (JSON).

    GET  /devices[?protocol=luxos]   rows with name, protocol, host, power, fault
    GET  /truth                      {"t": unix s, "site_kw": true site power, "hz": grid}
    POST /faults  {"fault": "silent"|"slow"|"error"|"garbage"|"reboot"|"stuck"|"none",
                   "devices": ["row-0001", ...]}                        by name, or
                  {"fault": ..., "fraction": 0.1, "protocol": "luxos"?, "seed": 1?}
                  -> {"applied": [names]}
    POST /meter   {"fault": "silent"|"none"|...}
    POST /physical_min  {"target_kw": float, "tol_kw": float >= 0}
                  -> {"physical_min_s": s | null (not within an hour), "now_kw": true site kW,
                      "lo_5s_kw": ..., "hi_5s_kw": ...}  (site power reachable at 5 s)
    GET  /grid    {"mode": "noise"|"hold"|"trace", "hz", "nominal_hz", "trace": name|null,
                   "position_s", "remaining_s"} (position and remaining: a trace's only)
    POST /grid    {"hz": 59.8}                                      hold a value
                  {"trace": PATH, "trace_nominal_hz": 50?}          replay a recording now
                                    (the nominal: 50 or 60 from the trace's median if absent)
                  {"mode": "noise"}                                 back to noise
                  -> what GET /grid answers; 400 with the reason for anything else

Tests and benches use it to make devices misbehave while the daemon runs in its own process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiohttp import web

from drivers.core.physical_min import physical_min_s, reachable_w
from drivers.core.spec import DeviceSpec
from drivers.sim.grid import FrequencyTrace
from drivers.sim.physics import Fault, SitePhysics

log = logging.getLogger("rampd.sim")

MAX_BODY = 1 << 20


def _fault(body: dict[str, Any]) -> Fault:
    name = body.get("fault")
    if not isinstance(name, str) or name.upper() not in Fault.__members__:
        choices = ", ".join(f.name.lower() for f in Fault)
        raise web.HTTPBadRequest(text=f"fault must be one of {choices}")
    return Fault[name.upper()]


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{key} must be a finite number")
    return float(value)


class SimControl:
    def __init__(self, physics: SitePhysics, specs: Sequence[DeviceSpec]) -> None:
        self.physics = physics
        self.specs = tuple(specs)
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self._protocol = np.array([s.protocol for s in self.specs])
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/devices", self.devices)
        app.router.add_get("/truth", self.truth)
        app.router.add_post("/faults", self.faults)
        app.router.add_post("/meter", self.meter)
        app.router.add_post("/physical_min", self.physical_min)
        app.router.add_get("/grid", self.grid_status)
        app.router.add_post("/grid", self.set_grid)
        self.app = app
        self._params = physics.fleet_params()

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        log.info("sim: control endpoint on http://%s:%d", host, bound)
        return bound

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def devices(self, request: web.Request) -> web.Response:
        protocol = request.query.get("protocol")
        p = self.physics
        rows = [
            {
                "index": i,
                "name": s.name,
                "kind": s.kind,
                "protocol": s.protocol,
                "host": s.host,
                "port": s.port,
                "power_w": round(float(p.power_w[i]), 1),
                "fault": Fault(int(p.fault[i])).name.lower(),
            }
            for i, s in enumerate(self.specs)
            if protocol is None or s.protocol == protocol
        ]
        return web.json_response(rows)

    async def truth(self, request: web.Request) -> web.Response:
        ph = self.physics
        return web.json_response(
            {
                "t": round(time.time(), 3),
                "site_kw": round(ph.truth() / 1e3, 3),
                "hz": round(ph.hz, 5),
            }
        )

    async def grid_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.physics.grid.status())

    async def set_grid(self, request: web.Request) -> web.Response:
        body = await _json(request)
        grid = self.physics.grid
        unknown = set(body) - {"mode", "hz", "trace", "trace_nominal_hz"}
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown keys: {', '.join(sorted(unknown))}")
        mode = body.get("mode")
        if mode is None:
            mode = "trace" if "trace" in body else "hold" if "hz" in body else None
        if mode == "noise" and len(body) == 1:
            grid.noise()
        elif mode == "hold" and "trace" not in body and "trace_nominal_hz" not in body:
            try:
                grid.hold(_number(body, "hz"))
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        elif mode == "trace" and "hz" not in body:
            path = body.get("trace")
            if not isinstance(path, str) or not path:
                raise web.HTTPBadRequest(text="trace must be a file path")
            nominal = None
            if body.get("trace_nominal_hz") is not None:
                nominal = _number(body, "trace_nominal_hz")
            try:
                trace = await asyncio.to_thread(FrequencyTrace.load, path, nominal)
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
            grid.replay(trace)
        else:
            raise web.HTTPBadRequest(
                text='give {"hz": value}, {"trace": path, "trace_nominal_hz": 50|60} '
                'or {"mode": "noise"}'
            )
        status = grid.status()
        log.info("sim: grid %s", status)
        return web.json_response(status)

    async def faults(self, request: web.Request) -> web.Response:
        body = await _json(request)
        fault = _fault(body)
        rows = self._select(body)
        if fault is Fault.REBOOT:
            self.physics.reboot(rows)
        else:
            self.physics.set_fault(rows, fault)
        names = [self.specs[i].name for i in rows]
        log.info("sim: fault %s on %d devices", fault.name.lower(), len(names))
        return web.json_response({"applied": names})

    async def meter(self, request: web.Request) -> web.Response:
        self.physics.meter_fault = _fault(await _json(request))
        log.info("sim: meter fault %s", self.physics.meter_fault.name.lower())
        return web.json_response({"meter": self.physics.meter_fault.name.lower()})

    async def physical_min(self, request: web.Request) -> web.Response:
        """The physical minimum from the simulator's TRUE state (see drivers/core/physical_min.py).

        Each row's cap is its present workload demand (p_max for a miner), held for the
        horizon; the non-flexible load is held at its present value. Commands still inside a
        device's dead-time buffer, and rows still ramping or counting down to sleep, are
        ignored: call this with the site at rest, e.g. right when a dispatch is published.
        """
        body = await _json(request)
        target_w = _number(body, "target_kw") * 1e3
        tol_w = _number(body, "tol_kw") * 1e3
        if tol_w < 0:
            raise web.HTTPBadRequest(text="tol_kw must be >= 0")
        ph = self.physics
        p, st, cap, left = ph.power_w, ph.state, ph.demand_w, ph.wake_left_s
        other = ph.noncontrollable_w
        t = physical_min_s(
            self._params, p, st, target_w, tol_w, other_w=other, p_hi_w=cap, wake_left_s=left
        )
        lo, hi = reachable_w(self._params, p, st, 5.0, p_hi_w=cap, wake_left_s=left)
        return web.json_response(
            {
                "physical_min_s": None if math.isinf(t) else t,
                "now_kw": round(ph.truth() / 1e3, 3),
                "lo_5s_kw": round((lo + other) / 1e3, 3),
                "hi_5s_kw": round((hi + other) / 1e3, 3),
            }
        )

    def _select(self, body: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.intp]]:
        if "devices" in body:
            names = body["devices"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise web.HTTPBadRequest(text="devices must be a list of names")
            unknown = [n for n in names if n not in self._index]
            if unknown:
                raise web.HTTPBadRequest(text=f"unknown devices: {', '.join(unknown[:5])}")
            return np.array([self._index[n] for n in names], dtype=np.intp)
        fraction = body.get("fraction")
        if not isinstance(fraction, int | float) or isinstance(fraction, bool):
            raise web.HTTPBadRequest(text="give devices (names) or fraction (0..1)")
        if not 0.0 <= fraction <= 1.0:
            raise web.HTTPBadRequest(text="fraction must be within 0..1")
        pool = np.arange(len(self.specs))
        protocol = body.get("protocol")
        if protocol is not None:
            pool = pool[self._protocol == protocol]
        seed = body.get("seed", 0)
        rng = np.random.default_rng(seed if isinstance(seed, int) else 0)
        count = round(fraction * pool.size)
        return np.sort(rng.choice(pool, size=count, replace=False)).astype(np.intp)
