"""The MQTT link against a real mosquitto with TLS, a password file and an ACL.

Two sites share one broker: `rampd-a` may only read `rampd/a/{dispatch,heartbeat}` and write
`rampd/a/{status,ack,telemetry}`; `rampd-b` the same under `rampd/b`; `grid` (the dispatcher
and our observer) may do anything under `rampd/`. Certificates come from a CA made per test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from controller.app import Daemon
from controller.config import MqttConfig, TlsConfig, load_config
from controller.mqtt_link import MqttLink
from controller.tools.broker import find_mosquitto, free_port
from tests.e2e.harness import dispatch
from tests.helpers import CertAuthority, Mosquitto, cancel_and_wait, until
from tests.integration.test_mqtt_link import Recorder, running

USERS = {"rampd-a": "pw-a", "rampd-b": "pw-b", "grid": "pw-grid"}
ACL = """\
user rampd-a
topic read rampd/a/dispatch
topic read rampd/a/heartbeat
topic write rampd/a/status
topic write rampd/a/ack
topic write rampd/a/telemetry

user rampd-b
topic read rampd/b/dispatch
topic read rampd/b/heartbeat
topic write rampd/b/status
topic write rampd/b/ack
topic write rampd/b/telemetry

user grid
topic readwrite rampd/#
"""


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """mosquitto's password file, made by mosquitto_passwd when installed; else written in
    its documented format ($7$: PBKDF2-SHA512, 101 iterations, base64 salt and hash)."""
    tool = shutil.which("mosquitto_passwd")
    path.write_text("")
    for user, password in users.items():
        if tool is not None:
            subprocess.run([tool, "-b", str(path), user, password], check=True, timeout=10)
            continue
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
        b64 = base64.b64encode
        with path.open("a") as fh:
            fh.write(f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n")


@dataclass
class SecureSite:
    """A TLS broker with passwords and the ACL above, and the files a client needs."""

    broker: Mosquitto
    ca: CertAuthority
    workdir: Path
    passwords: dict[str, Path] = field(default_factory=dict)

    def password_file(self, user: str, password: str | None = None) -> Path:
        """A daemon-side password file holding `password` (default: the right one)."""
        path = self.workdir / f"{user}.secret"
        path.write_text((USERS[user] if password is None else password) + "\n")
        return path

    def mqtt(self, user: str, *, password: str | None = None, **kw: Any) -> MqttConfig:
        tls = kw.pop("tls", TlsConfig(ca_file=self.ca.ca_file))
        return MqttConfig(
            host=self.broker.host,
            port=self.broker.port,
            username=user,
            password_file=self.password_file(user, password),
            tls=tls,
            keepalive_s=5,
            reconnect_max_s=1.0,
            **kw,
        )

    def restart(self, *, require_certificate: bool = False) -> None:
        self.broker.stop()
        self.broker.listener_conf = listener_conf(self.workdir, require_certificate)
        self.broker.start()


def listener_conf(workdir: Path, require_certificate: bool) -> list[str]:
    return [
        f"cafile {workdir / 'site-ca.pem'}",
        f"certfile {workdir / 'site-broker.pem'}",
        f"keyfile {workdir / 'site-broker-key.pem'}",
        f"require_certificate {'true' if require_certificate else 'false'}",
        "allow_anonymous false",
        f"password_file {workdir / 'passwd'}",
        f"acl_file {workdir / 'acl'}",
        "user root",  # as root it would drop to its own user, who cannot read tmp_path
    ]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SecureSite]:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail("mosquitto not installed (apt-get install mosquitto)", pytrace=False)
    host = f"127.90.{random.randint(1, 250)}.1"
    ca = CertAuthority(tmp_path, "site")
    ca.issue("broker", ips=[host])
    write_password_file(tmp_path / "passwd", USERS)
    (tmp_path / "acl").write_text(ACL)
    broker = Mosquitto(
        exe,
        tmp_path / "mosquitto",
        free_port(host),
        host=host,
        listener_conf=listener_conf(tmp_path, require_certificate=False),
    )
    broker.workdir.mkdir()
    broker.start()
    try:
        yield SecureSite(broker, ca, tmp_path)
    finally:
        broker.stop()


class Observer:
    """A second client (`grid` unless told otherwise) that records what arrives on `pattern`."""

    def __init__(self, site: SecureSite, pattern: str = "rampd/#", user: str = "grid") -> None:
        self.client = aiomqtt.Client(
            site.broker.host,
            site.broker.port,
            username=user,
            password=USERS[user],
            tls_params=aiomqtt.TLSParameters(ca_certs=str(site.ca.ca_file)),
            timeout=5,
        )
        self.pattern = pattern
        self.got: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        await self.client.__aenter__()
        await self.client.subscribe(self.pattern, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            self.got.append((m.topic.value, m.payload))

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p in self.got if t == topic]

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)


def link_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rampd.dispatch" and r.levelno >= level]


# --- (1) the right CA and credentials: the daemon connects; dispatch, ack, status work ---


async def test_daemon_connects_over_tls_with_a_password_and_acks_dispatches(
    site: SecureSite,
) -> None:
    host = site.broker.host
    net = host.rsplit(".", 1)[0]
    port = free_port(host)  # nothing listens here: the devices and meter are not under test
    config = site.workdir / "site.toml"
    config.write_text(
        'site_id = "a"\n[site]\nmax_kw = 100\n'
        f'[meter]\nhost = "{net}.250"\nport = {port}\n'
        f'[mqtt]\nhost = "{host}"\nport = {site.broker.port}\nusername = "rampd-a"\n'
        f'password_file = "{site.password_file("rampd-a")}"\nreconnect_max_s = 1.0\n'
        f'[mqtt.tls]\nca_file = "{site.ca.ca_file}"\n'
        f'[metrics]\nlisten = "{host}:{free_port(host)}"\n'
        '[[devices]]\nname = "row"\ntemplate = "modbus-load"\n'
        f'address = "{net}.10"\noverrides = {{ port = {port}, p_max_kw = 100 }}\n'
    )
    daemon = Daemon(load_config(config))
    task = asyncio.create_task(daemon.run())
    try:
        async with Observer(site, "rampd/a/#") as grid:
            await until(lambda: daemon.link.connected, 10.0, what="daemon connected")
            await until(lambda: grid.on("rampd/a/status"), 5.0, what="status")
            assert json.loads(grid.on("rampd/a/status")[-1])["state"] == "online"
            body = dispatch(1, id="tls-1", target_kw=50.0)
            await grid.publish("rampd/a/dispatch", json.dumps(body).encode())
            acks = await until(lambda: grid.on("rampd/a/ack"), 5.0, what="ack")
            ack = json.loads(acks[0])
            assert (ack["id"], ack["seq"], ack["accepted"]) == ("tls-1", 1, True), ack
            assert daemon.tracker.last_seq == 1
            await until(lambda: grid.on("rampd/a/telemetry"), 5.0, what="telemetry")
    finally:
        async with asyncio.timeout(15.0):
            await cancel_and_wait(task)


# --- (2) a wrong password: one clear line, capped jittered retries, then connects ---


async def test_wrong_password_is_refused_clearly_retried_with_backoff_then_connects(
    site: SecureSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rampd.dispatch")
    cfg = site.mqtt("rampd-a", password="stale-secret")
    link = MqttLink(cfg, "rampd/a", Recorder().on_dispatch, Recorder().on_heartbeat)
    async with running(link) as task:
        await until(lambda: link.attempts >= 5, 15.0, what="several refused attempts")
        assert not link.connected and not task.done()
        # The refusal's reason reaches the operator only through the log: one WARNING (not
        # one per attempt), naming the refused user; the attempts after it go to DEBUG.
        warnings = link_records(caplog, logging.WARNING)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # not one per attempt
        assert "'rampd-a'" in warnings[0].getMessage(), warnings[0].getMessage()
        assert not any(r.exc_info for r in caplog.records), "tracebacks logged"
        # The backoff is seen only in the delay each failed attempt's line carries (its last
        # argument): the first attempt's WARNING, then each later one's DEBUG line.
        delays = [
            float(r.args[-1])  # type: ignore[index, arg-type]
            for r in link_records(caplog, logging.DEBUG)
            if r.levelno in (logging.DEBUG, logging.WARNING)
        ]
        assert len(delays) >= 4 and max(delays) <= cfg.reconnect_max_s, delays
        assert delays[0] < delays[2], delays  # exponential at first ...
        assert len({round(d, 6) for d in delays}) == len(delays), delays  # ... and jittered
        # The operator fixes the broker's side: it now knows this secret.
        write_password_file(site.workdir / "passwd", {**USERS, "rampd-a": "stale-secret"})
        await asyncio.to_thread(site.restart)
        await until(lambda: link.connected, 15.0, what="connected with the accepted secret")
        assert link.reconnects == 0  # its first session, after the refused attempts


# --- (3) a broker whose certificate our CA did not sign ---


@pytest.mark.parametrize("wrong", ["another CA", "another host"])
async def test_a_broker_certificate_we_cannot_trust_is_refused(
    site: SecureSite, caplog: pytest.LogCaptureFixture, wrong: str
) -> None:
    ca_file = site.ca.ca_file
    if wrong == "another CA":
        ca_file = CertAuthority(site.workdir, "other").ca_file
        expected = "certificate verify failed: self-signed certificate in certificate chain"
    else:  # our CA signed it, but for an address that is not the broker's
        site.ca.issue("broker", ips=["127.90.0.254"])  # replaces the broker's files
        await asyncio.to_thread(site.restart)
        expected = "certificate verify failed: IP address mismatch"
    rec = Recorder()
    cfg = site.mqtt("rampd-a", tls=TlsConfig(ca_file=ca_file))
    link = MqttLink(cfg, "rampd/a", rec.on_dispatch, rec.on_heartbeat)
    async with running(link) as task:
        await until(lambda: link.attempts >= 3, 15.0, what="several refused attempts")
        assert not link.connected and not task.done()
        assert link.reconnects == 0 and link.published == 0
    # Why is said once, in a WARNING carrying OpenSSL's reason (the operator's only clue).
    warnings = [r.getMessage() for r in link_records(caplog, logging.WARNING)]
    assert len(warnings) == 1 and expected in warnings[0], warnings
    # The broker never got as far as an MQTT session (its own log: no other witness).
    assert site.broker.log_tail().count("New client connected") == 0


# --- (4) the broker asks for a client certificate ---


async def test_client_certificate_when_the_broker_requires_one(
    site: SecureSite, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(site.restart, require_certificate=True)
    cert, key = site.ca.issue("rampd-a", client=True)
    with_cert = site.mqtt(
        "rampd-a", tls=TlsConfig(ca_file=site.ca.ca_file, cert_file=cert, key_file=key)
    )
    without = site.mqtt("rampd-a")
    rec = Recorder()
    good = MqttLink(with_cert, "rampd/a", rec.on_dispatch, rec.on_heartbeat)
    # Over TLS 1.3 the broker refuses a missing certificate after the handshake; paho never
    # sees the alert, so this attempt ends on the CONNACK timeout: keep it short.
    bare = MqttLink(without, "rampd/a", rec.on_dispatch, rec.on_heartbeat, timeout_s=1.0)
    async with running(good), running(bare):
        await until(lambda: good.connected, 10.0, what="connected with a client certificate")
        await until(lambda: bare.attempts >= 2, 10.0, what="certificate-less attempts")
        assert not bare.connected and bare.reconnects == 0 and bare.published == 0
        assert good.reconnects == 0
    # The refused link says so once, not once per attempt (the good one warns nothing).
    refused = [r.getMessage() for r in link_records(caplog, logging.WARNING)]
    assert len(refused) == 1, refused


# --- (5) the ACL: nobody reaches outside their own site ---


async def test_another_sites_client_cannot_inject_a_dispatch(site: SecureSite) -> None:
    rec = Recorder()
    link = MqttLink(site.mqtt("rampd-a"), "rampd/a", rec.on_dispatch, rec.on_heartbeat)
    async with running(link), Observer(site, "rampd/b/dispatch", user="rampd-b") as site_b:
        await until(lambda: link.connected, 10.0, what="site a connected")
        await site_b.publish("rampd/a/dispatch", b"forged by site b")
        async with Observer(site) as grid:  # the real dispatcher, published after the forgery
            await grid.publish("rampd/a/dispatch", b"from the grid")
            await until(lambda: rec.dispatches, 5.0, what="the grid's dispatch")
        assert rec.dispatches == [b"from the grid"]


async def test_daemon_cannot_subscribe_or_publish_outside_its_acl(site: SecureSite) -> None:
    # Site a's credentials, configured (by mistake or malice) with site b's topics. mosquitto
    # 2.0 grants the subscription and enforces `read` on delivery; other brokers refuse it in
    # the SUBACK (see the next test).
    rec = Recorder()
    link = MqttLink(site.mqtt("rampd-a"), "rampd/b", rec.on_dispatch, rec.on_heartbeat)
    async with Observer(site) as grid, running(link):
        await until(lambda: link.connected, 10.0, what="connected")
        await grid.publish("rampd/b/dispatch", b"for site b only")
        link.publish("ack", b"forged ack")
        await until(lambda: link.queued == 0 and link.published >= 1, 5.0, what="sent")
        # A marker through the same broker: once the observer has it, anything published
        # before it would have arrived too.
        await grid.publish("rampd/b/marker", b"end")
        await until(lambda: grid.on("rampd/b/marker"), 5.0, what="marker")
        assert rec.dispatches == []
        assert grid.on("rampd/b/ack") == [] and grid.on("rampd/b/status") == []


def test_a_subscription_refused_in_the_suback_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused, granted = ReasonCode(PacketTypes.SUBACK, identifier=0x87), 1
    MqttLink._check_granted(["rampd/b/dispatch", "rampd/b/heartbeat"], [refused, granted])
    MqttLink._check_granted(["rampd/a/dispatch"], [ReasonCode(PacketTypes.SUBACK, identifier=1)])
    # The link's only way to say it (the broker's SUBACK is not retried): one ERROR of the
    # link's logger, naming the refused topic and no granted one.
    errors = [r.getMessage() for r in link_records(caplog, logging.ERROR)]
    assert len(errors) == 1 and "rampd/b/dispatch" in errors[0], errors
    assert "heartbeat" not in errors[0] and "rampd/a/dispatch" not in errors[0]
