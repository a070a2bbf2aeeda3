"""Fan-out bench: how long from a dispatch's arrival to the last device's command answered.

For each protocol and size, `rampd sim` serves N devices of that protocol (sharded over
several processes, so the simulator is not the bottleneck of one core), and this process runs
the real driver against them: it waits until every device has been polled (and, where the
driver says so, adopted), then submits a new setpoint for every device at once and times the
moment the last command is acknowledged. The first burst after start is reported apart (it
may cost a miner a logon); the figure is the median of the bursts after it, a poll period
apart (each meets a site at rest, as a dispatch does). The driver runs as in the daemon:
within the host's poll budget (`site.max_polls_per_s`; 10,000 devices at a 1 s template period
are polled every 5 s: the "poll s" column), and with the daemon's garbage-collector settings
(`controller.heap`; the floor too), its long-lived objects frozen once it is warm.

Beside it, the floor of the same run: bare asyncio streams sending the same request frames to
the same simulators with the same connection policy (LuxOS: a connection per command;
Modbus: persistent connections; Redfish: HTTP/1.1 keep-alive) and the same concurrency, with
sessions and connections set up before the clock starts. The ratio says what the driver costs
beyond the wire and the simulator; the CPU time this process spent per device, beside the
floor's, says how much of it is our code (on a machine whose cores the simulators share,
every microsecond of it is one the simulators did not get).

Not a test: figures depend on the machine. Reproduce: `rampd bench fanout` (see --help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from controller import heap
from controller.config import DeviceSpec, SiteLimits, load_config, poll_stretch
from controller.fdlimit import raise_fd_limit
from controller.tools.bench import FANOUT_PROTOCOLS as PROTOCOLS
from controller.tools.bench import add_fanout_arguments
from controller.tools.bench.floor_antminer import floor_antminer
from controller.tools.bench.floor_braiins import floor_braiins
from controller.tools.bench.floor_whatsminer import floor_whatsminer
from controller.tools.bench.site_run import BenchError, default_out, dump_toml, spawn, stop_process
from drivers.base import Driver
from drivers.core import registry
from drivers.core.command import Commands
from drivers.core.image import ProcessImage

log = logging.getLogger("rampd.bench")

TEMPLATES: Final = {
    "luxos": "antminer-s21-luxos",
    "braiins": "antminer-s21-braiins",
    "whatsminer": "whatsminer-m60s",
    "antminer": "antminer-s21-stock",
    "modbus": "modbus-load",
    "redfish": "gpu-rack-redfish",
}
# Loopback block of this bench: 127.100-127.135 (tests and the other benches use 127.5x-127.9x).
# A /14 per protocol holds 262,144 devices; each shard's meter sits in 127.119.x.y.
FIRST_ADDRESS: Final = {
    "luxos": ipaddress.IPv4Address("127.100.0.1"),
    "modbus": ipaddress.IPv4Address("127.104.0.1"),
    "redfish": ipaddress.IPv4Address("127.108.0.1"),
    "braiins": ipaddress.IPv4Address("127.112.0.1"),
    "whatsminer": ipaddress.IPv4Address("127.120.0.1"),
    "antminer": ipaddress.IPv4Address("127.124.0.1"),
}
METER_NET: Final = "127.119"
# Miners listen on their real ports; the others as on the reference bench site.
PORT_OVERRIDES: Final = {
    "luxos": {},
    "braiins": {},
    "whatsminer": {},
    "antminer": {},
    "modbus": {"port": 1502},
    "redfish": {"port": 8080},
}
METER_PORT: Final = 1502
_DEFAULT_MAX_POLLS_PER_S: Final[float] = SiteLimits.model_fields["max_polls_per_s"].default
BURST_TIMEOUT_S: Final = 60.0
"""A burst not answered by every device within this is reported as incomplete."""


# --- simulators ----------------------------------------------------------------------------


def shard_sizes(n: int, shards: int) -> list[int]:
    """`n` devices over at most `shards` processes, as evenly as possible, none empty."""
    shards = max(1, min(shards, n))
    return [n // shards + (1 if k < n % shards else 0) for k in range(shards)]


def shard_config(
    protocol: str, index: int, start: int, count: int, poll_s: float | None = None
) -> dict[str, Any]:
    """The site file of one simulator shard: `count` devices from device number `start`;
    `poll_s` overrides the template's poll period."""
    proto_no = PROTOCOLS.index(protocol)
    overrides: dict[str, Any] = dict(PORT_OVERRIDES[protocol])
    if poll_s is not None:
        overrides["poll_s"] = poll_s
    return {
        "site_id": f"fanout-{protocol}-{index}",
        "site": {"max_kw": 1e9},
        "meter": {"host": f"{METER_NET}.{proto_no}.{index + 1}", "port": METER_PORT},
        "devices": [
            {
                "name": f"{protocol}{index}",
                "template": TEMPLATES[protocol],
                "count": count,
                "address": str(FIRST_ADDRESS[protocol] + start),
                "overrides": overrides,
            }
        ],
    }


