"""The MQTT notifier binding (OpenADR 3.1): the broker from `GET /notifiers`, topic names
from the VEN-scoped topic endpoints, one aiomqtt session at a time.

Retained messages are skipped: they may be older than what a REST read returns, and the
binding says a client recovers state by GET after (re)connecting, not from retained ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

_SCHEMES: Final = {
    "mqtt": (False, 1883),
    "tcp": (False, 1883),
    "mqtts": (True, 8883),
    "ssl": (True, 8883),
}
AUTH_METHODS: Final = ("ANONYMOUS", "OAUTH2_BEARER_TOKEN", "CERTIFICATE")


class NotifierError(Exception):
    """The VTN's notifier cannot be used as offered."""


@dataclass(frozen=True, slots=True)
class Broker:
    """Where and how to connect (the password, for a bearer token, is filled per connect)."""

    uri: str
    host: str
    port: int
    tls: bool
    method: str
    username: str | None = None
    certificate: tuple[str, str, str] | None = field(default=None, repr=False)
    """(CA, client certificate, client key) PEM text for CERTIFICATE."""


def broker_of(notifiers: object, client_id: str) -> Broker | None:
    """The MQTT broker a `notifiersResponse` offers; None when it offers no MQTT."""
    if not isinstance(notifiers, Mapping):
        raise NotifierError("/notifiers: not an object")
    binding = notifiers.get("MQTT")
    if binding is None:
        return None
    if not isinstance(binding, Mapping):
        raise NotifierError("/notifiers MQTT: not an object")
    if binding.get("serialization", "JSON") != "JSON":
        raise NotifierError(f"MQTT serialization {binding.get('serialization')!r} is not JSON")
    auth = binding.get("authentication") or {"method": "ANONYMOUS"}
    if not isinstance(auth, Mapping) or auth.get("method") not in AUTH_METHODS:
        raise NotifierError(f"MQTT authentication {auth!r} not supported")
    method = str(auth["method"])
    username: str | None = None
    cert: tuple[str, str, str] | None = None
    if method == "OAUTH2_BEARER_TOKEN":
        name = auth.get("username")
        if not isinstance(name, str):
            raise NotifierError("MQTT OAUTH2_BEARER_TOKEN without a username")
        username = client_id if name == "{clientID}" else name
    elif method == "CERTIFICATE":
        parts = tuple(auth.get(k) for k in ("caCert", "clientCert", "clientKey"))
        if not all(isinstance(p, str) and p for p in parts):
            raise NotifierError("MQTT CERTIFICATE without caCert, clientCert and clientKey")
        cert = (str(parts[0]), str(parts[1]), str(parts[2]))
    uris = binding.get("URIS")
    if not isinstance(uris, list):
        raise NotifierError("MQTT URIS: not a list")
    for uri in uris:
        if not isinstance(uri, str):
            continue
        parts_ = urlsplit(uri)
        scheme = _SCHEMES.get(parts_.scheme.lower())
        if scheme is None or not parts_.hostname:
            continue  # e.g. websockets: not spoken here; another URI may do
        tls, default_port = scheme
        try:
            port = parts_.port or default_port
        except ValueError:
            continue
        return Broker(uri, parts_.hostname, port, tls, method, username, cert)
    raise NotifierError(f"no MQTT URI rampd can use in {uris!r} (mqtt:// or mqtts://)")


def topic_names(obj: object, what: str) -> list[str]:
    """The topics of a `notifierTopicsResponse`: ALL when given, else each operation's."""
    topics = obj.get("topics") if isinstance(obj, Mapping) else None
    if not isinstance(topics, Mapping):
        raise NotifierError(f"{what}: no topics")
    if isinstance(topics.get("ALL"), str) and topics["ALL"]:
        return [topics["ALL"]]
    names = [topics[k] for k in ("CREATE", "UPDATE", "DELETE") if isinstance(topics.get(k), str)]
    if not names:
        raise NotifierError(f"{what}: no topic names")
    return names


def tls_context(broker: Broker, ca_file: Path | None) -> ssl.SSLContext | None:
    if not broker.tls and broker.certificate is None:
        return None
    ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if broker.certificate is not None:
        ca, cert, key = broker.certificate
        ctx.load_verify_locations(cadata=ca)
        # ssl loads a certificate chain from files only: a private folder, gone at once.
        with tempfile.TemporaryDirectory(prefix="rampd-openadr-") as d:
            cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            for path, text in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
            ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _code(rc: object) -> int:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else 0x80


async def session(
    broker: Broker,
    topics: Sequence[str],
    *,
    password: str | None,
    tls: ssl.SSLContext | None,
    timeout_s: float,
    on_connected: Callable[[], None],
    on_message: Callable[[bytes, str], Any],
) -> None:
    """Connect, subscribe, hand every live message over; raises MqttError when it ends."""
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=password,
        tls_context=tls,
        keepalive=30,
        timeout=timeout_s,
        clean_session=True,
        max_queued_incoming_messages=10_000,
    )
    try:
        async with asyncio.timeout(3 * timeout_s):
            await client.__aenter__()
    except TimeoutError:
        raise aiomqtt.MqttError("connect timed out") from None
    try:
        granted = await client.subscribe([(t, 1) for t in topics], timeout=timeout_s)
        refused = [t for t, g in zip(topics, granted, strict=False) if _code(g) >= 0x80]
        if refused:
            raise NotifierError(f"broker refused subscription to {', '.join(refused)}")
        on_connected()
        async for message in client.messages:
            if message.retain:
                continue
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            on_message(data, message.topic.value)
        raise aiomqtt.MqttError("session ended")
    finally:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await client.__aexit__(None, None, None)
