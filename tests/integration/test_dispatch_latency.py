"""A new dispatch does not wait for the next scheduled control cycle: the cycle runs at once.

The site runs a deliberately slow 5 s cycle, so a dispatch that waited for its turn would
take seconds to reach the devices; over the real broker, the setpoints change within a
fraction of a second of the ack.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

from tests.helpers import Mosquitto, daemon_on_sim, until

SITE = """
site_id = "poke"
cycle_s = 5.0
noncontrollable_kw = 50.0
[site]
max_kw = 1000
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:0"
[meter]
host = "127.69.12.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 2
address = "127.69.11.1"
overrides = { port = 1502 }
"""


async def test_a_dispatch_runs_the_control_cycle_at_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    ticks: list[tuple[float, float]] = []
    async with daemon_on_sim(SITE, tmp_path, mosquitto) as daemon:
        daemon.cycle.on_tick(lambda out: ticks.append((time.monotonic(), out.target_w)))
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.subscribe("rampd/poke/ack", qos=1)
            await until(lambda: daemon.link.connected and len(ticks) >= 2, 20)
            body = {
                "id": "poke-1",
                "seq": 1,
                "issued_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "mode": "setpoint",
                "target_kw": 300.0,
            }
            await client.publish("rampd/poke/dispatch", json.dumps(body), qos=1)
            async with asyncio.timeout(5):
                async for msg in client.messages:
                    acked_at = time.monotonic()
                    assert json.loads(bytes(msg.payload))["accepted"] is True  # type: ignore[arg-type]
                    break
            tick = await until(
                lambda: next((t for t, target in ticks if target == 300e3), None), 10
            )
            # A scheduled cycle would come up to 5 s later (on average 2.5 s).
            assert tick - acked_at < 0.5, tick - acked_at
            # The schedule restarts from the poked cycle: the next one a period later.
            later = await until(lambda: [t for t, _ in ticks if t > tick], 10)
            assert later[0] - tick >= 4.0