@dataclass
class SimShards:
    specs: list[DeviceSpec]
    procs: list[asyncio.subprocess.Process]
    logs: list[Path]


def _ready_timeout_s(n: int) -> float:
    return 30.0 + n / 100.0  # pymodbus servers start at a few hundred per second


async def _wait_ready(
    procs: Sequence[asyncio.subprocess.Process], logs: Sequence[Path], n: int
) -> None:
    deadline = time.monotonic() + _ready_timeout_s(n)
    pending = set(range(len(procs)))
    while pending:
        for k in list(pending):
            if procs[k].returncode is not None:
                tail = logs[k].read_text(errors="replace")[-2000:]
                raise BenchError(f"simulator shard {k} exited ({procs[k].returncode}):\n{tail}")
            if "sim: serving" in logs[k].read_text(errors="replace"):
                pending.discard(k)
        if time.monotonic() > deadline:
            raise BenchError(f"simulator shards {sorted(pending)} not serving within the timeout")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def simulators(
    protocol: str, n: int, shards: int, out: Path, poll_s: float | None = None
) -> AsyncIterator[SimShards]:
    """`rampd sim` processes serving `n` devices of `protocol`; stopped on the way out."""
    specs: list[DeviceSpec] = []
    procs: list[asyncio.subprocess.Process] = []
    logs: list[Path] = []
    try:
        start = 0
        for k, count in enumerate(shard_sizes(n, shards)):
            path = out / f"sim-{protocol}-{n}-{k}.toml"
            doc = shard_config(protocol, k, start, count, poll_s)
            path.write_text(dump_toml(doc, header=f"fan-out bench: {protocol} shard {k}"))
            specs.extend(load_config(path).devices)
            logs.append(out / f"sim-{protocol}-{n}-{k}.log")
            logs[-1].write_bytes(b"")
            procs.append(await spawn(["sim", "-c", str(path)], logs[-1]))
            start += count
        await _wait_ready(procs, logs, n)
        yield SimShards(specs, procs, logs)
    finally:
        await asyncio.gather(*(stop_process(p) for p in procs))


# --- the driver side ------------------------------------------------------------------------


class Answers:
    """The drivers' command observer: counts acknowledged commands and notes the moment the
    last device of a burst answered (checked in the fleet, so a retried device counts once)."""

    def __init__(self, image: ProcessImage, rows: np.ndarray, values: np.ndarray) -> None:
        self.image = image
        self.rows = rows
        self.values = values
        self.ok = 0
        self.errors = 0
        self.done_at = math.nan
        self.done = asyncio.Event()

    def arm(self, values: np.ndarray) -> None:
        self.values = values
        self.ok = 0
        self.errors = 0
        self.done_at = math.nan
        self.done.clear()

    def __call__(self, name: str, seconds: float, ok: bool) -> None:
        if not ok:
            self.errors += 1
            return
        self.ok += 1
        if self.ok >= len(self.rows) and not self.done.is_set():
            # Drivers report before they record the value: check once this step is over.
            asyncio.get_running_loop().call_soon(self._check, time.perf_counter())

    def _check(self, at: float) -> None:
        if not self.done.is_set() and self.all_answered():
            self.done_at = at
            self.done.set()

    def all_answered(self) -> bool:
        return bool(np.array_equal(self.image.acked_w[self.rows], self.values))

    def answered(self) -> int:
        return int((self.image.acked_w[self.rows] == self.values).sum())


