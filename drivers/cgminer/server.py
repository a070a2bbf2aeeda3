"""The server side of the cgminer-style API, for the firmware simulators.

Each simulated miner listens on its own address; a connection carries one request and its reply,
then closes, as on a real miner. `ApiConnection` is that connection, parametrised by the
firmware (`MinerApi`: its replies, and what it answers under the physics' faults); `Listeners`
holds a simulator's listening sockets and open connections so `close()` ends them all, as a dead
miner does. The simulators' web landing pages (what firmware scanners probe) are served here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar, cast

from drivers.base import ProtocolError
from drivers.cgminer.sim import MinerRows
from drivers.cgminer.wire import MAX_MESSAGE_BYTES, object_end
from drivers.core.spec import DeviceSpec
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

T = TypeVar("T")
SimT = TypeVar("SimT", bound=MinerRows)

REQUEST_TIMEOUT_S: Final = 5.0
"""A client that connects and sends no complete request within this is dropped."""
SILENT_HOLD_S: Final = 30.0
"""SILENT holds a connection open (answering nothing) at most this long."""


@dataclass(frozen=True, slots=True)
class FaultReplies:
    """What a firmware's API answers under the physics' faults; SILENT is always silence."""

    garbage: bytes | None = None
    """GARBAGE answers these bytes (None: a normal answer)."""
    error: Callable[[int], bytes] | None = None
    """ERROR answers miner k's error reply, built when sent (None: a normal answer)."""
    slow: bool = True
    """SLOW answers after SLOW_S (False: at once)."""


@dataclass(frozen=True, slots=True)
class MinerApi:
    """One firmware's API as its simulated miners serve it (miner k: local index)."""

    reply: Callable[[int, bytes], bytes]
    """Miner k's encoded reply to one request, faults aside."""
    fault: Callable[[int], int]
    """Miner k's fault now: read per request, so a fault set mid-connection counts."""
    faults: FaultReplies = field(default_factory=FaultReplies)
    max_request_bytes: int = MAX_MESSAGE_BYTES
    """A request not complete at this size is answered as it is."""


class ApiConnection(asyncio.Protocol):
    """One connection to a miner's API: a request in, the reply out, closed.

    A bare Protocol, not streams and a task: a site's thousands of miners answer every poll and
    every command on a new connection, and the simulator must stay cheaper than the clients it
    serves. Only a SLOW fault takes a task (it sleeps); SILENT holds the connection on a timer.
    """

    def __init__(self, listeners: Listeners, api: MinerApi, k: int) -> None:
        self._listeners = listeners
        self._api = api
        self._k = k
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._listeners.transports.add(self._transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REQUEST_TIMEOUT_S, self._transport.close)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # SILENT reads and discards
        self._buf += data
        try:
            end = object_end(self._buf)
        except ProtocolError:
            end = len(self._buf)  # not JSON: answer it as such
        if end is None and len(self._buf) <= self._api.max_request_bytes:
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
            self._listeners.transports.discard(self._transport)

    def _answer(self, request: bytes) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._api.faults.slow and self._api.fault(self._k) == Fault.SLOW:
            task = asyncio.get_running_loop().create_task(self._slow(request))
            self._listeners.conns.add(task)
            task.add_done_callback(self._listeners.conns.discard)
        else:
            self._reply(request)

    async def _slow(self, request: bytes) -> None:
        await asyncio.sleep(SLOW_S)
        self._reply(request)

    def _reply(self, request: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        api, k = self._api, self._k
        fault = api.fault(k)
        if fault == Fault.SILENT:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(SILENT_HOLD_S, transport.close)
            return
        faults = api.faults
        if fault == Fault.GARBAGE and faults.garbage is not None:
            transport.write(faults.garbage)
        elif fault == Fault.ERROR and faults.error is not None:
            transport.write(faults.error(k))
        else:
            transport.write(api.reply(k, request))
        transport.close()  # after the buffered reply is written


class Listeners:
    """The listeners of a set of simulated miners; `close()` stops them and their connections."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.transports: set[asyncio.Transport] = set()
        self.conns: set[asyncio.Task[None]] = set()
        """Tasks of connections a fault may hold open (SLOW replies, web pages)."""

    async def listen_api(self, api: MinerApi, k: int, spec: DeviceSpec, port: int) -> None:
        """Miner k's API on (spec.host, port)."""
        loop = asyncio.get_running_loop()
        server = loop.create_server(
            lambda: ApiConnection(self, api, k), spec.host, port, backlog=64
        )
        self.servers.append(await bind(spec, port, server))

    async def listen_page(
        self, fault: Callable[[int], int], k: int, spec: DeviceSpec, port: int, html: str
    ) -> None:
        """Miner k's web UI landing page `html` on (spec.host, port), reduced to what identifies
        the firmware; unanswered under a SILENT `fault(k)`."""
        page = html.encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n"
        ).encode()

        async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await reader.readuntil(b"\r\n\r\n")
                if fault(k) == Fault.SILENT:
                    return
                w.write(head + page)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await w.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                w.close()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:  # so close() can end connections a fault holds open
                self.conns.add(task)
            try:
                await serve(reader, writer)
            finally:
                if task is not None:
                    self.conns.discard(task)

        server = asyncio.start_server(on_connect, spec.host, port, backlog=64)
        self.servers.append(await bind(spec, port, server))

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


class MinerServers(Listeners, Generic[SimT]):
    """The listeners of one firmware's simulated miners, and the simulator they serve."""

    def __init__(self, sim: SimT) -> None:
        super().__init__()
        self.sim = sim

    @property
    def physics(self) -> SitePhysics:
        return self.sim.physics


async def bind(spec: DeviceSpec, port: int, start: Awaitable[T]) -> T:
    """`start` (a listener on spec.host:port), its OSError naming the miner and the address."""
    try:
        return await start
    except OSError as exc:
        raise OSError(
            f"sim: cannot listen on {spec.host}:{port} for {spec.name}: {exc.strerror}"
        ) from None


def served_specs(
    physics: SitePhysics, indices: Sequence[int], specs: Sequence[DeviceSpec]
) -> tuple[list[int], list[DeviceSpec]]:
    """The rows `indices` and their specs; `specs` is either parallel to `indices` or the whole
    site's list (indexed by row)."""
    rows = [int(i) for i in indices]
    if len(specs) == len(rows):
        return rows, list(specs)
    if len(specs) == physics.n:
        return rows, [specs[i] for i in rows]
    raise ValueError(f"{len(specs)} specs for {len(rows)} miners of {physics.n} rows")


__all__ = [
    "REQUEST_TIMEOUT_S",
    "SILENT_HOLD_S",
    "ApiConnection",
    "FaultReplies",
    "Listeners",
    "MinerApi",
    "MinerServers",
    "bind",
    "served_specs",
]
