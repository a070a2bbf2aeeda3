"""Hostile devices at the transport level: our real drivers against raw sockets that answer
with crafted bytes (Modbus TCP, HTTP/Redfish, LuxOS).

What every case shows: the driver turns whatever comes back into a reading or a DriverError,
never another exception (no "unexpected error" line), never waits beyond its timeout, and
marks the device FAULT with one log line (and "recovered" with one more when it heals).
Property tests run each example in its own event loop against its own peer; every peer binds
a fresh 127.90.x.y address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.config import DeviceSpec, MeterConfig
from drivers.base import DeviceTimeout, DriverError, ProtocolError
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.device_driver import PerDeviceDriver
from drivers.luxos import messages as lux
from drivers.luxos.client import exchange
from drivers.modbus.client import ModbusLoadDriver, ModbusMeter
from drivers.modbus.registers import LOAD_MAP
from drivers.redfish import resources as rf
from drivers.redfish.client import RedfishDriver
from tests.helpers import CommandLog, cancel_and_wait, cmd, device_spec, until
from tests.unit.test_dispatch_parse import json_values

TIMEOUT_S = 0.3
GRACE_S = 0.25  # the drivers' outer bound beyond a call's timeout (_GRACE_S)
SLACK_S = 1.0  # scheduling noise on a loaded 2-core machine
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],  # each example opens real sockets
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- a raw peer and what the tests watch ---


@dataclass
class Peer:
    host: str
    port: int
    writers: set[asyncio.StreamWriter]

    def drop(self) -> None:
        """Abort every open connection (new ones are still accepted)."""
        for w in self.writers:
            w.transport.abort()


@contextlib.asynccontextmanager
async def raw_peer(handler: Handler) -> AsyncIterator[Peer]:
    """A TCP server on a fresh 127.90.x.y running `handler` for each connection."""
    tasks: set[asyncio.Task[Any]] = set()
    peer = Peer("", 0, set())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        peer.writers.add(writer)
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the driver hung up on us: that is its right
        except asyncio.CancelledError:
            # The peer is closing. End normally: on Python 3.11 the server's callback reads
            # the task's exception, which raises (and is logged) for a cancelled task.
            pass
        finally:
            peer.writers.discard(writer)
            writer.close()

    peer.host = f"127.90.{random.randint(1, 250)}.{random.randint(2, 250)}"
    server = await asyncio.start_server(serve, peer.host, 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        peer.drop()
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=5.0) if tasks else None
        await server.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def trickle_out(w: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send `data` one byte every `every_s`, until done or the connection closes."""
    for byte in data:
        if w.is_closing():
            return
        w.write(bytes([byte]))
        await asyncio.sleep(every_s)


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read, never answer."""
    while await reader.read(4096):
        pass


class Lines(logging.Handler):
    """Every record of the "rampd" loggers and asyncio's (which reports exceptions escaping
    a protocol callback), while installed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def with_text(self, text: str) -> list[str]:
        return [m for m in self.at(logging.DEBUG) if text in m]


