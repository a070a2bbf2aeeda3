"""A test ISV for DSX Flex, and dsx-flex.yaml's schemas as validators.

The ISV signs load targets with joserfc (ES256 or RS256), publishes them as structured-mode
CloudEvents, and validates every status and breach message the agent publishes against the
official schemas (`configs/standards/dsx-flex/dsx-flex.yaml`, $refs resolved within the
document; formats checked, uuid included): the envelope, and the verified payload when
`data` is a JWS. A message that does not validate is kept in `invalid`; tests assert it
stays empty.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiomqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from controller.northbound.dsx_flex import schema
from controller.wire.timestamps import rfc3339

# The official schemas, as the agent itself applies them at run time.
spec, validator, errors, EVENT_SCHEMAS = (
    schema.spec,
    schema.validator,
    schema.errors,
    schema.EVENT_SCHEMAS,
)


def check_event(
    event: Any, verify: ECKey | RSAKey | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(the plain `data`, schema errors) of an event as published. A JWS `data` is verified
    with `verify` (an error without it) and its payload validated as its Data schema."""
    if not isinstance(event, dict) or event.get("type") not in EVENT_SCHEMAS:
        return {}, [f"not an event of a known type: {str(event)[:200]}"]
    envelope, data_schema = EVENT_SCHEMAS[event["type"]]
    found = errors(envelope, event)
    data = event.get("data")
    if isinstance(data, str):
        if verify is None:
            return {}, [*found, "data is a JWS and no key to verify it"]
        try:
            data = json.loads(jws.deserialize_compact(data, verify).payload)
        except Exception as exc:
            return {}, [*found, f"data JWS does not verify: {exc}"]
        found += [f"data/{e}" for e in errors(data_schema, data)]
    return (data if isinstance(data, dict) else {}), found


# -- keys and load targets ------------------------------------------------------------------


