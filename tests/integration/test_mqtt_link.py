"""MqttLink against a real mosquitto, with a second aiomqtt client playing the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.config import ConfigError, MqttConfig
from controller.mqtt_link import MqttLink
from tests.helpers import Mosquitto, log_records, until

ONE_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ROOT = "rampd/test"
REPO = Path(__file__).resolve().parents[2]


def cfg_for(broker: Mosquitto, **kw: Any) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, keepalive_s=5, reconnect_max_s=1.0, **kw)


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.dispatches: list[bytes] = []
        self.heartbeats: list[bytes] = []
        self.fail_first = fail_first

    def on_dispatch(self, payload: bytes) -> None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("handler bug")
        self.dispatches.append(payload)

    def on_heartbeat(self, payload: bytes) -> None:
        self.heartbeats.append(payload)


def _without_at(payload: bytes) -> dict[str, Any]:
    """A status as JSON, its time checked for the one format and then left out: the tests
    compare what it says."""
    parsed: dict[str, Any] = json.loads(payload)
    assert ONE_FORMAT.fullmatch(parsed.pop("at")), payload
    return parsed


class Dispatcher:
    """The grid side: subscribes to everything under ROOT and records what arrives."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = aiomqtt.Client(broker.host, broker.port, timeout=5)
        self.got: list[tuple[str, bytes, bool]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Dispatcher:
        await self.client.__aenter__()
        await self.client.subscribe(f"{ROOT}/#", qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            self.got.append((m.topic.value, m.payload, m.retain))

    def payloads(self, suffix: str) -> list[bytes]:
        return [p for t, p, _ in self.got if t == f"{ROOT}/{suffix}"]

    def statuses(self) -> list[dict[str, Any]]:
        return [_without_at(p) for p in self.payloads("status")]

    def retained_status(self) -> dict[str, Any] | None:
        for t, p, retained in self.got:
            if t == f"{ROOT}/status" and retained:
                return _without_at(p)
        return None

    async def publish(self, suffix: str, payload: bytes) -> None:
        await self.client.publish(f"{ROOT}/{suffix}", payload, qos=1)


async def retained_status(broker: Mosquitto) -> dict[str, Any]:
    """What a newcomer sees: the retained status, read by a fresh client."""
    async with Dispatcher(broker) as d:
        return await until(d.retained_status, 5.0, what="retained status")


@contextlib.asynccontextmanager
async def running(link: MqttLink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10.0)


def make_link(broker: Mosquitto, rec: Recorder, **kw: Any) -> MqttLink:
    return MqttLink(cfg_for(broker), ROOT, rec.on_dispatch, rec.on_heartbeat, **kw)


def has(items: Callable[[], list[Any]], n: int = 1) -> Callable[[], bool]:
    return lambda: len(items()) >= n


# --- messages in and out -------------------------------------------------------------------


async def test_dispatch_and_heartbeat_reach_callbacks_and_publishes_reach_dispatcher(
    mosquitto: Mosquitto,
) -> None:
    rec = Recorder()
    link = make_link(mosquitto, rec)
    async with Dispatcher(mosquitto) as grid, running(link):
        await until(lambda: link.connected, 10.0, what="link connected")
        await grid.publish("dispatch", b'{"id": "a", "seq": 1}')
        await grid.publish("heartbeat", b"{}")
        await until(has(lambda: rec.dispatches), what="dispatch callback")
        await until(has(lambda: rec.heartbeats), what="heartbeat callback")
        assert rec.dispatches == [b'{"id": "a", "seq": 1}'] and rec.heartbeats == [b"{}"]

        link.publish("ack", b'{"id": "a"}')
        link.publish("telemetry", b'{"measured_kw": 1}', qos=0)
        await until(has(lambda: grid.payloads("ack")), what="ack at dispatcher")
        await until(has(lambda: grid.payloads("telemetry")), what="telemetry at dispatcher")
        assert grid.payloads("ack") == [b'{"id": "a"}']
        assert grid.payloads("telemetry") == [b'{"measured_kw": 1}']
        assert link.dropped == 0 and link.published >= 2


async def test_callback_exception_is_logged_and_link_carries_on(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(fail_first=1)
    link = make_link(mosquitto, rec)
    async with Dispatcher(mosquitto) as grid, running(link) as task:
        await until(lambda: link.connected, 10.0, what="link connected")
        await grid.publish("dispatch", b"first")
        await grid.publish("dispatch", b"second")
        await until(has(lambda: rec.dispatches), what="second dispatch")
        assert rec.dispatches == [b"second"]
        assert not task.done() and link.connected and link.reconnects == 0
    # A bug in a handler is visible: one ERROR of the link's logger, with its traceback.
    [error] = log_records(caplog.records, "rampd.dispatch", logging.ERROR)
    assert error.exc_info is not None and error.exc_info[0] is RuntimeError


# --- status and will -----------------------------------------------------------------------


async def test_status_retained_online_follows_mode_and_goes_offline_on_clean_stop(
    mosquitto: Mosquitto,
) -> None:
    link = make_link(mosquitto, Recorder())
    link.set_status("normal", "starting up")
    async with running(link):
        await until(lambda: link.connected, 10.0, what="link connected")
        assert await retained_status(mosquitto) == {
            "state": "online",
            "mode": "normal",
            "detail": "starting up",
        }
        async with Dispatcher(mosquitto) as grid:
            await until(has(grid.statuses), what="retained status")
            link.set_status("failsafe", "dispatcher silent")
            await until(has(grid.statuses, 2), what="status update")
            assert grid.statuses()[-1] == {
                "state": "online",
                "mode": "failsafe",
                "detail": "dispatcher silent",
            }
        # The update is retained too.
        assert (await retained_status(mosquitto))["mode"] == "failsafe"
    # Cancelled (the SIGTERM path): offline published before disconnecting.
    assert not link.connected
    assert await retained_status(mosquitto) == {
        "state": "offline",
        "mode": "failsafe",
        "detail": "stopped",
    }


CHILD = """
import asyncio, sys
from controller.config import MqttConfig
from controller.mqtt_link import MqttLink

async def main() -> None:
    cfg = MqttConfig(host=sys.argv[1], port=int(sys.argv[2]), keepalive_s=5)
    link = MqttLink(cfg, sys.argv[3], lambda p: None, lambda p: None)
    link.set_status("normal", "child")
    await link.run()

asyncio.run(main())
"""


async def test_will_marks_offline_when_the_link_process_dies(mosquitto: Mosquitto) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        mosquitto.host,
        str(mosquitto.port),
        ROOT,
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with Dispatcher(mosquitto) as grid:
            await until(has(grid.statuses), 20.0, what="child online")
            assert grid.statuses()[0] == {"state": "online", "mode": "normal", "detail": "child"}
            proc.kill()  # SIGKILL: no goodbye, the socket just closes
            await asyncio.wait_for(proc.wait(), 10.0)
            await until(has(grid.statuses, 2), 10.0, what="will published")
            assert grid.statuses()[1]["state"] == "offline"
        status = await retained_status(mosquitto)
        assert status["state"] == "offline" and status["detail"] == "connection lost"
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10.0)


# --- reconnecting --------------------------------------------------------------------------


async def test_reconnects_after_broker_restart(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rampd.dispatch")
    rec = Recorder()
    link = make_link(mosquitto, rec)
    link.set_status("normal")
    async with running(link) as task:
        await until(lambda: link.connected, 10.0, what="link connected")
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: not link.connected, 10.0, what="link noticed the loss")
        link.publish("telemetry", b"while down", qos=0)  # queued, not lost
        # Retrying while the broker is down: attempts 2 and 3 have failed once the 4th starts.
        await until(lambda: link.attempts >= 4, 10.0, what="failed reconnects")
        # Said once per state change, not per attempt: one WARNING for the loss, one for
        # the first refused reconnect (counted by logger and level, whatever the wording).
        warnings = log_records(caplog.records, "rampd.dispatch", logging.WARNING)
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: link.connected and link.reconnects == 1, 15.0, what="reconnected")
        assert not task.done()
        # The broker kept nothing (no persistence): the link restored its retained status
        # and its subscriptions by itself.
        assert (await retained_status(mosquitto))["state"] == "online"
        async with Dispatcher(mosquitto) as grid:
            await grid.publish("dispatch", b"after restart")
            await until(has(lambda: rec.dispatches), what="dispatch after restart")
        await until(lambda: link.queued == 0, what="queue flushed")
        assert link.reconnects == 1 and link.dropped == 0
    assert len(log_records(caplog.records, "rampd.dispatch", logging.WARNING)) == 2


async def test_keeps_retrying_quietly_until_the_broker_appears(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rampd.dispatch")
    await asyncio.to_thread(mosquitto.stop)
    link = make_link(mosquitto, Recorder())
    async with running(link) as task:
        await until(lambda: link.attempts >= 4, 15.0, what="several attempts")
        assert not link.connected and not task.done()
        warnings = [
            r for r in caplog.records if r.name == "rampd.dispatch" and r.levelno >= logging.WARNING
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line, not per try
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: link.connected, 15.0, what="connected once the broker is up")
        assert link.reconnects == 0  # first successful connection


# --- the out-queue -------------------------------------------------------------------------


async def test_full_queue_drops_oldest_telemetry_never_acks_and_survives_until_connect(
    mosquitto: Mosquitto,
) -> None:
    link = make_link(mosquitto, Recorder(), queue_max=10)
    for i in range(5):
        link.publish("ack", f"ack{i}".encode())
    for i in range(20):
        link.publish("telemetry", f"tel{i}".encode(), qos=0)
    # Acks do not count against queue_max: ten telemetry messages fit beside them.
    assert link.queued == 15 and link.dropped == 10
    for i in range(5, 20):  # a burst of acks pushes no telemetry out
        link.publish("ack", f"ack{i}".encode())
    assert link.queued == 30 and link.dropped == 10
    async with Dispatcher(mosquitto) as grid, running(link):
        await until(has(lambda: grid.payloads("ack"), 20), 10.0, what="every ack")
        await until(has(lambda: grid.payloads("telemetry"), 10), 10.0, what="the telemetry")
        assert grid.payloads("ack") == [f"ack{i}".encode() for i in range(20)]
        assert grid.payloads("telemetry") == [f"tel{i}".encode() for i in range(10, 20)]
    assert link.queued == 0


def test_acks_have_a_cap_of_their_own() -> None:
    link = MqttLink(MqttConfig(), ROOT, lambda p: None, lambda p: None, queue_max=2)
    for i in range(25):
        link.publish("ack", f"ack{i}".encode())
    assert link.queued == 20 and link.dropped == 5  # 10 x queue_max
    link.publish("telemetry", b"t", qos=0)
    assert link.queued == 21 and link.dropped == 5


def test_password_file_is_read_and_a_missing_one_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = MqttConfig(username="rampd", password_file=secret)
    link = MqttLink(cfg, ROOT, lambda p: None, lambda p: None)
    assert link._password == "s3cret"
    with pytest.raises(ConfigError, match="password_file"):
        MqttLink(
            MqttConfig(password_file=tmp_path / "missing"), ROOT, lambda p: None, lambda p: None
        )


def test_publish_rejects_bad_suffix_and_qos_at_the_call_site() -> None:
    link = MqttLink(MqttConfig(), ROOT, lambda p: None, lambda p: None)
    for suffix in ("", "a/#", "+", "x\0"):
        with pytest.raises(ValueError, match="suffix"):
            link.publish(suffix, b"x")
    with pytest.raises(ValueError, match="qos"):
        link.publish("ack", b"x", qos=3)
    assert link.queued == 0
