"""DSX Flex's CloudEvents envelope (structured mode: the whole event is the MQTT payload).

`decode` holds an event to `BaseCloudEvent` and its event type's envelope in dsx-flex.yaml
(configs/standards/dsx-flex), field by field: every required attribute, `specversion`
"1.0.2", UUIDs, the `source` and `traceparent` patterns, RFC 3339 times, `data` a compact JWS
or an object. The daemon carries no JSON Schema engine; tests check this decoder and every
message the agent publishes against the yaml itself. The CloudEvents SDK then holds the
event: it knows specversion "1.0" only, the major version DSX Flex's "1.0.2" is a patch of,
so the SDK sees "1.0" and the wire always carries "1.0.2".

Pure: no I/O, no clock (callers pass unix time).
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Final

from cloudevents.conversion import to_dict
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_dict

from controller.wire.codec import WireError, decode_object, encode_object
from controller.wire.timestamps import parse_rfc3339, rfc3339

SPECVERSION: Final = "1.0.2"
_SDK_SPECVERSION: Final = "1.0"
DATACONTENTTYPE: Final = "application/json"
LOADTARGET_SET: Final = "grid.loadtarget.set.v1"
POWERSTATE_STATUS: Final = "grid.powerstate.status.v1"
POWERBREACH_ALERT: Final = "grid.powerbreach.alert.v1"
POWERBREACH_ENFORCEMENT: Final = "grid.powerbreach.enforcement.v1"

SOURCE: Final = re.compile(r"^//grid/v1/(isv|dsx-flex-agent|infra)/([^/]+)$")
TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})$")
JWS_COMPACT: Final = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_UUID: Final = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
REQUIRED: Final = (
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "subject",
    "traceparent",
    "data",
)


class EnvelopeError(WireError):
    """Not a DSX Flex CloudEvent of the expected type."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="envelope")


def is_uuid(v: object) -> bool:
    """The canonical 8-4-4-4-12 form (what JSON Schema's `uuid` format means)."""
    if not isinstance(v, str) or not _UUID.fullmatch(v):
        return False
    uuid.UUID(v)
    return True


def parse_time(v: object, name: str) -> float:
    """An RFC 3339 `date-time` (a `T` between date and time, as JSON Schema reads it)."""
    if not isinstance(v, str) or " " in v:
        raise ValueError(f"{name} must be an RFC 3339 date-time string")
    try:
        return parse_rfc3339(v)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Trace:
    """W3C trace context carried by every event: propagated from a target to what answers
    it (same trace id and flags, a new parent id)."""

    trace_id: str
    flags: str = "01"
    tracestate: str | None = None

    @classmethod
    def new(cls) -> Trace:
        return cls(secrets.token_hex(16))

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{secrets.token_hex(8)}-{self.flags}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A checked event: its attributes (through the SDK's event) and its raw `data`."""

    event: CloudEvent
    role: str
    """From `source`: isv, dsx-flex-agent or infra."""
    sender: str
    """From `source`: the publisher's identifier."""
    time: float
    trace: Trace
    data: str | dict[str, Any]
    """A compact JWS string, or the plain object."""

    @property
    def id(self) -> str:
        return str(self.event["id"])

    @property
    def source(self) -> str:
        return str(self.event["source"])

    @property
    def correlationid(self) -> str | None:
        v = self.event.get("correlationid")
        return None if v is None else str(v)


def _check(obj: dict[str, Any], expect_type: str) -> tuple[str, str, float, Trace]:
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise EnvelopeError(f"missing {', '.join(missing)}")
    if obj["specversion"] != SPECVERSION:
        raise EnvelopeError(f"specversion must be {SPECVERSION!r}")
    if obj["type"] != expect_type:
        raise EnvelopeError(f"type {obj['type']!r} is not {expect_type}")
    if not is_uuid(obj["id"]):
        raise EnvelopeError("id must be a UUID")
    source = obj["source"]
    m = SOURCE.fullmatch(source) if isinstance(source, str) else None
    if m is None:
        raise EnvelopeError("source must be //grid/v1/<isv|dsx-flex-agent|infra>/<identifier>")
    try:
        at = parse_time(obj["time"], "time")
    except ValueError as exc:
        raise EnvelopeError(str(exc)) from None
    if obj["datacontenttype"] != DATACONTENTTYPE:
        raise EnvelopeError(f"datacontenttype must be {DATACONTENTTYPE}")
    if not isinstance(obj["subject"], str):
        raise EnvelopeError("subject must be a string")
    tp = obj["traceparent"]
    t = TRACEPARENT.fullmatch(tp) if isinstance(tp, str) else None
    if t is None:
        raise EnvelopeError("traceparent must be version-traceid-parentid-flags (lower hex)")
    if "correlationid" in obj and not is_uuid(obj["correlationid"]):
        raise EnvelopeError("correlationid must be a UUID")
    state = obj.get("tracestate")
    if "tracestate" in obj and not isinstance(state, str):
        raise EnvelopeError("tracestate must be a string")
    data = obj["data"]
    if isinstance(data, str):
        if not JWS_COMPACT.fullmatch(data):
            raise EnvelopeError("data string is not a compact JWS")
    elif not isinstance(data, dict):
        raise EnvelopeError("data must be a compact JWS string or an object")
    return m.group(1), m.group(2), at, Trace(t.group(1), t.group(2), state)


def decode(payload: bytes, expect_type: str) -> Envelope:
    """EnvelopeError (a WireError) with the reason, whatever bytes arrive."""
    try:
        obj = decode_object(payload)
    except WireError as exc:
        raise EnvelopeError(exc.reason) from None
    role, sender, at, trace = _check(obj, expect_type)
    try:
        event = from_dict({**obj, "specversion": _SDK_SPECVERSION})
    except GenericException as exc:
        raise EnvelopeError(f"not a CloudEvent: {exc}") from None
    return Envelope(event, role, sender, at, trace, obj["data"])


def encode(
    *,
    source: str,
    type_: str,
    subject: str,
    data: str | dict[str, Any],
    at: float,
    trace: Trace,
    correlationid: str | None = None,
) -> bytes:
    """A structured-mode event, as published: `data` a JWS string or the plain object."""
    attrs: dict[str, Any] = {
        "specversion": _SDK_SPECVERSION,
        "id": str(uuid.uuid4()),
        "source": source,
        "type": type_,
        "time": rfc3339(at),
        "datacontenttype": DATACONTENTTYPE,
        "subject": subject,
        "traceparent": trace.traceparent(),
    }
    if trace.tracestate is not None:
        attrs["tracestate"] = trace.tracestate
    if correlationid is not None:
        attrs["correlationid"] = correlationid
    obj = to_dict(CloudEvent(attrs, data))
    obj["specversion"] = SPECVERSION
    return encode_object(obj, compact=True)
