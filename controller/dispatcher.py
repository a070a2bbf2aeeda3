"""A dispatcher's side of the protocol: the one client the demo, the benches and the tests use
to talk to a rampd as a grid dispatcher would.

It publishes typed dispatches (increasing `seq`; signed as a JWS when given a `Signer`, or
with the legacy `sig` when given the daemon's legacy key) and heartbeats (signed with the
`Signer` too), and keeps what the daemon says (acks, telemetry, status) decoded into
`controller.wire`'s models. A message that does not decode is counted in `bad`, not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt

from controller.wire import Ack, Dispatch, DispatchMode, Heartbeat, Status, Telemetry
from controller.wire.jws import Signer


@dataclass(frozen=True, slots=True)
class Sent:
    """One published dispatch and the unix time taken just before publishing it."""

    dispatch: Dispatch
    t: float


class DispatcherClient:
    """`async with DispatcherClient(host, port, root) as d:` connected and subscribed to the
    daemon's `ack`, `telemetry` and `status`, until the block ends.

    `signer`: sign every dispatch and heartbeat as a JWS (`Signer.hs256(kid, secret)` or
    `Signer.es256(kid, private_key)`: a kid of the daemon's `dispatch.keys`).
    `key`: the legacy form instead: `sig` in every dispatch (the daemon's
    `dispatch.hmac_key_file` bytes); heartbeats go unsigned.
    `heartbeat_s`: publish a heartbeat this often (None: only when `heartbeat()` is called).
    `connect_within`: keep trying a broker that is still starting for this long.
    `on_telemetry`: called with each telemetry message as it arrives, and its raw bytes.
    """

    def __init__(
        self,
        host: str,
        port: int,
        root: str,
        *,
        key: bytes | None = None,
        signer: Signer | None = None,
        id_prefix: str = "dispatcher",
        identifier: str | None = None,
        heartbeat_s: float | None = None,
        connect_within: float = 0.0,
        on_telemetry: Callable[[Telemetry, bytes], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.root = root.rstrip("/")
        if key is not None and signer is not None:
            raise ValueError("give a JWS signer or a legacy key, not both")
        self.key = key
        self.signer = signer
        self.id_prefix = id_prefix
        self._identifier = identifier or f"{id_prefix}-{os.getpid()}-{time.monotonic_ns()}"
        self._heartbeat_s = heartbeat_s
        self._connect_within = connect_within
        self._on_telemetry = on_telemetry
        # Microseconds since the epoch: above whatever an earlier run had accepted.
        self._seq = time.time_ns() // 1000
        self.acks: list[Ack] = []
        self.telemetry: list[Telemetry] = []
        self.status: list[Status] = []
        self.bad = 0
        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._news = asyncio.Event()

    # -- connection -----------------------------------------------------------------------

    @property
    def client(self) -> aiomqtt.Client:
        if self._client is None:
            raise RuntimeError("dispatcher client not connected (use `async with`)")
        return self._client

    async def __aenter__(self) -> DispatcherClient:
        deadline = time.monotonic() + self._connect_within
        while True:
            client = aiomqtt.Client(self.host, self.port, identifier=self._identifier, timeout=5)
            try:
                await client.__aenter__()
                break
            except aiomqtt.MqttError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)
        self._client = client
        try:
            for suffix in ("ack", "telemetry", "status"):
                await client.subscribe(self.topic(suffix), qos=1)
        except BaseException:
            await self._close()
            raise
        self._tasks.append(asyncio.create_task(self._listen(), name="dispatcher-listen"))
        if self._heartbeat_s is not None:
            self._tasks.append(asyncio.create_task(self._beat(self._heartbeat_s)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close()

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await client.__aexit__(None, None, None)

    def topic(self, suffix: str) -> str:
        return f"{self.root}/{suffix}"

    # -- what the daemon says ---------------------------------------------------------------

    async def _listen(self) -> None:
        ack_t, tel_t, status_t = self.topic("ack"), self.topic("telemetry"), self.topic("status")
        async for msg in self.client.messages:
            payload = msg.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            topic = msg.topic.value
            try:
                if topic == ack_t:
                    self.acks.append(Ack.decode(data))
                elif topic == tel_t:
                    tel = Telemetry.decode(data)
                    self.telemetry.append(tel)
                    if self._on_telemetry is not None:
                        self._on_telemetry(tel, data)
                elif topic == status_t:
                    self.status.append(Status.decode(data))
            except ValueError:
                self.bad += 1
            # Wake every waiter once; later waiters wait on a fresh event.
            self._news.set()
            self._news = asyncio.Event()

    def latest(self) -> Telemetry | None:
        return self.telemetry[-1] if self.telemetry else None

    def ack_seen(self, dispatch_id: str) -> Ack | None:
        """The latest ack answering `dispatch_id` (a grouped one among them: `Ack.more`)."""
        for ack in reversed(self.acks):
            if ack.answers(dispatch_id):
                return ack
        return None

    async def ack_for(self, dispatch_id: str, within: float = 5.0) -> Ack:
        """The daemon's ack of `dispatch_id`; TimeoutError if none comes within `within` s."""
        async with asyncio.timeout(within):
            while True:
                news = self._news
                if (ack := self.ack_seen(dispatch_id)) is not None:
                    return ack
                await news.wait()

    async def fresh_telemetry(self, within: float = 5.0) -> Telemetry:
        """The next telemetry message to arrive; TimeoutError if none within `within` s."""
        n = len(self.telemetry)
        async with asyncio.timeout(within):
            while True:
                news = self._news
                if len(self.telemetry) > n:
                    return self.telemetry[-1]
                await news.wait()

    async def until(self, check: Callable[[], bool], within: float) -> None:
        """Wait, message by message, until `check()` holds; TimeoutError after `within` s."""
        async with asyncio.timeout(within):
            while True:
                news = self._news
                if check():
                    return
                await news.wait()

    # -- what the dispatcher says -----------------------------------------------------------

    def next_seq(self) -> int:
        # Never below the clock either: a client made after a restart stays above this one.
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def dispatch(
        self,
        mode: DispatchMode = "setpoint",
        target_kw: float | None = None,
        *,
        ramp_s: float = 0.0,
        band_kw: float | None = None,
        signal: float | None = None,
        start_at: float | None = None,
        expires_at: float | None = None,
        issued_at: float | None = None,
        seq: int | None = None,
        id: str | None = None,
        services_kw: dict[str, float] | None = None,
    ) -> Dispatch:
        """A new dispatch, the next seq, issued now (unless given); not yet sent.
        `services_kw`: armed amounts by frequency service ({"ffr": 1500.0})."""
        seq = self.next_seq() if seq is None else seq
        if mode == "release":
            target_w = float("nan")  # the encoder leaves it out; the daemon takes its maximum
        elif mode == "recall":
            target_w = 0.0  # no target: the encoder leaves it out
        elif target_kw is None:
            raise ValueError(f"a {mode} dispatch needs target_kw")
        else:
            target_w = target_kw * 1e3
        if mode == "regulation" and signal is None:
            signal = 0.0
        return Dispatch(
            id=id or f"{self.id_prefix}-{seq}",
            seq=seq,
            # Milliseconds, as the wire carries it: the kept model is what the daemon reads.
            issued_at=round(time.time(), 3) if issued_at is None else issued_at,
            mode=mode,
            target_w=target_w,
            ramp_s=ramp_s,
            start_at=start_at,
            expires_at=expires_at,
            signal=signal,
            band_w=None if band_kw is None else band_kw * 1e3,
            armed_w=None if services_kw is None else {k: v * 1e3 for k, v in services_kw.items()},
        )

    def commitment(
        self,
        start_at: float,
        end_at: float,
        *,
        reduce_to_kw: float | None = None,
        reduce_by_kw: float | None = None,
        ramp_down_s: float = 0.0,
        ramp_up_s: float = 0.0,
    ) -> Dispatch:
        """A commitment: the site at `reduce_to_kw`, or `reduce_by_kw` below its baseline,
        from `start_at` to `end_at` (unix s); not yet sent."""
        if (reduce_to_kw is None) == (reduce_by_kw is None):
            raise ValueError("give one of reduce_to_kw and reduce_by_kw")
        seq = self.next_seq()
        return Dispatch(
            id=f"{self.id_prefix}-{seq}",
            seq=seq,
            issued_at=round(time.time(), 3),
            mode="commitment",
            target_w=0.0 if reduce_to_kw is None else reduce_to_kw * 1e3,
            ramp_s=ramp_down_s,
            start_at=start_at,
            end_at=end_at,
            reduce_by_w=None if reduce_by_kw is None else reduce_by_kw * 1e3,
            ramp_up_s=ramp_up_s,
        )

    async def publish(self, dispatch: Dispatch) -> Sent:
        """Publish `dispatch` (signed when the client has a signer or a key)."""
        payload = self.encode(dispatch)
        t = time.time()
        await self.client.publish(self.topic("dispatch"), payload, qos=1)
        return Sent(dispatch, t)

    async def send(
        self, mode: DispatchMode = "setpoint", target_kw: float | None = None, **fields: Any
    ) -> Sent:
        """Build (see `dispatch` for the fields) and publish one dispatch."""
        return await self.publish(self.dispatch(mode, target_kw, **fields))

    async def send_acked(
        self,
        mode: DispatchMode = "setpoint",
        target_kw: float | None = None,
        *,
        within: float = 5.0,
        **fields: Any,
    ) -> tuple[Ack, float]:
        """Send one dispatch and wait for its ack; (ack, unix time just before publishing)."""
        sent = await self.send(mode, target_kw, **fields)
        return await self.ack_for(sent.dispatch.id, within), sent.t

    async def publish_raw(self, payload: bytes | str, suffix: str = "dispatch") -> None:
        """Publish bytes as they are: for hostile and malformed traffic in tests."""
        await self.client.publish(self.topic(suffix), payload, qos=1)

    def encode(self, dispatch: Dispatch) -> bytes:
        """What `publish` sends: a JWS over the dispatch's JSON, or the JSON (legacy `sig`
        with a key)."""
        if self.signer is not None:
            return self.signer.sign(dispatch.encode())
        return dispatch.encode(self.key)

    async def heartbeat(self) -> None:
        payload = Heartbeat(self.id_prefix, time.time()).encode()
        if self.signer is not None:
            payload = self.signer.sign(payload)
        await self.client.publish(self.topic("heartbeat"), payload, qos=0)

    async def _beat(self, every_s: float) -> None:
        while True:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.heartbeat()
            await asyncio.sleep(every_s)
