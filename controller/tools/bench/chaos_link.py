"""The chaos bench's dispatcher: the regulation signal sent as rampd's dispatch protocol says,
across broker restarts and daemon restarts, re-sending what went unanswered as a real
dispatcher would.

Each signal sample (every 2 s / K) is published as a `regulation` dispatch. A dispatch whose ack
has not come ACK_WAIT_S after it was published (or whose publish failed: no broker) makes the
dispatcher *owe* the daemon its latest un-acked dispatch: it stops streaming new samples and
re-sends that one's content with a new id and seq every ACK_WAIT_S (each wait bounded), until
a re-send is acked; then the signal goes on from the current sample. Samples that fell due in
between are held back (counted), never queued. When the connection is lost the client is
replaced: a new one is tried every 0.5 s (each try bounded) until the broker is back.

Acks, telemetry and status are gathered from every connection in turn, each with the unix
time the bench read it (every GATHER_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Final, TextIO

import aiomqtt

from controller.dispatcher import DispatcherClient
from controller.tools.bench.site_run import HEARTBEAT_S, Site
from controller.wire import Status, Telemetry

ACK_WAIT_S: Final = 3.0
PUBLISH_TIMEOUT_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 5.0
RECONNECT_PAUSE_S: Final = 0.5
GATHER_S: Final = 0.2


@dataclass(slots=True)
class Attempt:
    """One publish of a dispatch (`failed`: the broker did not take it)."""

    n: int
    sample: int
    """Index of the signal sample it carries."""
    signal: float
    resend: bool
    t: float
    id: str
    failed: bool = False
    ack_at: float | None = None
    accepted: bool | None = None
    reason: str = ""


class Link:
    """The bench's dispatcher side of a chaos run (see the module's docstring)."""

    def __init__(self, site: Site, base_kw: float, band_kw: float, tel_log: TextIO) -> None:
        self.site = site
        self.base_kw, self.band_kw = base_kw, band_kw
        self._tel_log = tel_log
        self.client: DispatcherClient | None = site.d
        self._marks = (0, 0, 0)
        self.attempts: list[Attempt] = []
        self.by_id: dict[str, Attempt] = {}
        self.telemetry: list[Telemetry] = []
        self.status: list[tuple[float, Status]] = []
        self.owed: Attempt | None = None
        self.held = 0
        self.reconnects = 0
        self._reconnect: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- what the daemon says -------------------------------------------------------------

    def gather(self) -> None:
        c = self.client
        if c is None:
            return
        now = time.time()
        na, nt, ns = self._marks
        for ack in c.acks[na:]:
            a = self.by_id.get(ack.id) if ack.id is not None else None
            if a is not None and a.ack_at is None:
                a.ack_at, a.accepted, a.reason = now, ack.accepted, ack.reason
        self.telemetry.extend(c.telemetry[nt:])
        self.status.extend((now, s) for s in c.status[ns:])
        self._marks = (len(c.acks), len(c.telemetry), len(c.status))

    def start(self) -> None:
        self._watch = asyncio.create_task(self._gathering(), name="chaos-gather")

    async def _gathering(self) -> None:
        while True:
            self.gather()
            await asyncio.sleep(GATHER_S)

    async def telemetry_after(self, t: float, within: float) -> float | None:
        """The `at` of the first telemetry of a running control cycle stamped after unix
        time t (a restarted daemon's, or one sent after a broker restart), waiting up to
        `within` s; None if none came."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            at = next((x.at for x in self.telemetry if x.at > t and x.started), None)
            if at is not None:
                return at
            await asyncio.sleep(GATHER_S)
        return None

    # -- what the dispatcher says ---------------------------------------------------------

    async def tick(self, sample: int, signal: float) -> None:
        """One signal sample falls due: send it, or re-send what is owed, or hold it."""
        self.gather()
        now = time.time()
        last = self.attempts[-1] if self.attempts else None
        if self.owed is None and last is not None and self._overdue(last, now):
            self.owed = last
        if self.owed is not None and last is not None:
            if last.ack_at is not None:
                self.owed = None  # answered: back to the signal
            elif self._overdue(last, now):
                await self._send(self.owed.sample, self.owed.signal, resend=True)
                return
            else:
                self.held += 1
                return
        await self._send(sample, signal, resend=False)

    async def settle(self, within: float) -> bool:
        """After the replay: re-send the latest dispatch until it is acked (True), or give
        up after `within` s (False)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.gather()
            last = self.attempts[-1] if self.attempts else None
            if last is None or last.ack_at is not None:
                self.owed = None
                return True
            if self._overdue(last, time.time()):
                self.owed = self.owed or last
                await self._send(self.owed.sample, self.owed.signal, resend=True)
            await asyncio.sleep(GATHER_S)
        return False

    @staticmethod
    def _overdue(a: Attempt, now: float) -> bool:
        return a.ack_at is None and (a.failed or now - a.t >= ACK_WAIT_S)

    async def _send(self, sample: int, signal: float, *, resend: bool) -> None:
        client = self.client
        failed = client is None
        if client is None:
            d_id = ""
            t = time.time()
        else:
            d = client.dispatch(
                "regulation", self.base_kw, band_kw=self.band_kw, signal=round(signal, 4)
            )
            d_id, t = d.id, time.time()
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    t = (await client.publish(d)).t
            except aiomqtt.MqttError:
                failed = True
                self._start_reconnect()
            except TimeoutError:
                failed = True  # no PUBACK yet: a slow broker, or one paho has not seen die
        a = Attempt(len(self.attempts), sample, signal, resend, t, d_id, failed)
        self.attempts.append(a)
        if d_id:
            self.by_id[d_id] = a

    # -- connections ----------------------------------------------------------------------

    def _start_reconnect(self) -> None:
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.create_task(self._reconnecting(), name="chaos-reconnect")

    async def _reconnecting(self) -> None:
        old = self.client
        if old is not None:
            self.gather()
            self.client = None
            with contextlib.suppress(Exception):
                await old.__aexit__(None, None, None)
        host, port = self.site.broker
        while True:
            self.reconnects += 1
            client = DispatcherClient(
                host,
                port,
                self.site.cfg.topic_root,
                id_prefix="bench",
                identifier=f"rampd-chaos-{os.getpid()}-{self.reconnects}",
                heartbeat_s=HEARTBEAT_S,
                on_telemetry=self._log_telemetry,
            )
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await client.__aenter__()
            except (aiomqtt.MqttError, TimeoutError, OSError):
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            self._marks = (0, 0, 0)
            self.client = client
            return

    def _log_telemetry(self, _: Telemetry, raw: bytes) -> None:
        self._tel_log.write(raw.decode("utf-8", "replace") + "\n")

    async def close(self) -> None:
        """Stop gathering and reconnecting; close the connections this link opened (the
        site's own client is the site's to close)."""
        self.gather()
        for task in (self._watch, self._reconnect):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.client is not None and self.client is not self.site.d:
            with contextlib.suppress(Exception):
                await self.client.__aexit__(None, None, None)
