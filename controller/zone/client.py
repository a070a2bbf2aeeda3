"""The zone driver: each row is a child rampd, reached over MQTT through its dispatch protocol.

One broker connection (the parent's broker; zones' topics arrive over a bridge or a cluster)
serves every zone: it subscribes to each zone's `status`, `telemetry` and `ack`, and publishes
dispatches and heartbeats. The per-device machinery (pending slot, latest value wins, backoff,
FAULT after repeated failures, counters) is `PerDeviceDriver`'s: a poll reads the latest
telemetry that arrived, a command is one dispatch answered by its ack.

A zone is FAULT to its parent when its status goes offline (its will), its telemetry goes
stale, or it rejects dispatches; the parent then holds it at its last known power and routes
its share to the others. A zone whose parent goes silent stops getting heartbeats and applies
its own failsafe. Bounds and ramp rates follow the zone's reported capability
(learned limits, written through the driver's port), with hysteresis, so a zone that loses
devices is asked for less. The driver registers itself as protocol "zone".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, Unpack

import aiomqtt
import numpy as np

from controller.config import ConfigError, MqttConfig, read_hmac_key
from controller.mqtt_link import read_password, tls_params
from controller.wire import Ack, Dispatch, Heartbeat, Status, Telemetry
from controller.zone.dynamics import derive_dynamics, zone_telemetry
from drivers.base import Backoff, CommandObserver, DeviceTimeout, DriverError, ProtocolError
from drivers.core.cancellation import stop_if_cancelled
from drivers.core.command import Intent
from drivers.core.image import DevicePort, Limits
from drivers.core.registry import DriverContext, register
from drivers.core.state import DeviceState
from drivers.device_driver import DriverOptions, PerDeviceDriver, Reading

log = logging.getLogger("rampd.zone")

HEARTBEAT_S: Final = 1.0
"""Heartbeats to every zone: its dispatcher (this parent) is alive."""
STALE_POLLS: Final = 3.0
"""Telemetry older than this many poll periods (the zone publishes every second) is stale."""
RATE_HYSTERESIS: Final = 0.25
BOUND_HYSTERESIS: Final = 0.02
"""Changes below these (relative rate; fraction of the configured range) are noise."""


class ZoneDriver(PerDeviceDriver[Reading]):
    protocol = "zone"
    attempt_noun = "reads or dispatches"
    verifies_commands = False  # the child rampd acks, ramps and reports its own moves
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        mqtt: MqttConfig,
        **options: Unpack[DriverOptions],
    ) -> None:
        # A zone costs nothing to ask again (its telemetry is pushed): retry within seconds.
        options.setdefault("backoff_cap_s", 2.0)
        super().__init__(port, on_command, **options)
        specs = port.specs
        self._mqtt = mqtt
        self._password = read_password(mqtt)  # ConfigError at start, like the daemon's link
        self._roots = [s.access.topic_root or f"{mqtt.prefix}/{s.name}" for s in specs]
        # A key file that is missing or short stops the daemon at start, naming the zone.
        self._keys = [read_hmac_key(Path(f"zone {s.name}"), s.access.hmac_key_file) for s in specs]
        self._topics: dict[str, tuple[int, str]] = {
            f"{root}/{kind}": (local, kind)
            for local, root in enumerate(self._roots)
            for kind in ("status", "telemetry", "ack")
        }
        n = len(specs)
        self._lo = np.array([s.p_min_w for s in specs])  # configured: the zone's contract
        self._hi = np.array([s.p_max_w for s in specs])
        self._online: list[bool | None] = [None] * n
        self._detail = [""] * n
        self._tel: list[Telemetry | None] = [None] * n
        self._tel_at = np.full(n, math.nan)
        self._first_tel = [asyncio.Event() for _ in range(n)]
        self._acks: dict[tuple[int, str], asyncio.Future[tuple[bool, str]]] = {}
        self._bad_logged = np.zeros(n, dtype=np.bool_)
        self._reject_logged = np.zeros(n, dtype=np.bool_)
        self._client: aiomqtt.Client | None = None
        self._seq = 0
        self.bad_messages = 0

    # --- the broker connection ---

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _new_client(self) -> aiomqtt.Client:
        cfg = self._mqtt
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=self._password,
            # Not the daemon's own id: the broker would drop one session for the other.
            identifier=f"{cfg.client_id}-zones" if cfg.client_id else None,
            clean_session=True,
            keepalive=cfg.keepalive_s,
            timeout=max(s.timeout_s for s in self._specs),
            tls_params=tls_params(cfg),
        )

    async def _link(self) -> None:
        """Connect, subscribe to every zone, hand messages over; reconnect with backoff."""
        backoff = Backoff(1, base_s=0.25, cap_s=self._mqtt.reconnect_max_s)
        where = f"{self._mqtt.host}:{self._mqtt.port}"
        last_error = ""
        while True:
            error = "connection ended"
            try:
                async with self._new_client() as client:
                    await client.subscribe([(t, 1) for t in self._topics])
                    self._client = client
                    backoff.succeeded(0)
                    log.info("zone link: connected to %s, %d zones", where, len(self._roots))
                    last_error = ""
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        self._on_message(message.topic.value, data)
            except aiomqtt.MqttError as exc:
                error = str(exc) or type(exc).__name__
            except OSError as exc:  # TLS files, DNS: reported and retried like the daemon's link
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self._client = None
                for fut in self._acks.values():
                    if not fut.done():
                        fut.set_exception(DriverError("broker connection lost"))
            stop_if_cancelled()  # aiomqtt's wait_for may have swallowed it
            delay = backoff.failed(0, time.monotonic())
            if error != last_error:
                log.warning("zone link: %s: %s; retrying in %.1f s", where, error, delay)
                last_error = error
            await asyncio.sleep(delay)

    async def _heartbeats(self) -> None:
        while True:
            client = self._client
            if client is not None:
                body = Heartbeat(self.name, time.time()).encode()
                for root in self._roots:
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(f"{root}/heartbeat", body, qos=0)
            stop_if_cancelled()  # aiomqtt's wait_for may have swallowed it
            await asyncio.sleep(HEARTBEAT_S)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(self._link(), name=f"{self.name}:link"),
            asyncio.create_task(self._heartbeats(), name=f"{self.name}:heartbeat"),
        ]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_message(self, topic: str, data: bytes) -> None:
        local, kind = self._topics.get(topic, (-1, ""))
        if local < 0:
            return
        try:
            if kind == "telemetry":
                self._tel[local] = zone_telemetry(data)
                self._tel_at[local] = time.monotonic()
                self._first_tel[local].set()
                self._poll_now(local)  # into the image while it is news
            elif kind == "status":
                status = Status.decode(data)
                self._online[local], self._detail[local] = status.online, status.detail
                self._poll_now(local)  # an offline zone is a fault now, not at the next poll
            else:
                ack = Ack.decode(data)
                for ident, _ in ack.names():  # a grouped ack (rate_limited) names several
                    fut = self._acks.get((local, ident or ""))
                    if fut is not None and not fut.done():
                        fut.set_result((ack.accepted, ack.reason))
        except ValueError as exc:
            # A bad message changes nothing; said once per zone until a good one arrives.
            self.bad_messages += 1
            if not self._bad_logged[local]:
                self._bad_logged[local] = True
                log.warning("zone %s: ignoring bad %s: %s", self._name(local), kind, exc)
            return
        self._bad_logged[local] = False

    def _poll_now(self, local: int) -> None:
        self._poll_soon[local] = True
        self._wake[local].set()

    # --- PerDeviceDriver ---

    async def _read(self, local: int) -> Reading:
        spec = self._specs[local]
        stale_s = STALE_POLLS * spec.poll_s
        if self._online[local] is False:
            raise DriverError(f"status offline ({self._detail[local] or 'no detail'})")
        if self._tel[local] is None:
            try:  # at start: the zone publishes every second
                async with asyncio.timeout(stale_s):
                    await self._first_tel[local].wait()
            except TimeoutError:
                raise DeviceTimeout(f"no telemetry on {self._roots[local]}") from None
        tel = self._tel[local]
        assert tel is not None  # set with the event
        age = time.monotonic() - float(self._tel_at[local])
        if age > stale_s:
            raise DeviceTimeout(f"telemetry stale ({age:.1f} s old)")
        self._learn(local, tel)
        assert tel.measured_w is not None  # zone_telemetry admits only telemetry with power
        return Reading(self._check_power(local, tel.measured_w), DeviceState.ON)

    def _reading_at(self, local: int) -> float | None:
        # The reading is as old as the telemetry it came from: a scheduled poll that finds no
        # newer message must not present old power as new (the model would take it as a
        # correction of where the zone is now).
        return float(self._tel_at[local])

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        # A zone has no sleep of its own: SLEEP asks it for its power asleep, and its own
        # planner decides which of its devices sleep for that.
        client = self._client
        if client is None:
            raise DriverError("broker not connected")
        self._seq = seq = max(time.time_ns() // 1000, self._seq + 1)  # survives a restart
        dispatch_id = f"{self.name}-{seq}"
        # At once: the zone ramps as fast as its own fleet allows.
        dispatch = Dispatch(dispatch_id, seq, time.time(), "setpoint", power_w, ramp_s=0.0)
        payload = dispatch.encode(self._keys[local])
        fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        key = (local, dispatch_id)
        self._acks[key] = fut
        timeout_s = self._specs[local].timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await client.publish(f"{self._roots[local]}/dispatch", payload, qos=1)
                accepted, reason = await fut
        except TimeoutError:
            raise DeviceTimeout(f"no ack within {timeout_s:g} s") from None
        except aiomqtt.MqttError as exc:
            raise DriverError(f"publish failed: {exc}") from None
        finally:
            del self._acks[key]
        if not accepted:
            if not self._reject_logged[local]:
                self._reject_logged[local] = True
                log.warning("zone %s: dispatch rejected: %s", self._name(local), reason)
            raise ProtocolError(f"dispatch rejected: {reason}")
        self._reject_logged[local] = False

    # --- dynamics ---

    def _learn(self, local: int, tel: Telemetry) -> None:
        """Take the zone's capability as the row's bounds and ramp rates, past hysteresis."""
        dyn = derive_dynamics(tel, float(self._lo[local]), float(self._hi[local]))
        if dyn is None:
            return
        have = self.port.limits(local)
        old = (have.p_min_w, have.p_max_w, have.ramp_up_w_s, have.ramp_down_w_s)
        bound_tol = max(BOUND_HYSTERESIS * float(self._hi[local] - self._lo[local]), 1.0)
        new = list(old)
        for i, value in enumerate((dyn.p_min_w, dyn.p_max_w)):
            if abs(value - old[i]) > bound_tol:
                new[i] = value
        for i, rate in ((2, dyn.ramp_up_w_s), (3, dyn.ramp_down_w_s)):
            if rate is not None and rate > 0 and abs(rate / old[i] - 1.0) > RATE_HYSTERESIS:
                new[i] = rate
        new[0] = min(new[0], new[1])
        if new == list(old):
            return
        self.port.learned_limits(local, Limits(*new))
        log.info(
            "zone %s: capability %.1f-%.1f kW, ramps +%.1f/-%.1f kW/s",
            self._name(local),
            new[0] / 1e3,
            new[1] / 1e3,
            new[2] / 1e3,
            new[3] / 1e3,
        )


@register("zone")
def _zone(port: DevicePort, ctx: DriverContext) -> ZoneDriver:
    mqtt = ctx.settings.get("mqtt")
    if not isinstance(mqtt, MqttConfig):
        raise ConfigError("zone devices need the daemon's MQTT settings")
    return ZoneDriver(port, ctx.on_command, mqtt=mqtt)
