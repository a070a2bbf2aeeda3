"""The simulated site: physics stepped on a fixed monotonic schedule, served over real sockets.

`run_sim` serves every device of a site config on its own address (and the meter), steps the
physics at 50 Hz, and appends the ground truth as JSON lines ({"t": unix s, "site_kw": kW,
"hz": the grid frequency}) so benchmarks can score the site independently of the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TextIO

from drivers.antminer.sim_server import start_antminer_servers
from drivers.braiins.sim_server import start_braiins_servers
from drivers.breaker.sim_server import start_breaker_servers
from drivers.core.spec import DeviceSpec, SiteSpec
from drivers.luxos.sim_server import start_luxos_servers
from drivers.modbus.sim_server import SimServers
from drivers.redfish.sim_server import start_redfish_servers
from drivers.sim.control import SimControl
from drivers.sim.physics import SitePhysics
from drivers.whatsminer.sim_server import start_whatsminer_servers

log = logging.getLogger("rampd.sim")

MAX_CATCH_UP_S = 0.25
"""After a stall longer than this the schedule restarts instead of stepping a huge dt."""

MINER_API_PORT = 4028
"""Where every miner answers the cgminer-style JSON API (`rampd discover`, pyasic), also the
firmwares driven over another API (Braiins OS+ gRPC, the stock Antminer web interface)."""


class Servers(Protocol):
    async def close(self) -> None: ...


Start = Callable[[SitePhysics, list[int], Sequence[DeviceSpec]], Awaitable[Servers]]
"""Serve physics rows (indices into the site's devices, whose whole list is given)."""

SERVED: dict[str, Start] = {
    "luxos": lambda ph, rows, devices: start_luxos_servers(ph, rows, devices),
    "redfish": lambda ph, rows, devices: start_redfish_servers(
        ph, rows, [devices[i] for i in rows]
    ),
    "braiins": lambda ph, rows, devices: start_braiins_servers(
        ph, rows, devices, api_port=MINER_API_PORT
    ),
    "whatsminer": lambda ph, rows, devices: start_whatsminer_servers(ph, rows, devices),
    "antminer": lambda ph, rows, devices: start_antminer_servers(
        ph, rows, devices, rpc_port=MINER_API_PORT
    ),
    "breaker": lambda ph, rows, devices: start_breaker_servers(ph, rows, devices),
}
"""How each protocol's devices are served (Modbus loads: with the meter, by SimServers)."""


class SimSite:
    """Physics plus its servers. `start()`, then `run(stop)`; `close()` always."""

    def __init__(
        self,
        site: SiteSpec,
        *,
        seed: int = 0,
        rate_hz: float = 50.0,
        initial_fraction: float = 1.0,
    ) -> None:
        self.site = site
        self.dt_s = 1.0 / rate_hz
        self.physics = SitePhysics(
            site.devices,
            site.noncontrollable_w,
            seed=seed,
            dt_s=self.dt_s,
            initial_fraction=initial_fraction,
            nominal_hz=site.nominal_hz,
        )
        self.servers: SimServers | None = None
        self.served: dict[str, Servers] = {}
        self.control: SimControl | None = None
        self.control_port: int | None = None

    async def start(self, control: tuple[str, int] | None = None) -> None:
        """Serve every device and the meter; with `control`, the fault-injection endpoint."""
        if control is not None:
            self.control = SimControl(self.physics, self.site.devices)
            self.control_port = await self.control.start(*control)
        m = self.site.meter
        devices = self.site.devices
        self.servers = await SimServers.start(self.physics, devices, (m.host, m.port, m.unit))
        for protocol, start in SERVED.items():
            rows = [i for i, s in enumerate(devices) if s.protocol == protocol]
            if rows:
                self.served[protocol] = await start(self.physics, rows, devices)
        by_protocol = Counter(s.protocol for s in devices)
        log.info(
            "sim: serving %d devices (%s) and the meter (%s:%d)",
            len(devices),
            ", ".join(f"{n} {p}" for p, n in sorted(by_protocol.items())),
            m.host,
            m.port,
        )

    async def run(
        self,
        stop: asyncio.Event | None = None,
        truth: TextIO | None = None,
        truth_hz: float = 50.0,
    ) -> None:
        """Step until `stop` is set (or cancelled); physics time follows the monotonic clock.

        The truth is written every physics step (50 Hz): a settle time read from it is late
        by up to one sample, and on a sub-second step 1.2x its physical minimum leaves less
        than 100 ms."""
        dt = self.dt_s
        t0 = time.monotonic()
        k = 0
        next_truth = t0
        while stop is None or not stop.is_set():
            k += 1
            delay = t0 + k * dt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                step = dt
            elif -delay > MAX_CATCH_UP_S:
                # Stalled (debugger, overloaded host): step what was lost once, re-anchor.
                step = min(dt - delay, 1.0)
                t0, k = time.monotonic(), 0
                log.warning("sim: stalled %.2f s; physics stepped once to catch up", -delay)
            else:
                step = dt  # slightly late: the next ticks come sooner and catch up
            self.physics.step(step)
            now = time.monotonic()
            if truth is not None and now >= next_truth:
                next_truth += 1.0 / truth_hz
                if next_truth <= now:  # fell behind: keep the rate, do not burst
                    next_truth = now + 1.0 / truth_hz
                line = {
                    "t": round(time.time(), 3),
                    "site_kw": round(self.physics.truth() / 1e3, 3),
                    "hz": round(self.physics.hz, 5),
                }
                truth.write(json.dumps(line) + "\n")

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
            self.control = None
        served, self.served = self.served, {}
        for servers in served.values():
            await servers.close()
        if self.servers is not None:
            await self.servers.close()
            self.servers = None


async def run_sim(
    spec: SiteSpec,
    truth_path: Path | None,
    stop: asyncio.Event | None = None,
    seed: int = 0,
    *,
    rate_hz: float = 50.0,
    initial_fraction: float = 1.0,
    control: tuple[str, int] | None = None,
) -> None:
    """Serve the simulated site until `stop` is set or the task is cancelled."""
    site = SimSite(spec, seed=seed, rate_hz=rate_hz, initial_fraction=initial_fraction)
    truth: TextIO | None = None
    try:
        if truth_path is not None:
            truth_path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: an external reader sees each sample as it is written.
            truth = truth_path.open("a", buffering=1, encoding="utf-8")
        await site.start(control)
        await site.run(stop, truth)
    finally:
        await site.close()
        if truth is not None:
            truth.close()
        log.info("sim: stopped")