def burst_values(specs: Sequence[DeviceSpec], k: int) -> np.ndarray:
    """Setpoints of burst k: alternately a notch below the top (a profile lower on a miner)
    and the top (where the simulator starts), so every burst changes every device."""
    p_max = np.array([s.p_max_w for s in specs])
    p_min = np.array([s.p_min_w for s in specs])
    step = np.array([s.step_w for s in specs])
    notch = np.maximum(step, 0.1 * (p_max - p_min))
    return p_max if k % 2 else np.round(p_max - notch)


@dataclass
class Burst:
    seconds: float | None
    cpu_s: float
    """This process's CPU time over the burst (the simulators run in their own)."""
    answered: int
    errors: int


async def _burst(driver: Driver, answers: Answers, values: np.ndarray) -> Burst:
    answers.arm(values)
    t0, cpu0 = time.perf_counter(), time.process_time()
    driver.submit(Commands.run(answers.rows, values))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(BURST_TIMEOUT_S):
            await answers.done.wait()
    seconds = answers.done_at - t0 if answers.done.is_set() else None
    return Burst(seconds, time.process_time() - cpu0, answers.answered(), answers.errors)


async def _warm_up(driver: Driver, image: ProcessImage, n: int, timeout_s: float) -> float:
    """Until every device was polled and (a driver with `adopting`) adopted; seconds taken."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        polled = int(np.isfinite(image.measured_at).sum())
        adopting = int(getattr(driver, "adopting", 0))
        if polled == n and adopting == 0:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up: {polled}/{n} devices polled, {adopting} still adopting")
        await asyncio.sleep(0.1)


async def measure_driver(
    protocol: str,
    specs: Sequence[DeviceSpec],
    bursts: int,
    concurrency: int | None,
    max_polls_per_s: float,
) -> dict[str, Any]:
    import controller.protocols  # noqa: F401  (registers the drivers)

    n = len(specs)
    image = ProcessImage(specs)
    rows = np.arange(n, dtype=np.intp)
    answers = Answers(image, rows, np.full(n, np.nan))
    # Polled as the daemon would poll them: within the host's budget.
    stretch = poll_stretch(specs, max_polls_per_s)
    ctx = registry.DriverContext(answers, stretch, concurrency)
    driver = registry.lookup(protocol)(image.port(protocol), ctx)
    # A line per device (ATM switched off, say) is no figure of this bench.
    logging.getLogger("rampd.drivers").setLevel(logging.WARNING)
    task = asyncio.create_task(driver.run(), name=f"bench:{protocol}")
    try:
        # Bursts a poll period apart: each meets a site at rest, not the polls the one
        # before it held back (a dispatch follows the last by seconds, not microseconds).
        rest_s = max(s.poll_s for s in specs) * stretch
        warm_s = await _warm_up(driver, image, n, 60.0 + rest_s + n / 200)
        heap.freeze_long_lived()  # as the daemon does once ready
        runs = []
        for k in range(bursts + 1):
            if k:
                await asyncio.sleep(rest_s)
            runs.append(await _burst(driver, answers, burst_values(specs, k)))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        heap.thaw()  # the next row's fleet is another
    steady = [b.seconds for b in runs[1:] if b.seconds is not None]
    return {
        "poll_s": round(max(s.poll_s for s in specs) * stretch, 3),
        "warm_up_s": round(warm_s, 3),
        "first_s": _r(runs[0].seconds),
        "runs_s": [_r(b.seconds) for b in runs[1:]],
        "median_s": _r(statistics.median(steady)) if len(steady) == bursts else None,
        "cpu_us_per_device": round(1e6 * statistics.median(b.cpu_s for b in runs[1:]) / n, 1),
        "answered": min(b.answered for b in runs),
        "errors": sum(b.errors for b in runs),
        "concurrency": int(getattr(driver, "_max_concurrency", 0)),
        "exchanges": getattr(driver, "exchanges", None),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# --- the floor: bare streams, same frames -------------------------------------------------


Exchange = Callable[[int], Awaitable[None]]


async def _bounded(n: int, concurrency: int, one: Exchange) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def run(k: int) -> None:
        async with sem:
            await one(k)

    await asyncio.gather(*(run(k) for k in range(n)))


class Timed(NamedTuple):
    wall_s: float
    cpu_s: float


async def _timed(n: int, concurrency: int, one: Exchange) -> Timed:
    t0, cpu0 = time.perf_counter(), time.process_time()
    async with asyncio.timeout(BURST_TIMEOUT_S):
        await _bounded(n, concurrency, one)
    return Timed(time.perf_counter() - t0, time.process_time() - cpu0)


async def _luxos_once(host: str, port: int, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(frame)
        return await reader.read(1 << 20)  # the miner answers one object and closes
    finally:
        writer.close()


async def floor_luxos(specs: Sequence[DeviceSpec], bursts: int, concurrency: int) -> list[Timed]:
    from drivers.luxos import messages as m
    from drivers.luxos.sim_server import model_of, profile_ladder

    n = len(specs)
    sids = [""] * n

    async def logon(k: int) -> None:
        s = specs[k]
        sids[k] = m.parse_session(
            m.decode_reply(await _luxos_once(s.host, s.port, b'{"command": "logon"}'))
        )

    await _bounded(n, concurrency, logon)
    times = []
    try:
        for b in range(bursts):
            values = burst_values(specs, bursts - b)  # the last at the top
            frames = []
            for k, s in enumerate(specs):
                ladder = profile_ladder(s.p_min_w, s.p_max_w, s.step_w, model_of(s))
                name = m.choose_profile(ladder, float(values[k])).name
                frames.append(m.encode_request("profileset", sids[k], name))

            async def one(frames: list[bytes], k: int) -> None:
                await _luxos_once(specs[k].host, specs[k].port, frames[k])

            times.append(await _timed(n, concurrency, functools.partial(one, frames)))
    finally:

        async def logoff(k: int) -> None:
            with contextlib.suppress(OSError):
                await _luxos_once(specs[k].host, specs[k].port, m.encode_request("logoff", sids[k]))

        await _bounded(n, concurrency, logoff)
    return times


def _modbus_frame(tid: int, unit: int, value_w: float) -> bytes:
    from drivers.modbus.registers import LOAD_MAP, RUN

    address, regs = LOAD_MAP.encode({"setpoint_w": value_w, "run": RUN})
    pdu = bytes([0x10]) + address.to_bytes(2, "big") + len(regs).to_bytes(2, "big")
    pdu += bytes([2 * len(regs)]) + b"".join(int(r).to_bytes(2, "big") for r in regs)
    return (
        tid.to_bytes(2, "big")
        + b"\x00\x00"
        + (len(pdu) + 1).to_bytes(2, "big")
        + bytes([unit])
        + pdu
    )


async def floor_modbus(specs: Sequence[DeviceSpec], bursts: int, concurrency: int) -> list[Timed]:
    n = len(specs)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * n

    async def connect(k: int) -> None:
        conns[k] = await asyncio.open_connection(specs[k].host, specs[k].port)

    times = []
    try:
        await _bounded(n, concurrency, connect)
        for b in range(bursts):
            values = burst_values(specs, bursts - b)  # the last at the top
            frames = [_modbus_frame(b + 1, s.unit, float(values[k])) for k, s in enumerate(specs)]

            async def one(frames: list[bytes], k: int) -> None:
                reader, writer = conns[k]  # type: ignore[misc]
                writer.write(frames[k])
                head = await reader.readexactly(7)
                await reader.readexactly(int.from_bytes(head[4:6], "big") - 1)

            times.append(await _timed(n, concurrency, functools.partial(one, frames)))
    finally:
        for c in conns:
            if c is not None:
                c[1].close()
    return times


async def _http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def _http_request(
    method: str, spec: DeviceSpec, path: str, body: bytes, token: str | None
) -> bytes:
    """What the driver (drivers.redfish.http) sends for its requests, byte for byte."""
    from drivers.redfish import resources as rf

    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {spec.host}:{spec.port}",
        f"OData-Version: {rf.ODATA_VERSION}",
        "Accept: application/json",
    ]
    if token is not None:
        lines.append(f"{rf.AUTH_TOKEN_HEADER}: {token}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def floor_redfish(specs: Sequence[DeviceSpec], bursts: int, concurrency: int) -> list[Timed]:
    from drivers.redfish import resources as rf

    n = len(specs)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * n
    sessions: list[tuple[str, str | None] | None] = [None] * n

    async def login(k: int) -> None:
        s = specs[k]
        conns[k] = reader, writer = await asyncio.open_connection(s.host, s.port)
        user, password = rf.credentials(s.access)
        body = json.dumps(rf.login_body(user or "", password or "")).encode()
        head, _ = await _http(reader, writer, _http_request("POST", s, rf.SESSIONS, body, None))
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.decode().partition(":") for line in head.split(b"\r\n")[1:])
        )
        sessions[k] = rf.read_login(
            headers.get(rf.AUTH_TOKEN_HEADER.lower()), headers.get("location")
        )

    times = []
    try:
        await _bounded(n, concurrency, login)
        for b in range(bursts):
            values = burst_values(specs, bursts - b)  # the last at the top
            reqs = [
                _http_request(
                    "PATCH",
                    s,
                    rf.chassis_paths(s.access.chassis_id).environment_metrics,
                    json.dumps(rf.environment_limit_patch(round(float(values[k])))).encode(),
                    sessions[k][0],  # type: ignore[index]
                )
                for k, s in enumerate(specs)
            ]

            async def one(reqs: list[bytes], k: int) -> None:
                reader, writer = conns[k]  # type: ignore[misc]
                head, _ = await _http(reader, writer, reqs[k])
                if not head.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"floor: {specs[k].name} answered {head[:40]!r}")

            times.append(await _timed(n, concurrency, functools.partial(one, reqs)))
    finally:

        async def logout(k: int) -> None:
            c, sess = conns[k], sessions[k]
            if c is not None and sess is not None and sess[1] is not None:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    await _http(*c, _http_request("DELETE", specs[k], sess[1], b"", sess[0]))
            if c is not None:
                c[1].close()

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30.0):
                await _bounded(n, concurrency, logout)
    return times


def _driver_concurrency() -> dict[str, int]:
    import controller.protocols  # noqa: F401  (registers the drivers)
    from drivers.device_driver import PerDeviceDriver

    return {c.protocol: c.default_concurrency for c in PerDeviceDriver.__subclasses__()}


FLOORS: Final[dict[str, Callable[[Sequence[DeviceSpec], int, int], Awaitable[list[Timed]]]]] = {
    "luxos": floor_luxos,
    "braiins": floor_braiins,
    "whatsminer": floor_whatsminer,
    "antminer": floor_antminer,
    "modbus": floor_modbus,
    "redfish": floor_redfish,
}


# --- the run --------------------------------------------------------------------------------


@dataclass
class Row:
    protocol: str
    devices: int
    shards: int
    rampd_s: float | None
    floor_s: float | None
    ratio: float | None
    first_s: float | None
    answered: int
    cpu_us: float | None
    """rampd's CPU time per device commanded (median burst), in this process."""
    floor_cpu_us: float
    driver: dict[str, Any] = field(default_factory=dict)
    floor_runs_s: list[float] = field(default_factory=list)


