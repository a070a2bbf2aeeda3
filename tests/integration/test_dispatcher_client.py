"""The one dispatcher client against a real mosquitto: what it publishes is what the daemon's
decoder accepts (signed when it has the key), and what it hears is decoded into the models."""

from __future__ import annotations

import time

import aiomqtt

from controller.config import SiteLimits
from controller.dispatcher import DispatcherClient
from controller.wire import Ack, Dispatch, Heartbeat, Status, Telemetry
from tests.helpers import Mosquitto, until

ROOT = "rampd/dc"
KEY = b"0123456789abcdef-shared-secret"
LIMITS = SiteLimits(min_kw=0.0, max_kw=1000.0, max_issued_age_s=30.0)


async def test_signed_dispatches_and_heartbeats_pass_the_daemons_checks(
    mosquitto: Mosquitto,
) -> None:
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as site:
        await site.subscribe([(f"{ROOT}/dispatch", 1), (f"{ROOT}/heartbeat", 1)])
        async with DispatcherClient(mosquitto.host, mosquitto.port, ROOT, key=KEY) as d:
            first = await d.send("setpoint", 250.5, ramp_s=3.0)
            second = await d.send("regulation", 500.0, band_kw=100.0, signal=0.5)
            await d.send("release")
            await d.heartbeat()
            async for msg in site.messages:
                assert isinstance(msg.payload, bytes)
                received.append((msg.topic.value.rsplit("/", 1)[-1], msg.payload))
                if len(received) == 4:
                    break
    dispatches = [p for kind, p in received if kind == "dispatch"]
    last_seq = None
    decoded: list[Dispatch] = []
    for payload in dispatches:
        got = Dispatch.decode(
            payload, now_unix=time.time(), last_seq=last_seq, limits=LIMITS, hmac_key=KEY
        )
        decoded.append(got)
        last_seq = got.seq
    assert decoded[:2] == [first.dispatch, second.dispatch]
    assert decoded[2].mode == "release" and decoded[2].target_w == 1e6
    assert first.dispatch.seq < second.dispatch.seq < decoded[2].seq
    beats = [Heartbeat.decode(p) for kind, p in received if kind == "heartbeat"]
    assert len(beats) == 1 and beats[0].at is not None


async def test_what_the_daemon_says_is_decoded_and_garbage_counted(mosquitto: Mosquitto) -> None:
    now = time.time()
    async with (
        aiomqtt.Client(mosquitto.host, mosquitto.port) as site,
        DispatcherClient(mosquitto.host, mosquitto.port, ROOT) as d,
    ):
        await site.publish(f"{ROOT}/ack", Ack("d-1", 1, True, "", now).encode(), qos=1)
        await site.publish(f"{ROOT}/status", Status("online", "normal", "", now).encode(), qos=1)
        await site.publish(f"{ROOT}/telemetry", b"not telemetry", qos=1)
        tel = Telemetry(at=now, mode="normal")
        await site.publish(f"{ROOT}/telemetry", tel.encode(), qos=1)
        assert (await d.ack_for("d-1")).accepted
        await until(lambda: d.telemetry and d.status, 5.0, what="telemetry and status")
    assert d.status[-1].online and d.telemetry[-1].mode == "normal" and d.bad == 1
