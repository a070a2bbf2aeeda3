"""MqttLink under a flood, against a real mosquitto: dispatches pass `admit_dispatch` as they
are read (a refused one never reaches `on_dispatch`), the rest are handed over in order, and
the event loop keeps its turns meanwhile. The flood is mosquitto's own client."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator

import pytest

from controller.config import MqttConfig
from controller.mqtt_link import MqttLink
from tests.helpers import Mosquitto, until

ROOT = "rampd/flood"
N = 5000


@contextlib.asynccontextmanager
async def running(link: MqttLink) -> AsyncIterator[None]:
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: link.connected, 10.0, what="link connected")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10.0)


async def publish_lines(broker: Mosquitto, topic: str, lines: list[bytes]) -> None:
    """Every line one QoS 1 message, as fast as mosquitto_pub sends them."""
    exe = shutil.which("mosquitto_pub")
    if exe is None:
        pytest.skip("mosquitto_pub not installed")
    proc = await asyncio.create_subprocess_exec(
        exe, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-M", "1000", "-l",
        "-t", topic, stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"".join(line + b"\n" for line in lines))
    await proc.stdin.drain()
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_dispatches_are_admitted_as_read_and_handed_over_in_order_while_the_loop_runs(
    mosquitto: Mosquitto,
) -> None:
    admitted: list[bytes] = []
    refused: list[bytes] = []
    handled: list[bytes] = []
    beats: list[bytes] = []

    def admit(payload: bytes) -> bool:
        if int(payload) % 10 == 0:
            admitted.append(payload)
            return True
        refused.append(payload)
        return False

    link = MqttLink(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, keepalive_s=5),
        ROOT,
        handled.append,
        beats.append,
        admit_dispatch=admit,
    )
    late: list[float] = []

    async def ticker() -> None:  # a stand-in for the control cycle: how late is it woken?
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.02)
            late.append(time.monotonic() - t - 0.02)

    async with running(link):
        tick = asyncio.create_task(ticker())
        try:
            await publish_lines(mosquitto, f"{ROOT}/dispatch", [b"%d" % i for i in range(N)])
            await publish_lines(mosquitto, f"{ROOT}/heartbeat", [b"beat"])
            await until(lambda: len(handled) == N // 10 and beats, 60.0, what="all handed over")
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)

    assert admitted + refused and len(admitted) + len(refused) == N
    assert handled == admitted == [b"%d" % i for i in range(0, N, 10)]  # in order, none twice
    assert beats == [b"beat"]  # other topics are not admitted: handed over as they come
    assert link.in_dropped == 0 and link.received == N + 1
    # Generous (a shared machine): the loop was never kept from a turn for long.
    assert late and max(late) < 0.5, max(late)


async def test_an_admit_that_raises_leaves_the_dispatch_to_on_dispatch(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[bytes] = []

    def admit(payload: bytes) -> bool:
        raise RuntimeError("admit bug")

    link = MqttLink(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, keepalive_s=5),
        ROOT,
        handled.append,
        lambda _p: None,
        admit_dispatch=admit,
    )
    async with running(link):
        await publish_lines(mosquitto, f"{ROOT}/dispatch", [b"one", b"two"])
        await until(lambda: len(handled) == 2, 10.0, what="both handed over")
    assert handled == [b"one", b"two"]
    assert "admit_dispatch failed" in caplog.text
