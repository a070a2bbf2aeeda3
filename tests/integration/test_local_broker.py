"""The demo's local brokers: mosquitto and the embedded fallback both carry real MQTT."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from controller.tools.broker import LocalBroker


@pytest.mark.parametrize("prefer", ["mosquitto", "amqtt"])
async def test_local_broker_round_trip(prefer: str) -> None:
    async with LocalBroker(prefer=prefer) as broker:
        assert (prefer == "amqtt") == broker.kind.startswith("amqtt")
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
            await client.subscribe("rampd/x/ack", qos=1)
            await client.publish("rampd/x/ack", b"hello", qos=1)
            async with asyncio.timeout(5):
                async for msg in client.messages:
                    assert msg.payload == b"hello"
                    break
