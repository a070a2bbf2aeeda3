"""The zone driver against a real mosquitto, with an aiomqtt client playing the zone: it
checks each dispatch with the daemon's own parser (signature included), acks it, and
publishes status and telemetry, well formed or not."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np
import pytest

from controller.config import DeviceAccess, MqttConfig, SiteLimits
from controller.wire import Ack, Dispatch, DispatchRejected, Status, rfc3339
from controller.zone.client import ZoneDriver
from drivers.core.command import Intent
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from tests.helpers import (
    CommandLog,
    Mosquitto,
    cancel_and_wait,
    cmd,
    device_spec,
    log_records,
    until,
)

KEY = b"zone-key-for-tests-0123456789"


@dataclass
class FakeZone:
    """A child rampd as its parent sees it, at rampd/<name>/."""

    client: aiomqtt.Client
    root: str
    accept: bool = True
    targets_kw: list[float] = field(default_factory=list)
    heartbeats: int = 0
    last_seq: int | None = None

    async def serve(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            if str(msg.topic).endswith("/heartbeat"):
                self.heartbeats += 1
                continue
            try:
                d = Dispatch.decode(
                    payload,
                    now_unix=time.time(),
                    last_seq=self.last_seq,
                    limits=SiteLimits(max_kw=1000.0),
                    hmac_key=KEY,
                )
            except DispatchRejected as exc:
                ack = Ack(exc.id, exc.seq, False, exc.reason, time.time()).encode()
            else:
                if self.accept:
                    self.last_seq = d.seq
                    self.targets_kw.append(d.target_w / 1e3)
                reason = "" if self.accept else "target_kw above site maximum"
                ack = Ack(d.id, d.seq, self.accept, reason, time.time()).encode()
            await self.client.publish(f"{self.root}/ack", ack, qos=1)

    async def telemetry(self, measured_kw: float, **over: Any) -> None:
        body = {
            "at": rfc3339(time.time()),
            "mode": "normal",
            "devices": {"on": 1},
            "measured_kw": measured_kw,
            "target_kw": measured_kw,
            "min_kw": 100.0,
            "max_kw": 800.0,
            "capability": {"up_kw": {"1s": 120.0, "5s": 300.0}, "down_kw": {"1s": 240.0}},
            "physical_min_s": 0.0,
        }
        body.update(over)
        await self.client.publish(f"{self.root}/telemetry", json.dumps(body), qos=1)

    async def status(self, online: bool) -> None:
        payload = Status("online" if online else "offline", "normal", "", time.time()).encode()
        await self.client.publish(f"{self.root}/status", payload, qos=1, retain=True)


@dataclass
class Rig:
    zone: FakeZone
    image: ProcessImage
    driver: ZoneDriver
    commands: CommandLog


@asynccontextmanager
async def rig(mosquitto: Mosquitto, tmp_path: Any) -> AsyncIterator[Rig]:
    key_file = tmp_path / "zone.key"
    key_file.write_bytes(KEY + b"\n")
    spec = device_spec(
        name="zf",
        kind="rampd_zone",
        protocol="zone",
        host="",
        p_min_w=0.0,
        p_max_w=1e6,
        ramp_up_w_s=10e3,
        ramp_down_w_s=10e3,
        access=DeviceAccess(hmac_key_file=key_file),
    )
    fleet = ProcessImage([spec])
    commands = CommandLog()
    cfg = MqttConfig(host=mosquitto.host, port=mosquitto.port, keepalive_s=5)
    driver = ZoneDriver(fleet.port("zone"), commands, mqtt=cfg)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe([("rampd/zf/dispatch", 1), ("rampd/zf/heartbeat", 0)])
        zone = FakeZone(client, "rampd/zf")
        tasks = [asyncio.create_task(zone.serve()), asyncio.create_task(driver.run())]
        try:
            await zone.status(True)
            await until(lambda: driver.connected, 5.0, what="driver subscribed")
            yield Rig(zone, fleet, driver, commands)
        finally:
            await cancel_and_wait(*tasks)


async def test_telemetry_in_dispatches_out_signed_and_acked(
    mosquitto: Mosquitto, tmp_path: Any
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        await r.zone.telemetry(412.5)
        await until(lambda: r.image.state[0] == DeviceState.ON, 5.0, what="zone on")
        assert r.image.measured_w[0] == 412.5e3
        # The capability became the row's bounds and ramp rates (up: 300 kW within 5 s).
        assert (r.image.p_min_w[0], r.image.p_max_w[0]) == (100e3, 800e3)
        assert r.image.ramp_up_w_s[0] == pytest.approx(60e3)
        r.driver.submit(cmd(np.array([0]), np.array([300e3])))
        await until(lambda: r.zone.targets_kw == [300.0], 5.0, what="signed dispatch accepted")
        await until(lambda: r.image.acked_w[0] == 300e3, 5.0, what="acked")
        r.driver.submit(cmd(np.array([0]), np.array([350e3])))
        await until(lambda: r.zone.targets_kw == [300.0, 350.0], 5.0, what="seq increases")
        # A SLEEP command asks the zone for its power asleep; its own planner does the rest.
        r.driver.submit(cmd(np.array([0]), np.array([20e3]), sleep=True))
        await until(lambda: r.zone.targets_kw[-1:] == [20.0], 5.0, what="sleep dispatched")
        await until(lambda: r.driver.port.acked(0) == (20e3, Intent.SLEEP), 5.0, what="acked")
        await until(lambda: r.zone.heartbeats >= 1, 3.0, what="heartbeat")
        assert all(ok for _, _, ok in r.commands)


async def test_rejections_and_offline_fault_the_zone_once(
    mosquitto: Mosquitto, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        caplog.set_level(logging.INFO, logger="rampd.zone")
        await r.zone.telemetry(400.0)
        await until(lambda: r.image.state[0] == DeviceState.ON, 5.0, what="zone on")
        # Garbage from the zone changes nothing and is said once.
        for bad in (b"not json", b'{"measured_kw": "lots"}'):
            await r.zone.client.publish("rampd/zf/telemetry", bad, qos=1)
        await until(lambda: r.driver.bad_messages == 2, 5.0, what="bad telemetry seen")
        assert r.image.measured_w[0] == 400e3
        r.zone.accept = False
        r.driver.submit(cmd(np.array([0]), np.array([900e3])))
        await until(lambda: r.image.state[0] == DeviceState.FAULT, 10.0, what="fault")
        assert r.driver.faulted == 1 and r.zone.targets_kw == []  # nothing was taken
        # The driver keeps retrying the rejected dispatch (each one counted) ...
        rejected = r.driver.command_errors
        await until(lambda: r.driver.command_errors > rejected, 10.0, what="retried")
        assert not any(ok for _, _, ok in r.commands)
        # ... and says so once per state change, not once per message or retry: one WARNING
        # each for the bad telemetry, the first rejection and the FAULT (counted by logger
        # and level, whatever their wording).
        warnings = log_records(caplog.records, "rampd.zone", logging.WARNING)
        assert len(warnings) == 3, [w.getMessage() for w in warnings]
        # Recovery is declared by telemetry; then the zone goes offline (its will).
        r.zone.accept = True
        await r.zone.telemetry(400.0)
        await until(lambda: r.image.state[0] == DeviceState.ON, 5.0, what="recovered")
        await r.zone.status(False)
        await until(lambda: r.image.state[0] == DeviceState.FAULT, 5.0, what="offline fault")
