"""The agent's own connection to the DSX broker (aiomqtt 2.x), apart from the daemon's link.

Subscribes to what it is given (a subscription the broker refuses, e.g. a wildcard an ACL
denies, falls back to its listed topics), hands every message to a sync callback, publishes
from a bounded out-queue that survives reconnects, and reconnects with capped exponential
backoff and jitter. Every wait is bounded. What the messages mean is the agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from controller.config import MqttConfig
from controller.mqtt_link import read_password, tls_params
from drivers.core.cancellation import stop_if_cancelled

log = logging.getLogger("rampd.dsx_flex")

_INCOMING_MAX: Final = 10_000


@dataclass(frozen=True, slots=True)
class Subscription:
    topic: str
    qos: int
    fallback: tuple[str, ...] = ()
    """Subscribed one by one when the broker refuses `topic`."""


@dataclass(frozen=True, slots=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    droppable: bool


def _code(rc: object) -> int:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else 0x80


class DsxLink:
    """Create it, then `await link.run()` in a task; `publish` is sync and never blocks."""

    def __init__(
        self,
        cfg: MqttConfig,
        subscriptions: Sequence[Subscription],
        on_message: Callable[[str, bytes], None],
        *,
        on_connected: Callable[[], None] | None = None,
        queue_max: int = 1000,
        timeout_s: float = 5.0,
        backoff_base_s: float = 0.25,
    ) -> None:
        self._cfg = cfg
        self._subs = list(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._queue_max = queue_max
        self._timeout_s = timeout_s
        self._backoff_base_s = backoff_base_s
        self._password = read_password(cfg)
        self._tls = tls_params(cfg)
        # A fixed client id keeps the session (QoS 1/2 targets queued while away).
        self._clean = cfg.client_id is None
        self._out: deque[_Out] = deque()
        self._wake = asyncio.Event()
        self.connected = False
        self.dropped = 0
        self.published = 0

    @property
    def where(self) -> str:
        return f"{self._cfg.host}:{self._cfg.port}"

    def publish(self, topic: str, payload: bytes, *, qos: int, droppable: bool) -> None:
        """Queue a message. Full: drop the oldest droppable one (else the new one, if it is
        droppable itself); never blocks."""
        if len(self._out) >= self._queue_max:
            victim = next((i for i, o in enumerate(self._out) if o.droppable), None)
            if victim is not None:
                del self._out[victim]
            elif droppable or len(self._out) >= 4 * self._queue_max:
                self.dropped += 1
                return
            if victim is not None:
                self.dropped += 1
        self._out.append(_Out(topic, payload, qos, droppable))
        self._wake.set()

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._cfg.host,
            self._cfg.port,
            username=self._cfg.username,
            password=self._password,
            identifier=self._cfg.client_id,
            clean_session=self._clean,
            keepalive=self._cfg.keepalive_s,
            timeout=self._timeout_s,
            tls_params=self._tls,
            max_queued_incoming_messages=_INCOMING_MAX,
        )

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled."""
        failures = 0
        last: str | None = None
        while True:
            started = time.monotonic()
            reason = "session ended"
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
                if exc.__cause__ is not None:
                    reason = f"{reason} ({exc.__cause__})"
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            stop_if_cancelled()  # aiomqtt's wait_for may have swallowed a cancellation
            was_connected, self.connected = self.connected, False
            if time.monotonic() - started >= min(10.0, self._cfg.reconnect_max_s):
                failures = 0  # it held a while: not flapping
            delay = min(self._cfg.reconnect_max_s, self._backoff_base_s * 2.0**failures)
            delay *= random.uniform(0.5, 1.0)
            failures = min(failures + 1, 32)
            if was_connected or reason != last:
                log.warning(
                    "dsx flex broker %s %s: %s; retrying in %.1f s",
                    self.where,
                    "lost" if was_connected else "unreachable",
                    reason,
                    delay,
                )
            last = reason
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = self._client()
        try:
            async with asyncio.timeout(3 * self._timeout_s):
                await client.__aenter__()
        except TimeoutError:
            raise aiomqtt.MqttError("connect timed out") from None
        try:
            await self._subscribe(client)
            self.connected = True
            log.info("dsx flex connected to %s", self.where)
            if self._on_connected is not None:
                self._on_connected()
            tasks = [
                asyncio.create_task(self._drain(client), name="dsx-drain"),
                asyncio.create_task(self._receive(client), name="dsx-receive"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                t.result()
            raise aiomqtt.MqttError("session ended")
        finally:
            self.connected = False
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await client.__aexit__(None, None, None)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        for sub in self._subs:
            granted = await client.subscribe(sub.topic, qos=sub.qos, timeout=self._timeout_s)
            if all(_code(g) < 0x80 for g in granted):
                continue
            if not sub.fallback:
                log.error("dsx flex broker refused subscription to %s (ACL?)", sub.topic)
                continue
            log.warning(
                "dsx flex broker refused %s (ACL?): subscribing to %s",
                sub.topic,
                ", ".join(sub.fallback),
            )
            topics = [(t, sub.qos) for t in sub.fallback]
            granted = await client.subscribe(topics, timeout=self._timeout_s)
            refused = [t for (t, _), g in zip(topics, granted, strict=False) if _code(g) >= 0x80]
            if refused:
                log.error("dsx flex broker refused subscription to %s", ", ".join(refused))

    async def _drain(self, client: aiomqtt.Client) -> None:
        """One message at a time (a status a second or so; no window needed), each waited
        for its PUBACK/PUBCOMP within the timeout; undelivered ones go back to the head."""
        while True:
            stop_if_cancelled()
            if not self._out:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._out.popleft()
            try:
                await client.publish(
                    item.topic, item.payload, qos=item.qos, timeout=self._timeout_s
                )
            except aiomqtt.MqttError:
                self._out.appendleft(item)
                raise
            except asyncio.CancelledError:
                self._out.appendleft(item)  # at least once: it may be sent again
                raise
            except ValueError as exc:  # paho refused this one message (too large)
                log.error("dsx flex cannot publish to %s: %s; dropped", item.topic, exc)
                self.dropped += 1
                continue
            self.published += 1

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            try:
                self._on_message(message.topic.value, data)
            except Exception:
                log.exception("dsx flex handler for %s failed; link continues", message.topic)