async def measure(protocol: str, n: int, args: argparse.Namespace, out: Path) -> Row:
    shards = args.shards or max(1, min(os.cpu_count() or 1, math.ceil(n / 2500)))
    async with simulators(protocol, n, shards, out, args.poll_s) as sims:
        # The floor first, on fresh simulators: it needs the LuxOS session the driver would
        # hold, and its bursts end at the devices' initial setpoints, changing nothing.
        concurrency = args.concurrency or _driver_concurrency()[protocol]
        floor_runs = await FLOORS[protocol](sims.specs, args.bursts, concurrency)
        budget = args.max_polls_per_s or _DEFAULT_MAX_POLLS_PER_S  # None: the daemon's
        drv = await measure_driver(protocol, sims.specs, args.bursts, args.concurrency, budget)
    floor_s = round(statistics.median(t.wall_s for t in floor_runs), 4)
    floor_cpu_s = statistics.median(t.cpu_s for t in floor_runs)
    rampd_s = drv["median_s"]
    return Row(
        protocol=protocol,
        devices=n,
        shards=shards,
        rampd_s=rampd_s,
        floor_s=floor_s,
        ratio=None if rampd_s is None else round(rampd_s / floor_s, 2),
        first_s=drv["first_s"],
        answered=drv["answered"],
        cpu_us=drv["cpu_us_per_device"],
        floor_cpu_us=round(1e6 * floor_cpu_s / n, 1),
        driver=drv,
        floor_runs_s=[round(t.wall_s, 4) for t in floor_runs],
    )


