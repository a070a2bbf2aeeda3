"""The daemon's MQTT link: one aiomqtt connection kept alive for the life of the daemon.

It subscribes to `<root>/dispatch`, `<root>/heartbeat` and any further inputs (price, peak,
economics) and hands payloads to sync callbacks, publishes from a bounded non-blocking
out-queue, keeps the retained `<root>/status` (also the MQTT will), and reconnects with
capped exponential backoff and jitter. What the messages mean is `controller.wire`'s.

Incoming messages go from paho's read callback into the link's own bounded in-queue, and one
task hands them to the callbacks in arrival order, as many as fit in `_SLICE_S`, then gives
the event loop its turn: a flood (thousands a second) never keeps the control cycle waiting
longer than a slice and a read, costs no task per message (aiomqtt's iterator makes one,
which was half the cost of a message), and reading stays apart from handling, so the PUBACKs
of our own publishes are read at once, not after every dispatch before them is handled.
A dispatch first passes `admit_dispatch` as it is read (the rate limit): one refused there
never waits in the in-queue, so the limit counts arrivals, not what handling keeps up with.
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
from typing import Final, Literal

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from controller.config import ConfigError, MqttConfig
from controller.wire.status import Status
from drivers.core.cancellation import stop_if_cancelled

# The dispatch link's log name, which operators filter on (not this module's name).
log = logging.getLogger("rampd.dispatch")

PayloadHandler = Callable[[bytes], None]

# Out-queue classes: telemetry is dropped first when full, acks never.
_DROP_FIRST: Final = "telemetry"
_NEVER_DROP: Final = "ack"
# QoS 1 publishes awaiting their PUBACK at once (paho's in-flight limit is set to match).
_PUBLISH_WINDOW: Final = 64
_PUBACK_GRACE_S: Final = 0.5
_IN_MAX: Final = 10_000
"""Messages read and not yet handed over. Beyond it an incoming message is dropped (counted,
logged): the broker has its PUBACK already, as with aiomqtt's own queue of the same size.
Dispatches refused for rate cost microseconds each, so only dispatches let through in
thousands (a lifted `dispatch.max_per_s`) can fill it."""
_SLICE_S: Final = 0.005
"""Hand messages over for at most this long at a time, then let the event loop run."""
_GAP_S: Final = 0.001
"""After a slice that left messages waiting, the loop pauses this long: the daemon's threads
get the GIL (the journal writer gives it up for every SQLite call and, against a loop that
never blocks, waits a switch interval to get it back each time: a burst would outrun it)."""


@dataclass(frozen=True, slots=True)
class _Out:
    suffix: str
    payload: bytes
    qos: int
    retain: bool


# CONNACK refusals that mean "not these credentials": MQTT 3.1.1 codes 4 and 5, and the
# MQTT 5 reason codes paho maps them to (mosquitto answers a wrong password with 5).
_AUTH_REFUSED: Final = frozenset({4, 5, 0x86, 0x87})


def _data(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    return payload if isinstance(payload, bytes) else str(payload or "").encode()


def _code(rc: int | ReasonCode | None) -> int | None:
    return rc.value if isinstance(rc, ReasonCode) else rc


def tls_params(cfg: MqttConfig) -> aiomqtt.TLSParameters | None:
    """The client's TLS settings from `[mqtt.tls]`; None: plaintext."""
    tls = cfg.tls
    if tls is None:
        return None
    return aiomqtt.TLSParameters(
        ca_certs=str(tls.ca_file) if tls.ca_file else None,
        certfile=str(tls.cert_file) if tls.cert_file else None,
        keyfile=str(tls.key_file) if tls.key_file else None,
    )


def read_password(cfg: MqttConfig) -> str | None:
    """The MQTT password, from `password_file` when set (ConfigError if unreadable)."""
    if cfg.password_file is None:
        return cfg.password
    try:
        return cfg.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file: cannot read {cfg.password_file}: {exc}") from None