@dataclass(frozen=True)
class IsvKey:
    """A signing key of the ISV and its public half written where the agent reads it."""

    kid: str
    alg: Literal["ES256", "RS256"]
    private: ECKey | RSAKey
    public_pem: Path

    @classmethod
    def create(cls, workdir: Path, kid: str, alg: Literal["ES256", "RS256"] = "ES256") -> IsvKey:
        raw: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        raw = (
            ec.generate_private_key(ec.SECP256R1())
            if alg == "ES256"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        pem = raw.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        workdir.mkdir(parents=True, exist_ok=True)
        public = workdir / f"{kid}.pub.pem"
        public.write_bytes(
            raw.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        private = ECKey.import_key(pem) if alg == "ES256" else RSAKey.import_key(pem)
        return cls(kid, alg, private, public)

    def sign(self, data: dict[str, Any]) -> str:
        payload = json.dumps(data, separators=(",", ":")).encode()
        return jws.serialize_compact({"alg": self.alg, "kid": self.kid}, payload, self.private)


def agent_signing_key(workdir: Path, kid: str = "agent-1") -> tuple[Path, ECKey]:
    """The agent's private key file (PEM) and its public key, to verify what it signs."""
    raw = ec.generate_private_key(ec.SECP256R1())
    path = workdir / f"{kid}.key.pem"
    path.write_bytes(
        raw.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub = raw.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, ECKey.import_key(pub)


def target(
    value: float | None,
    unit: str = "kilowatt",
    *,
    start: float | None = None,
    end: float | None = None,
    feeds: list[str] | None = None,
    best_effort: bool | None = None,
) -> dict[str, Any]:
    """One element of SetLoadTargetData.targets (`value` None: the null constraint)."""
    interval: dict[str, Any] = {}
    if start is not None:
        interval["start_time"] = rfc3339(start)
    if end is not None:
        interval["end_time"] = rfc3339(end)
    out: dict[str, Any] = {
        "interval": interval,
        "load_constraint": None if value is None else {"value": value, "unit": unit},
    }
    if feeds is not None:
        out["feed_tags"] = feeds
    if best_effort is not None:
        out["strategy"] = {"best_effort": best_effort}
    return out


def load_target_event(
    isv: str,
    targets: list[dict[str, Any]],
    key: IsvKey | None,
    *,
    correlationid: str | None = None,
    at: float | None = None,
    **override: Any,
) -> dict[str, Any]:
    """A grid.loadtarget.set.v1 event; `key` None: `data` as the plain object."""
    data = {"targets": targets}
    event: dict[str, Any] = {
        "specversion": "1.0.2",
        "id": str(uuid.uuid4()),
        "source": f"//grid/v1/isv/{isv}",
        "type": "grid.loadtarget.set.v1",
        "time": rfc3339(time.time() if at is None else at),
        "datacontenttype": "application/json",
        "subject": "loadtarget",
        "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        "correlationid": correlationid or str(uuid.uuid4()),
        "data": data if key is None else key.sign(data),
    }
    event.update(override)
    return event


def enforcement_event(infra: str, data: dict[str, Any], key: IsvKey) -> dict[str, Any]:
    return {
        "specversion": "1.0.2",
        "id": str(uuid.uuid4()),
        "source": f"//grid/v1/infra/{infra}",
        "type": "grid.powerbreach.enforcement.v1",
        "time": rfc3339(time.time()),
        "datacontenttype": "application/json",
        "subject": "powerbreach",
        "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        "data": key.sign(data),
    }


# -- the ISV on the broker --------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    event: dict[str, Any]
    data: dict[str, Any]
    at: float


@dataclass
class Isv:
    """Connected to the broker; `statuses` and `breaches` fill as the agent publishes."""

    client: aiomqtt.Client
    isv_id: str
    agent: str
    """`<role>/<agent_id>`."""
    verify: ECKey | RSAKey | None = None
    statuses: list[Received] = field(default_factory=list)
    breaches: list[Received] = field(default_factory=list)
    invalid: list[tuple[str, list[str], Any]] = field(default_factory=list)

    async def send(self, event: dict[str, Any], *, isv: str | None = None) -> None:
        topic = f"grid/v1/isv/{isv or self.isv_id}/loadtarget/set"
        await self.client.publish(topic, json.dumps(event).encode(), qos=1, timeout=5)

    async def send_raw(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await self.client.publish(topic, payload, qos=qos, timeout=5)

    async def _collect(self) -> None:
        async for m in self.client.messages:
            raw = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            topic = m.topic.value
            try:
                event = json.loads(raw)
            except ValueError:
                self.invalid.append((topic, ["not JSON"], raw))
                continue
            data, found = check_event(event, self.verify)
            if found:
                self.invalid.append((topic, found, event))
                continue
            item = Received(topic, event, data, time.time())
            (self.breaches if topic.endswith("/powerbreach") else self.statuses).append(item)

    async def status_where(
        self, pred: Callable[[Received], bool], timeout: float, what: str, *, after: int = 0
    ) -> Received:
        """The first status from index `after` on that satisfies `pred`, waiting for it."""
        return await self._where(self.statuses, pred, timeout, what, after)

    async def breach_where(
        self, pred: Callable[[Received], bool], timeout: float, what: str, *, after: int = 0
    ) -> Received:
        return await self._where(self.breaches, pred, timeout, what, after)

    async def _where(
        self,
        items: list[Received],
        pred: Callable[[Received], bool],
        timeout: float,
        what: str,
        after: int,
    ) -> Received:
        deadline = time.monotonic() + timeout
        while True:
            assert not self.invalid, self.invalid[:3]
            for r in items[after:]:
                if pred(r):
                    return r
            if time.monotonic() >= deadline:
                last = items[-1].data if items else None
                raise AssertionError(f"{what}: not within {timeout} s (last: {last})")
            await asyncio.sleep(0.05)


@asynccontextmanager
async def isv_on(
    host: str,
    port: int,
    isv_id: str,
    agent: str,
    *,
    verify: ECKey | RSAKey | None = None,
) -> AsyncIterator[Isv]:
    """The test ISV, subscribed to the agent's status and breach topics (and to the
    enforcement topics, which it only sends to)."""
    async with aiomqtt.Client(host, port, timeout=5) as client:
        await client.subscribe(f"grid/v1/{agent}/powerstate/status", qos=1, timeout=5)
        await client.subscribe(f"grid/v1/{agent}/powerbreach", qos=2, timeout=5)
        isv = Isv(client, isv_id, agent, verify)
        task = asyncio.create_task(isv._collect())
        try:
            yield isv
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def feed(r: Received, tag: str) -> dict[str, Any]:
    return dict(r.data["feeds"][tag])


def kw(p: dict[str, Any]) -> float:
    """A PowerUnit in kW."""
    return float(p["value"]) * {"watt": 1e-3, "kilowatt": 1.0, "megawatt": 1e3}[p["unit"]]