def table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'protocol':<9} {'devices':>7} {'rampd s':>8} {'floor s':>8} {'ratio':>6} "
        f"{'first s':>8} {'answered':>8} {'cpu us/dev':>10} {'floor':>6} {'poll s':>6}"
    ]

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        lines.append(
            f"{r.protocol:<9} {r.devices:>7} {f(r.rampd_s, '8.3f')} {f(r.floor_s, '8.3f')} "
            f"{f(r.ratio, '6.2f')} {f(r.first_s, '8.3f')} {r.answered:>8} "
            f"{f(r.cpu_us, '10.0f')} {r.floor_cpu_us:6.0f} {f(r.driver.get('poll_s'), '6.1f')}"
        )
    return "\n".join(lines)


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


async def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    raise_fd_limit(log)
    heap.tune()  # the daemon's collector settings, for the floor too
    main = asyncio.current_task()
    if main is not None:  # SIGTERM stops the simulators too, as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    rows: list[Row] = []
    report: dict[str, Any] = {
        "bench": "fanout",
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "loop": _loop_name(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "bursts": args.bursts,
        "results": [],
    }
    for protocol in args.protocols:
        for n in args.sizes:
            print(f"fanout: {protocol} x {n} ...", flush=True)
            rows.append(await measure(protocol, n, args, out))
            print(table(rows[-1:]).splitlines()[1], flush=True)
            # After each row: a long run cut short keeps what it measured.
            report["results"] = [asdict(r) for r in rows]
            (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nloop {report['loop']}; JSON: {out / 'results.json'}")
    complete = all(r.answered == r.devices and r.rampd_s is not None for r in rows)
    return 0 if complete else 1


def run_cli(args: argparse.Namespace) -> int:
    from controller.cli import run_loop

    if args.bursts < 1:
        print("rampd bench fanout: --bursts must be at least 1", file=sys.stderr)
        return 2
    if args.max_polls_per_s is not None and not args.max_polls_per_s > 0:
        print("rampd bench fanout: --max-polls-per-s must be positive", file=sys.stderr)
        return 2
    args.out = args.out or str(default_out("fanout"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        return run_loop(run_bench(args))
    except BenchError as exc:
        print(f"rampd bench fanout: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fanout", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_fanout_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run_cli(args)