class MqttLink:
    """The daemon's one broker connection. Create it, then run `await link.run()` in a task.

    Everything the rest of the daemon calls (`publish`, `set_status`) is sync and never
    blocks: outgoing messages wait in a bounded queue, which survives reconnects. Incoming
    dispatches and heartbeats are handed to sync callbacks in arrival order; a callback that
    raises is logged and the link carries on.

    Sessions are clean (no broker-side queueing while we are away): a dispatch sent while the
    link is down is the dispatcher's to resend, and would be stale by the time we saw it.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        topic_root: str,
        on_dispatch: PayloadHandler,
        on_heartbeat: PayloadHandler,
        *,
        inputs: dict[str, PayloadHandler] | None = None,
        admit_dispatch: Callable[[bytes], bool] | None = None,
        queue_max: int = 1000,
        timeout_s: float = 5.0,
        backoff_base_s: float = 0.25,
    ) -> None:
        if queue_max < 1:
            raise ValueError("queue_max must be at least 1")
        self._cfg = cfg
        self._root = topic_root.rstrip("/")
        self._on_dispatch = on_dispatch
        self._on_heartbeat = on_heartbeat
        # Called as each dispatch is read (cheap, never blocking); False: dealt with there,
        # not queued for `on_dispatch`.
        self._admit = admit_dispatch
        self._dispatch_topic = self.topic("dispatch")
        # Further inputs by topic suffix (price, peak, economics), each to its handler.
        self._inputs = dict(inputs or {})
        self._handlers: dict[str, PayloadHandler] = {
            self.topic("dispatch"): on_dispatch,
            self.topic("heartbeat"): on_heartbeat,
        } | {self.topic(s): h for s, h in self._inputs.items()}
        self._queue_max = queue_max
        # Acks are never dropped for telemetry and do not count against queue_max (a burst of
        # dispatches must not push telemetry out); they have a cap of their own.
        self._acks_max = 10 * queue_max
        self._timeout_s = timeout_s
        # A PUBACK arrives behind everything the broker has already sent us: under a flood
        # that is megabytes of dispatches in the socket buffers, seconds to read. A connection
        # that is behind is not lost (paho closes one silent for twice the keepalive), so a
        # publish waits that long, not `timeout_s`, before it ends the session.
        self._puback_timeout_s = timeout_s + 2.0 * cfg.keepalive_s
        self._backoff_base_s = backoff_base_s
        self._password = read_password(cfg)
        self._tls = tls_params(cfg)

        self._out: deque[_Out] = deque()
        self._out_qos0 = 0  # of them QoS 0 (telemetry): these may pass a full window
        self._out_acks = 0
        self._in: deque[aiomqtt.Message] = deque()
        self._in_ready = asyncio.Event()
        self._in_full = False
        self._wake = asyncio.Event()
        self._mode: str = "starting"
        self._detail = ""
        self._status_dirty = False
        self._dropping = False

        self._session_up = False  # this session got as far as "connected"
        self._sessions = 0
        self.connected = False
        self.attempts = 0  # connection attempts, successful or not
        self.reconnects = 0  # successful connections after the first
        self.dropped = 0
        self.published = 0
        self.received = 0  # incoming messages read
        self.in_dropped = 0  # incoming messages dropped: the in-queue was full

    # -- topics ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._cfg.host

    @property
    def port(self) -> int:
        return self._cfg.port

    def topic(self, suffix: str) -> str:
        return f"{self._root}/{suffix}"

    @property
    def queued(self) -> int:
        return len(self._out)

    # -- the daemon's side (sync, non-blocking) -------------------------------------------

    def publish(self, suffix: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message for `<root>/<suffix>`; never blocks. Full queue: drop telemetry."""
        if qos not in (0, 1, 2):
            raise ValueError(f"bad qos {qos}")
        if not suffix or any(c in suffix for c in "#+\0"):
            raise ValueError(f"bad topic suffix {suffix!r}")
        if suffix == _NEVER_DROP:
            if self._out_acks >= self._acks_max:
                self._count_drop(suffix)
                return
        elif len(self._out) - self._out_acks >= self._queue_max and not self._make_room():
            self._count_drop(suffix)
            return
        self._out.append(_Out(suffix, payload, qos, retain))
        self._out_qos0 += qos == 0
        self._out_acks += suffix == _NEVER_DROP
        self._wake.set()
        if self._dropping and len(self._out) - self._out_acks <= self._queue_max // 2:
            self._dropping = False
            log.info("mqtt out-queue below half again; %d messages dropped so far", self.dropped)

    def set_status(self, mode: str, detail: str = "") -> None:
        """Set the retained status; published now if connected, and again on every connect."""
        if (mode, detail) != (self._mode, self._detail):
            self._mode, self._detail = mode, detail
            self._status_dirty = True
            self._wake.set()

    def _make_room(self) -> bool:
        """Drop one queued message (never an ack) to fit a new one. False: drop the new one
        instead."""
        for victim_class in (_DROP_FIRST, None):
            for i, item in enumerate(self._out):
                if item.suffix == _NEVER_DROP:
                    continue
                if victim_class is None or item.suffix == victim_class:
                    del self._out[i]
                    self._out_qos0 -= item.qos == 0
                    self._count_drop(item.suffix)
                    return True
        return False

    def _count_drop(self, suffix: str) -> None:
        self.dropped += 1
        if not self._dropping:
            self._dropping = True
            log.warning(
                "mqtt out-queue full (%d, broker slow or down): dropping oldest %s first",
                len(self._out),
                suffix,
            )

    # -- the connection -------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        take = self._take

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's incoming queue, short-circuited: paho's read callback puts each
            message here, and it goes into the link's in-queue (module docstring)."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                take(item)

        client = aiomqtt.Client(
            self._cfg.host,
            self._cfg.port,
            username=self._cfg.username,
            password=self._password,
            identifier=self._cfg.client_id,
            will=aiomqtt.Will(
                self.topic("status"),
                Status("offline", None, "connection lost", at=time.time()).encode(),
                qos=1,
                retain=True,
            ),
            clean_session=True,
            keepalive=self._cfg.keepalive_s,
            timeout=self._timeout_s,
            tls_params=self._tls,
            queue_type=Inbox,
            max_inflight_messages=_PUBLISH_WINDOW,
        )
        # aiomqtt warns on every publish while more than this await their PUBACK.
        client.pending_calls_threshold = 2 * _PUBLISH_WINDOW
        return client

    async def run(self) -> None:
        """Connect, serve, reconnect; forever, until cancelled (then publish offline)."""
        # Across sessions: what was read (and PUBACKed) is handed over even if the
        # connection drops meanwhile.
        hand_over = asyncio.create_task(self._hand_over(), name="mqtt-hand-over")
        try:
            await self._connect_forever()
        finally:
            hand_over.cancel()
            await asyncio.gather(hand_over, return_exceptions=True)

    async def _connect_forever(self) -> None:
        failures = 0
        last_reason: str | None = None
        where = f"{self._cfg.host}:{self._cfg.port}"
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
                if exc.__cause__ is not None:  # aiomqtt keeps the real cause here
                    reason = f"{reason} ({exc.__cause__})"
                if isinstance(exc, aiomqtt.MqttCodeError) and _code(exc.rc) in _AUTH_REFUSED:
                    user = self._cfg.username
                    reason += (
                        f": the broker refused {'user ' + repr(user) if user else 'anonymous'}"
                        " access (check mqtt.username, password or password_file, and the"
                        " broker's password file)"
                    )
            except OSError as exc:  # TLS files, DNS: reported and retried like a broker error
                reason = f"{type(exc).__name__}: {exc}"
            stop_if_cancelled()  # aiomqtt's wait_for may have swallowed it
            was_connected = self._session_up
            self._session_up = False
            # A connection that held for a while resets the backoff; a flapping one does not.
            if time.monotonic() - started >= min(10.0, self._cfg.reconnect_max_s):
                failures = 0
            delay = min(self._cfg.reconnect_max_s, self._backoff_base_s * 2.0**failures)
            delay *= random.uniform(0.5, 1.0)
            failures = min(failures + 1, 32)
            if was_connected:
                log.warning("mqtt lost %s: %s; retrying in %.1f s", where, reason, delay)
            elif reason != last_reason:
                log.warning(
                    "mqtt cannot connect to %s: %s; retrying in %.1f s", where, reason, delay
                )
            else:
                log.debug("mqtt still cannot connect: %s; retrying in %.1f s", reason, delay)
            last_reason = reason
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection, from connect to loss. Raises MqttError when it ends."""
        self.attempts += 1
        client = self._client()
        try:
            # aiomqtt bounds the socket connect and the CONNACK wait; this bounds the sum
            # (DNS included) so a hung resolver cannot stall reconnects.
            async with asyncio.timeout(3 * self._timeout_s):
                await client.__aenter__()
        except TimeoutError:
            raise aiomqtt.MqttError("connect timed out") from None
        try:
            await client.publish(self.topic("status"), self._status("online"), qos=1, retain=True)
            self._status_dirty = False
            topics = [self.topic(s) for s in ("dispatch", "heartbeat", *self._inputs)]
            granted = await client.subscribe([(t, 1) for t in topics], timeout=self._timeout_s)
            self._check_granted(topics, granted)
            self.connected = self._session_up = True
            self._sessions += 1
            if self._sessions > 1:
                self.reconnects += 1
            log.info("mqtt connected to %s:%d as %s", self._cfg.host, self._cfg.port, self._root)
            await self._serve(client)
        except asyncio.CancelledError:
            await self._goodbye(client)
            raise
        except aiomqtt.MqttError:
            # Still connected (e.g. a SUBACK timed out)? Say offline so the retained status
            # does not claim "online" while we back off.
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await client.publish(
                        self.topic("status"),
                        self._status("offline", "reconnecting"),
                        qos=1,
                        retain=True,
                        timeout=1.0,
                    )
            raise
        finally:
            self.connected = False
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await client.__aexit__(None, None, None)

    @staticmethod
    def _check_granted(topics: list[str], granted: Sequence[int | ReasonCode]) -> None:
        # A broker that denies a subscription (ACL) still answers SUBACK, with a failure code
        # (0x80 and up) per topic. Reconnecting would not help, but say it: the link would
        # otherwise look healthy while no dispatch can ever arrive.
        codes = [_code(g) or 0 for g in granted]
        refused = [t for t, code in zip(topics, codes, strict=False) if code >= 0x80]
        if refused:
            log.error(
                "mqtt broker refused subscription to %s (ACL?): dispatches cannot arrive",
                ", ".join(refused),
            )

    def _status(self, state: Literal["online", "offline"], detail: str | None = None) -> bytes:
        detail = self._detail if detail is None else detail
        return Status(state, self._mode, detail, at=time.time()).encode()

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """Clean stop: retained offline first; a clean DISCONNECT suppresses the will."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.publish(
                    self.topic("status"), self._status("offline", "stopped"), qos=1, retain=True
                )
            log.info("mqtt published offline status")
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("mqtt could not publish offline status: %s", exc)

    async def _serve(self, client: aiomqtt.Client) -> None:
        tasks = [
            asyncio.create_task(self._drain(client), name="mqtt-drain"),
            asyncio.create_task(self._receive(client), name="mqtt-receive"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # re-raises the MqttError that ended the session
        raise aiomqtt.MqttError("mqtt session ended")

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish the out-queue in order, up to `_PUBLISH_WINDOW` awaiting their PUBACK at
        once: one round trip per message would cap acks at a few hundred a second, below what
        a dispatch burst needs. Whatever is not known to be delivered when the session ends
        goes back to the head of the queue, in order, and is sent again after reconnect.

        QoS 0 messages (telemetry) await no PUBACK: with the window full they go ahead of
        the acks waiting for it, so telemetry keeps its pace while PUBACKs are slow (under a
        flood they arrive behind seconds of dispatches)."""
        inflight: deque[tuple[_Out, asyncio.Task[None]]] = deque()
        awaiting = 0  # of those in flight, the ones with QoS > 0: the window counts these
        try:
            while True:
                stop_if_cancelled()  # aiomqtt's wait_for may have swallowed it
                while inflight and inflight[0][1].done():
                    item, task = inflight.popleft()
                    awaiting -= item.qos > 0
                    if not self._settled(item, task):
                        inflight.appendleft((item, task))  # undelivered: the finally requeues it
                        task.result()  # re-raises the MqttError that ends the session
                if self._status_dirty:
                    self._status_dirty = False
                    try:
                        await client.publish(
                            self.topic("status"),
                            self._status("online"),
                            qos=1,
                            retain=True,
                            timeout=self._puback_timeout_s,
                        )
                    except BaseException:
                        self._status_dirty = True  # republished on reconnect anyway
                        raise
                    continue
                out = self._next_out(window_full=awaiting >= _PUBLISH_WINDOW)
                if out is not None:
                    awaiting += out.qos > 0
                    # The task hands the message to paho on its first step: tasks start in
                    # creation order, so messages go out in queue order (QoS 0 aside).
                    send = client.publish(
                        self.topic(out.suffix),
                        out.payload,
                        qos=out.qos,
                        retain=out.retain,
                        timeout=self._puback_timeout_s,
                    )
                    inflight.append((out, asyncio.create_task(send)))
                    continue
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                oldest = [inflight[0][1]] if inflight else []
                try:
                    await asyncio.wait([wake, *oldest], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        except asyncio.CancelledError:
            # Stopping (or the receive side ended the session): messages the broker already
            # has get a moment for their PUBACK rather than being sent again.
            pending = [t for _, t in inflight if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=_PUBACK_GRACE_S)
            raise
        finally:
            for _, task in inflight:
                task.cancel()
            await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)
            # Not (known to be) delivered: back to the head, in order. QoS 1 is at-least-once
            # anyway; the dispatcher dedupes acks by id.
            for item, task in reversed(inflight):
                delivered = not task.cancelled() and task.exception() is None
                if not delivered and item.qos > 0:
                    self._out.appendleft(item)
                    self._out_acks += item.suffix == _NEVER_DROP

    def _next_out(self, *, window_full: bool) -> _Out | None:
        """The next message to send: the queue's head, or with the window full the first
        QoS 0 one (looked for only when there is one: the queue may hold thousands)."""
        if not window_full and self._out:
            item = self._out.popleft()
        elif self._out_qos0:
            i = next(i for i, item in enumerate(self._out) if item.qos == 0)
            item = self._out[i]
            del self._out[i]
        else:
            return None
        self._out_qos0 -= item.qos == 0
        self._out_acks -= item.suffix == _NEVER_DROP
        return item

    def _settled(self, item: _Out, task: asyncio.Task[None]) -> bool:
        """Count a finished publish. False: not delivered, the session is over (MqttError)."""
        exc = task.exception()
        if exc is None:
            self.published += 1
            return True
        if isinstance(exc, aiomqtt.MqttError):
            return False
        # paho refused this one message (e.g. oversized): drop it, keep the link.
        log.error("mqtt cannot publish to %s; message dropped", item.suffix, exc_info=exc)
        self.dropped += 1
        return True

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Ends, with the MqttError that says why, when the connection does. No message ever
        comes out of this iteration: `Inbox` has taken each already."""
        async for _ in client.messages:
            pass

    def _take(self, message: aiomqtt.Message) -> None:
        """In paho's read callback: a dispatch past `admit_dispatch`, then into the in-queue;
        nothing more (reading stays quick)."""
        self.received += 1
        if self._admit is not None and message.topic.value == self._dispatch_topic:
            try:
                if not self._admit(_data(message)):
                    return
            except Exception:  # paho's read callback must not see it; queued as it came
                log.exception("mqtt admit_dispatch failed; the dispatch is handled as it is")
        if len(self._in) >= _IN_MAX:
            self.in_dropped += 1
            if not self._in_full:
                self._in_full = True
                log.error(
                    "mqtt in-queue full (%d messages not yet handled): dropping incoming "
                    "messages, which get no answer",
                    _IN_MAX,
                )
            return
        self._in.append(message)
        self._in_ready.set()

    async def _hand_over(self) -> None:
        """Hand the in-queue to the callbacks in arrival order, `_SLICE_S` at a time."""
        inbox = self._in
        while True:
            if not inbox:
                self._in_ready.clear()
                await self._in_ready.wait()
            deadline = time.monotonic() + _SLICE_S
            while inbox:
                self._deliver(inbox.popleft())
                if time.monotonic() >= deadline:
                    break
            if self._in_full and len(inbox) <= _IN_MAX // 2:
                self._in_full = False
                log.warning("mqtt in-queue below half again; %d dropped so far", self.in_dropped)
            # The event loop's turn (the cycle, reads, PUBACKs); with work left, a real pause.
            await asyncio.sleep(_GAP_S if inbox else 0)

    def _deliver(self, message: aiomqtt.Message) -> None:
        """One incoming message to its handler; a handler that raises is logged."""
        topic = message.topic.value
        handler = self._handlers.get(topic)
        if handler is None:
            return
        try:
            handler(_data(message))
        except Exception:
            log.exception("mqtt handler for %s failed; link continues", topic)