@contextlib.contextmanager
def rampd_lines() -> Iterator[Lines]:
    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("rampd", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(lines)
        lg.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(lines)
            lg.setLevel(level)


@dataclass
class Running:
    driver: PerDeviceDriver[Any]
    image: ProcessImage
    commands: CommandLog
    lines: Lines
    task: asyncio.Task[None]

    def attempts(self) -> int:
        return self.driver.polls_ok + self.driver.poll_errors

    @property
    def state(self) -> DeviceState:
        return DeviceState(int(self.image.state[0]))

    def no_unexpected_errors(self) -> None:
        assert self.lines.at(logging.ERROR) == [], "a driver error escaped as a bug"
        assert not self.task.done(), "the driver stopped"


@contextlib.asynccontextmanager
async def running(
    cls: type[PerDeviceDriver[Any]], spec: DeviceSpec, **kw: Any
) -> AsyncIterator[Running]:
    """One device of `spec` under a running driver of `cls`, with fast backoff."""
    fleet = ProcessImage([spec])
    commands = CommandLog()
    with rampd_lines() as lines:
        driver = cls(
            fleet.port(spec.protocol),
            commands,
            name="hostile",
            backoff_base_s=0.05,
            backoff_cap_s=0.2,
            **kw,
        )
        task = asyncio.create_task(driver.run())
        try:
            yield Running(driver, fleet, commands, lines, task)
        finally:
            async with asyncio.timeout(5.0):
                await cancel_and_wait(task)


async def one_poll(cls: type[PerDeviceDriver[Any]], spec: DeviceSpec, **kw: Any) -> None:
    """Run the driver until its first poll ended, well or not; check it ended cleanly."""
    async with running(cls, spec, **kw) as r:
        t0 = time.monotonic()
        await until(r.attempts, 2 * (TIMEOUT_S + GRACE_S) + SLACK_S, what="first poll")
        r.no_unexpected_errors()
        assert time.monotonic() - t0 < 2 * (TIMEOUT_S + GRACE_S) + SLACK_S
        if r.driver.polls_ok:
            assert math.isfinite(float(r.image.measured_w[0]))
            assert r.state in DeviceState


async def faults_once_within_timeout(r: Running, *reasons: str) -> None:
    """FAULT with one line naming one of `reasons` (whichever failed first: a poll or a
    command); each failed command bounded by the timeout."""
    r.driver.submit(cmd(np.array([0]), np.array([5000.0])))
    await until(lambda: r.state == DeviceState.FAULT, 10.0, what="FAULT")
    await until(lambda: r.commands, 10.0, what="a command tried")
    n = r.attempts()
    await until(lambda: r.attempts() > n, 10.0, what="still polled")  # isolated, not dropped
    r.no_unexpected_errors()
    faults = r.lines.with_text("FAULT")
    assert len(faults) == 1 and any(why in faults[0] for why in reasons), faults
    assert len(faults[0]) < 400, faults  # one readable line, not a dump of what came in
    # Two attempts per transaction at most (Modbus retries once), each within the timeout.
    assert all(not ok and s < 2 * (TIMEOUT_S + GRACE_S) + SLACK_S for _, s, ok in r.commands)


@dataclass(frozen=True)
class Wire:
    """A protocol as the tests drive it: its driver, a device row for a peer, how the peer
    reads one request, and what a good device answers to it."""

    driver: type[PerDeviceDriver[Any]]
    spec: Callable[[str, int], DeviceSpec]
    read: Callable[[asyncio.StreamReader], Awaitable[Any]]
    good: Callable[[Any], bytes]


def first_poll_against(wire: Wire, answer: Callable[[Any], bytes]) -> None:
    """One property example: a peer answers the first request on each connection with
    `answer(request)` and hangs up (so a short frame fails now, not at the timeout); the
    driver's first poll must end cleanly."""

    async def answer_then_close(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(answer(await wire.read(reader)))
        await w.drain()

    async def example() -> None:
        async with raw_peer(answer_then_close) as peer:
            await one_poll(wire.driver, wire.spec(peer.host, peer.port))

    asyncio.run(example())


CASES: dict[str, tuple[Wire, Handler, tuple[str, ...]]] = {}


def hostile(wire: Wire, *reasons: str, name: str = "") -> Callable[[Handler], Handler]:
    """Register a hostile device; its FAULT line must name one of `reasons`."""

    def register(handler: Handler) -> Handler:
        CASES[name or handler.__name__] = (wire, handler, reasons)
        return handler

    return register


SENT: dict[str, int] = {}
"""Bytes a flooding peer got out, by case."""


# --- Modbus TCP ---


def modbus_spec(host: str, port: int) -> DeviceSpec:
    return device_spec(name="load", host=host, port=port, poll_s=0.1, timeout_s=TIMEOUT_S)


async def read_modbus(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One request: (transaction id, unit, PDU)."""
    tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
    return tid, unit, await reader.readexactly(length - 1)


def mbap(tid: int, unit: int, pdu: bytes, length_delta: int = 0, pid: int = 0) -> bytes:
    length = max(0, min(0xFFFF, len(pdu) + 1 + length_delta))
    return struct.pack(">HHHB", tid, pid, length, unit & 0xFF) + pdu


def load_registers(measured_w: float = 5000.0, state: int = 0) -> bytes:
    """A good answer to the driver's telemetry read, as FC3 data (byte count + registers)."""
    address, count = LOAD_MAP.span("setpoint_w", "p_max_w")
    block = [0] * count
    values = {"run": 1, "measured_w": measured_w, "state": state, "p_max_w": 10_000.0}
    LOAD_MAP.encode_into(block, address, values)
    return bytes([2 * count]) + struct.pack(f">{count}H", *block)


def good_modbus_answer(request: tuple[int, int, bytes]) -> bytes:
    tid, unit, pdu = request
    if pdu[0] == 3:
        return mbap(tid, unit, b"\x03" + load_registers())
    return mbap(tid, unit, pdu[:5])  # FC16 echoes address and quantity


@dataclass(frozen=True)
class ModbusReply:
    """What a hostile peer answers to a request (see `frame`)."""

    fc: int | None  # None: the request's function code
    body: bytes
    length_delta: int = 0
    pid: int = 0
    unit_delta: int = 0
    cut: int | None = None  # send only this many bytes of the frame
    raw: bytes | None = None  # send this instead of any frame

    def frame(self, tid: int, unit: int, request_fc: int) -> bytes:
        if self.raw is not None:
            return self.raw
        fc = request_fc if self.fc is None else self.fc
        pdu = bytes([fc]) + self.body
        data = mbap(tid, unit + self.unit_delta, pdu, self.length_delta, self.pid)
        return data if self.cut is None else data[: self.cut]


modbus_replies = st.one_of(
    # exception responses, any code (0 and > 11 are not even defined)
    st.builds(ModbusReply, fc=st.just(0x83), body=st.binary(max_size=2)),
    # a read answer whose byte count and data disagree, or whose data is any 20 bytes
    st.builds(
        ModbusReply,
        fc=st.just(3),
        body=st.one_of(
            st.builds(lambda n, d: bytes([n]) + d, st.integers(0, 255), st.binary(max_size=40)),
            st.binary(min_size=20, max_size=20).map(lambda d: b"\x14" + d),
        ),
    ),
    # wrong MBAP lengths, protocol ids, units, function codes; truncated frames
    st.builds(
        ModbusReply,
        fc=st.none() | st.integers(0, 255),
        body=st.binary(max_size=60),
        length_delta=st.integers(-8, 8) | st.sampled_from([-300, 300, 0xFFFF]),
        pid=st.sampled_from([0, 0, 1, 0xFFFF]),
        unit_delta=st.sampled_from([0, 0, 1, 255]),
        cut=st.none() | st.integers(0, 12),
    ),
    # not Modbus at all
    st.builds(ModbusReply, fc=st.none(), body=st.just(b""), raw=st.binary(max_size=300)),
)


MODBUS = Wire(ModbusLoadDriver, modbus_spec, read_modbus, good_modbus_answer)


@PROPERTY
@given(reply=modbus_replies)
def test_any_modbus_reply_is_a_reading_or_a_driver_error(reply: ModbusReply) -> None:
    first_poll_against(MODBUS, lambda req: reply.frame(req[0], req[1], req[2][0]))


@hostile(MODBUS, "Modbus exception code 4")
async def exception_code(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        tid, unit, pdu = await read_modbus(reader)
        w.write(mbap(tid, unit, bytes([pdu[0] | 0x80, 4])))  # SERVER DEVICE FAILURE


@hostile(MODBUS, "registers, expected", "write answered with function 3")
async def short_read(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:  # a well-formed read answer with fewer registers than asked, to anything
        tid, unit, _ = await read_modbus(reader)
        w.write(mbap(tid, unit, b"\x03\x02\x00\x00"))


@hostile(MODBUS, "no answer within")
async def silent(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await hang(reader, w)


@hostile(MODBUS, "no answer within")
async def trickle(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:  # a good answer, one byte every 100 ms: complete only after the timeout
        await trickle_out(w, good_modbus_answer(await read_modbus(reader)), 0.1)


@hostile(MODBUS, "connection closed by the device")
async def close_mid_frame(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    tid, unit, pdu = await read_modbus(reader)
    w.write(good_modbus_answer((tid, unit, pdu))[:9])
    await w.drain()


@hostile(MODBUS, "connection closed by the device")
async def reset_mid_frame(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    tid, unit, pdu = await read_modbus(reader)
    w.write(good_modbus_answer((tid, unit, pdu))[:4])
    await w.drain()
    reset(w)


async def test_meter_with_a_looping_sunspec_chain_fails_without_looping_forever() -> None:
    """Every model header says 'model 1, length 0': a chain that never ends."""
    reads = 0

    async def looping_chain(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal reads
        while True:
            tid, unit, pdu = await read_modbus(reader)
            reads += 1
            address = struct.unpack(">H", pdu[1:3])[0]
            regs = (0x5375, 0x6E53) if address == 40000 else (1, 0)
            w.write(mbap(tid, unit, b"\x03\x04" + struct.pack(">HH", *regs)))

    async with raw_peer(looping_chain) as peer:
        cfg = MeterConfig(host=peer.host, port=peer.port, poll_s=0.2, timeout_s=TIMEOUT_S)
        meter = ModbusMeter(cfg)
        with rampd_lines() as lines:
            task = asyncio.create_task(meter.run())
            try:
                await until(lambda: meter.errors >= 2, 10.0, what="two failed discoveries")
            finally:
                await cancel_and_wait(task)
    assert not meter.ok and math.isnan(meter.value_w)
    assert reads <= 2 * (2 + 64), reads  # the marker, then at most 64 headers per discovery
    warnings = lines.at(logging.WARNING)
    assert len(warnings) == 1 and "no SunSpec float meter model" in warnings[0], warnings
    assert lines.at(logging.ERROR) == []


# --- HTTP (Redfish) ---

RACK = rf.chassis_paths("1")
RACK_READINGS = rf.RackReadings(
    reading_w=5000.0, setpoint_w=8000.0, allowable_min_w=1000.0, allowable_max_w=10_000.0
)
GOOD_CHASSIS = rf.chassis(
    RACK, name="rack", model=None, readings=RACK_READINGS, with_controls=False
)
GOOD_ENV = rf.environment_metrics(RACK, RACK_READINGS, with_limit=True)


def redfish_spec(host: str, port: int) -> DeviceSpec:
    return device_spec(
        name="rack", protocol="redfish", host=host, port=port, poll_s=0.1, timeout_s=TIMEOUT_S
    )


async def read_http(reader: asyncio.StreamReader) -> tuple[str, str]:
    """One request (body skipped): (method, path)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    method, path, _ = head.split(" ", 2)
    length = next(
        (
            int(h.split(":", 1)[1])
            for h in head.split("\r\n")
            if h.lower().startswith("content-length:")
        ),
        0,
    )
    await reader.readexactly(length)
    return method, path


def http_response(status: int, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} Hostile", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def good_http_answer(request: tuple[str, str]) -> bytes:
    method, path = request
    bodies = {RACK.chassis: GOOD_CHASSIS, RACK.environment_metrics: GOOD_ENV}
    if method == "GET" and path in bodies:
        return http_response(
            200, json.dumps(bodies[path]).encode(), "Content-Type: application/json"
        )
    if method == "PATCH":
        return http_response(204, b"")
    return http_response(404, b"")


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    length: str  # "exact", "short", "long", "none" (read to EOF), "chunked-bad"
    raw: bytes | None = None

    def wire(self) -> bytes:
        if self.raw is not None:
            return self.raw
        head = [f"HTTP/1.1 {self.status} Hostile", "Content-Type: application/json"]
        n = len(self.body)
        if self.length != "none":
            declared = {"exact": n, "short": max(0, n - 3), "long": n + 100}.get(self.length)
            head.append(
                "Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}"
            )
        body = b"zz\r\n" + self.body if self.length == "chunked-bad" else self.body
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# A chassis that is also its own EnvironmentMetrics (every GET gets the same answer), with some
# of the keys the driver reads replaced by anything.
rack_like = st.dictionaries(
    st.sampled_from(["EnvironmentMetrics", "Power", "PowerWatts", "PowerLimitWatts", "Reading"]),
    json_values,
    max_size=3,
).map(lambda bad: json.dumps({**GOOD_CHASSIS, **GOOD_ENV, **bad}).encode())
http_replies = st.one_of(
    st.builds(
        HttpReply,
        status=st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 500, 503])
        | st.integers(100, 599),
        body=st.one_of(
            rack_like, json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)
        ),
        length=st.sampled_from(["exact", "exact", "short", "long", "none", "chunked-bad"]),
    ),
    st.builds(
        HttpReply,
        status=st.just(0),
        body=st.just(b""),
        length=st.just(""),
        raw=st.binary(max_size=200),
    ),
)


HTTP = Wire(RedfishDriver, redfish_spec, read_http, good_http_answer)


@PROPERTY
@given(reply=http_replies)
def test_any_http_reply_is_a_reading_or_a_driver_error(reply: HttpReply) -> None:
    first_poll_against(HTTP, lambda _: reply.wire())


def each_request(answer: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_http(reader)
            w.write(answer)

    return handler


MISSING = json.dumps(rf.error_body("ResourceMissingAtURI", "gone")).encode()
for status, body in ((404, MISSING), (500, b"<html>internal error</html>"), (503, b"")):
    hostile(HTTP, f"HTTP {status}", name=f"status_{status}")(
        each_request(http_response(status, body))
    )
TRUNCATED_JSON = http_response(200, b'{"Id": "1", "Power', "Content-Type: application/json")
hostile(HTTP, "invalid JSON", name="invalid_json")(each_request(TRUNCATED_JSON))


@hostile(HTTP, "exceeds")
async def huge_declared(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await read_http(reader)
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    await endless(w, "huge_declared")


@hostile(HTTP, "exceeds")
async def huge_chunked(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await read_http(reader)
    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    await endless(w, "huge_chunked", chunked=True)


async def endless(w: asyncio.StreamWriter, name: str, *, chunked: bool = False) -> None:
    """Write a body for ever, as fast as the driver reads it; count what got out."""
    block = b" " * 65536
    frame = b"10000\r\n" + block + b"\r\n" if chunked else block
    while not w.is_closing():
        w.write(frame)
        await w.drain()
        SENT[name] = SENT.get(name, 0) + len(block)


@hostile(HTTP, "no answer within")
async def trickle_body(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await read_http(reader)
    body = json.dumps(GOOD_CHASSIS).encode()
    w.write(http_response(200, body)[: -len(body)])  # headers on time, the body never
    await trickle_out(w, body, 0.05)


@hostile(HTTP, "no answer within")
async def silent_bmc(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await hang(reader, w)


@hostile(HTTP, "response head over")
async def endless_header(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await read_http(reader)
    w.write(b"HTTP/1.1 200 OK\r\nX-Filler: ")
    while not w.is_closing():
        w.write(b"a" * 4096)
        await w.drain()


# --- every hostile device above: FAULT once, isolated, bounded, and recovery once ---


@pytest.mark.parametrize("case", list(CASES))
async def test_hostile_device_faults_once_and_recovers(case: str) -> None:
    wire, handler, reasons = CASES[case]
    healed = False

    async def device(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not healed:
            return await handler(reader, w)
        while True:
            w.write(wire.good(await wire.read(reader)))

    async with (
        raw_peer(device) as peer,
        running(wire.driver, wire.spec(peer.host, peer.port)) as r,
    ):
        await faults_once_within_timeout(r, *reasons)
        healed = True
        peer.drop()  # from the next connection on, good answers
        await until(lambda: r.state == DeviceState.ON, 10.0, what="recovered")
        assert len(r.lines.with_text("recovered")) == 1
        r.no_unexpected_errors()
    if case in SENT:
        # Refused at the limit: what the peer got out is the limit plus socket buffers, not
        # everything it would have sent in those seconds at loopback speed.
        assert SENT.pop(case) < rf.MAX_BODY_BYTES + 32 * 2**20


# --- LuxOS: the transport (reply parsing has its own property tests) ---


async def luxos_exchange(handler: Handler) -> tuple[BaseException, float]:
    async with raw_peer(handler) as peer:
        t0 = time.monotonic()
        with pytest.raises(DriverError) as caught:
            await exchange(peer.host, peer.port, lux.encode_request("power"), TIMEOUT_S)
        return caught.value, time.monotonic() - t0


async def test_luxos_connection_reset_is_a_driver_error_at_once() -> None:
    async def reset_now(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        reset(w)

    async def reset_mid_reply(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        w.write(b'{"STATUS": [{"STATUS": "S"')
        await w.drain()
        await asyncio.sleep(0.05)
        reset(w)

    for handler, error in ((reset_now, DriverError), (reset_mid_reply, ProtocolError)):
        exc, elapsed = await luxos_exchange(handler)
        assert type(exc) is error and elapsed < TIMEOUT_S, (handler.__name__, exc, elapsed)


async def test_luxos_never_ending_reply_is_cut_at_the_size_limit_or_the_timeout() -> None:
    async def flood(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        w.write(b'{"STATUS": "')
        while not w.is_closing():
            w.write(b"x" * 65536)
            await w.drain()

    async def trickle(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        while not w.is_closing():
            w.write(b'{"a": ')
            await asyncio.sleep(0.02)

    exc, elapsed = await luxos_exchange(flood)
    assert isinstance(exc, ProtocolError) and "over" in str(exc), exc
    exc, elapsed = await luxos_exchange(trickle)
    assert isinstance(exc, DeviceTimeout), exc
    assert elapsed < TIMEOUT_S + SLACK_S
