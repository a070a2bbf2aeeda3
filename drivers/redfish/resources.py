"""The Redfish resources of a GPU rack's BMC, shared by the driver and the simulator.

One definition of the wire: the URIs, the `@odata.type` of every resource (DMTF DSP8010
schemas; the `$metadata` document is generated from the same table), the builders the simulator
serves, the PATCH bodies the driver sends, and the parsers on both sides. The two sides cannot
drift because they use the same functions: `environment_limit_patch()` builds exactly what
`parse_environment_patch()` accepts.

Power is capped per rack through one of two mechanisms, discovered from the Chassis:
- `EnvironmentMetrics.PowerLimitWatts` (Chassis v1.15+, EnvironmentMetrics v1.1+): an excerpt
  of the `Controls/PowerLimit` Control; PATCH `{"PowerLimitWatts": {"SetPoint": W}}`. Power is
  read from `PowerWatts.Reading` of the same resource.
- the legacy `Power` resource (deprecated in Chassis v1.15 but what older BMCs offer): PATCH
  `{"PowerControl": [{"PowerLimit": {"LimitInWatts": W}}]}`, read `PowerConsumedWatts`.

Parsers raise `drivers.base.ProtocolError` (and only that) for anything malformed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from drivers.base import ProtocolError
from drivers.core.spec import DeviceAccess

JsonObject = dict[str, Any]

# --- URIs (DSP0266: fixed service root, sessions at a hardened URI since 1.6.0) ---

VERSIONS: Final = "/redfish"
SERVICE_ROOT: Final = "/redfish/v1"
SERVICE_ROOT_ID: Final = "/redfish/v1/"  # the one @odata.id that keeps its trailing slash
ODATA: Final = "/redfish/v1/odata"
METADATA: Final = "/redfish/v1/$metadata"
CHASSIS: Final = "/redfish/v1/Chassis"
SESSION_SERVICE: Final = "/redfish/v1/SessionService"
SESSIONS: Final = "/redfish/v1/SessionService/Sessions"
POWER_LIMIT_CONTROL_ID: Final = "PowerLimit"

AUTH_TOKEN_HEADER: Final = "X-Auth-Token"
ODATA_VERSION: Final = "4.0"
REDFISH_VERSION: Final = "1.17.0"
MAX_BODY_BYTES: Final = 64 * 1024
"""A BMC's resources are a few kB; anything much larger is refused unread (memory bound)."""
MAX_URI_CHARS: Final = 512

# Resource type -> (DSP8010 schema file stem, versioned namespace or None for collections).
# Every `@odata.type` served and every `$metadata` reference comes from this table.
SCHEMAS: Final[Mapping[str, tuple[str, str | None]]] = {
    "ServiceRoot": ("ServiceRoot", "v1_5_0"),
    "ChassisCollection": ("ChassisCollection", None),
    "Chassis": ("Chassis", "v1_17_0"),  # v1_15_0: EnvironmentMetrics, v1_17_0: Controls
    "EnvironmentMetrics": ("EnvironmentMetrics", "v1_2_0"),  # v1_1_0: PowerLimitWatts
    "Power": ("Power", "v1_7_1"),
    "PowerSubsystem": ("PowerSubsystem", "v1_1_0"),
    "ControlCollection": ("ControlCollection", None),
    "Control": ("Control", "v1_2_0"),
    "SessionService": ("SessionService", "v1_1_8"),
    "SessionCollection": ("SessionCollection", None),
    "Session": ("Session", "v1_0_0"),
    "Message": ("Message", "v1_1_1"),
}
_SCHEMA_BASE = "http://redfish.dmtf.org/schemas/v1/"
BASE_REGISTRY: Final = "Base.1.16"
CONTROL_MODES: Final = frozenset({"Automatic", "Override", "Manual", "Disabled"})


def odata_type(name: str) -> str:
    stem, version = SCHEMAS[name]
    return f"#{name}.{name}" if version is None else f"#{stem}.{version}.{name}"


def _header(name: str, uri: str) -> JsonObject:
    return {
        "@odata.id": uri,
        "@odata.type": odata_type(name),
        "@odata.context": f"{METADATA}#{name}.{name}",
    }


def _link(uri: str) -> JsonObject:
    return {"@odata.id": uri}


def _safe_id(value: str, what: str) -> str:
    ok = value and len(value) <= 64 and not value.startswith(".")  # no "." or ".." segments
    if not ok or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value):
        raise ValueError(f"bad Redfish {what} {value!r}: use letters, digits, '-', '_', '.'")
    return value


@dataclass(frozen=True, slots=True)
class ChassisPaths:
    """The URIs of one rack's chassis and its power resources."""

    chassis_id: str

    @property
    def chassis(self) -> str:
        return f"{CHASSIS}/{self.chassis_id}"

    @property
    def environment_metrics(self) -> str:
        return f"{self.chassis}/EnvironmentMetrics"

    @property
    def power(self) -> str:
        return f"{self.chassis}/Power"

    @property
    def power_subsystem(self) -> str:
        return f"{self.chassis}/PowerSubsystem"

    @property
    def controls(self) -> str:
        return f"{self.chassis}/Controls"

    @property
    def power_limit_control(self) -> str:
        return f"{self.controls}/{POWER_LIMIT_CONTROL_ID}"


def chassis_paths(chassis_id: str) -> ChassisPaths:
    return ChassisPaths(_safe_id(chassis_id, "chassis id"))


def session_uri(session_id: str) -> str:
    return f"{SESSIONS}/{_safe_id(session_id, 'session id')}"


# --- server side: resource builders ---


@dataclass(frozen=True, slots=True)
class RackReadings:
    """What one BMC reports: the values every power resource is built from (W)."""

    reading_w: float
    setpoint_w: float
    """The power limit in force; equals allowable_max_w when uncapped."""
    allowable_min_w: float
    allowable_max_w: float
    control_mode: str = "Automatic"
    """"Disabled" means no limit is enforced (SetPoint kept, not applied)."""

    @property
    def capped(self) -> bool:
        return self.control_mode != "Disabled"


def _w(value: float) -> float:
    # Readings are served with 0.1 W resolution, as BMCs do; keeps payloads short.
    return round(float(value), 1)


def service_root(*, uuid: str, product: str) -> JsonObject:
    return {
        **_header("ServiceRoot", SERVICE_ROOT_ID),
        "Id": "RootService",
        "Name": "Root Service",
        "RedfishVersion": REDFISH_VERSION,
        "UUID": uuid,
        "Product": product,
        "Vendor": "rampd",
        "Chassis": _link(CHASSIS),
        "SessionService": _link(SESSION_SERVICE),
        "Links": {"Sessions": _link(SESSIONS)},
    }


def versions_document() -> JsonObject:
    return {"v1": SERVICE_ROOT_ID}


def odata_service_document() -> JsonObject:
    """The OData service document (DSP0266 "OData service document"): top-level singletons."""
    entries = [
        ("Service", SERVICE_ROOT_ID),
        ("Chassis", CHASSIS),
        ("SessionService", SESSION_SERVICE),
        ("Sessions", SESSIONS),
    ]
    return {
        "@odata.context": METADATA,
        "value": [{"name": n, "kind": "Singleton", "url": u} for n, u in entries],
    }


def metadata_xml() -> str:
    """A minimal CSDL `$metadata`: references to every DMTF schema namespace served."""
    refs: list[str] = []
    for name, (stem, version) in SCHEMAS.items():
        includes = [f'    <edmx:Include Namespace="{name}"/>']
        if version is not None:
            includes.append(f'    <edmx:Include Namespace="{stem}.{version}"/>')
        refs.append(
            f'  <edmx:Reference Uri="{_SCHEMA_BASE}{stem}_v1.xml">\n'
            + "\n".join(includes)
            + "\n  </edmx:Reference>"
        )
    refs.append(
        f'  <edmx:Reference Uri="{_SCHEMA_BASE}RedfishExtensions_v1.xml">\n'
        '    <edmx:Include Namespace="RedfishExtensions.v1_0_0" Alias="Redfish"/>\n'
        "  </edmx:Reference>"
    )
    root_ns = f"ServiceRoot.{SCHEMAS['ServiceRoot'][1]}"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">\n'
        + "\n".join(refs)
        + "\n  <edmx:DataServices>\n"
        '    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="Service">\n'
        f'      <EntityContainer Name="Service" Extends="{root_ns}.ServiceContainer"/>\n'
        "    </Schema>\n"
        "  </edmx:DataServices>\n"
        "</edmx:Edmx>\n"
    )


def _collection(name: str, uri: str, title: str, members: Sequence[str]) -> JsonObject:
    return {
        **_header(name, uri),
        "Name": title,
        "Members@odata.count": len(members),
        "Members": [_link(m) for m in members],
    }


def chassis_collection(chassis_ids: Sequence[str]) -> JsonObject:
    members = [chassis_paths(c).chassis for c in chassis_ids]
    return _collection("ChassisCollection", CHASSIS, "Chassis Collection", members)


def chassis(
    p: ChassisPaths,
    *,
    name: str,
    model: str | None,
    readings: RackReadings,
    with_controls: bool,
    with_environment_metrics: bool = True,
) -> JsonObject:
    body: JsonObject = {
        **_header("Chassis", p.chassis),
        "Id": p.chassis_id,
        "Name": name,
        "ChassisType": "Rack",
        "Manufacturer": "rampd",
        "PowerState": "On",
        "MaxPowerWatts": _w(readings.allowable_max_w),
        "MinPowerWatts": _w(readings.allowable_min_w),
        "Status": {"State": "Enabled", "Health": "OK"},
        "Power": _link(p.power),
        "PowerSubsystem": _link(p.power_subsystem),
        "Links": {},
    }
    if model:
        body["Model"] = model
    if with_environment_metrics:
        body["EnvironmentMetrics"] = _link(p.environment_metrics)
    if with_controls:
        body["Controls"] = _link(p.controls)
    return body


def _limit_excerpt(p: ChassisPaths, r: RackReadings) -> JsonObject:
    """PowerLimitWatts: the Control excerpt "Single" (ExcerptCopyOnly: DataSourceUri, Reading)."""
    return {
        "DataSourceUri": p.power_limit_control,
        "SetPoint": _w(r.setpoint_w),
        "AllowableMin": _w(r.allowable_min_w),
        "AllowableMax": _w(r.allowable_max_w),
        "ControlMode": r.control_mode,
        "Reading": _w(r.reading_w),
    }


def environment_metrics(p: ChassisPaths, r: RackReadings, *, with_limit: bool) -> JsonObject:
    body: JsonObject = {
        **_header("EnvironmentMetrics", p.environment_metrics),
        "Id": "EnvironmentMetrics",
        "Name": "Rack Environment Metrics",
        "PowerWatts": {"Reading": _w(r.reading_w)},  # Sensor excerpt "Power"
    }
    if with_limit:
        body["PowerLimitWatts"] = _limit_excerpt(p, r)
    return body


def power(p: ChassisPaths, r: RackReadings) -> JsonObject:
    """The legacy Power resource: one PowerControl for the whole rack."""
    member = f"{p.power}#/PowerControl/0"
    return {
        **_header("Power", p.power),
        "Id": "Power",
        "Name": "Rack Power",
        "PowerControl": [
            {
                "@odata.id": member,
                "MemberId": "0",
                "Name": "Rack Power Control",
                "PowerConsumedWatts": _w(r.reading_w),
                "PowerCapacityWatts": _w(r.allowable_max_w),
                "PowerLimit": {
                    "LimitInWatts": _w(r.setpoint_w) if r.capped else None,
                    "LimitException": "LogEventOnly",
                },
                "Status": {"State": "Enabled", "Health": "OK"},
            }
        ],
    }


def power_subsystem(p: ChassisPaths, r: RackReadings) -> JsonObject:
    return {
        **_header("PowerSubsystem", p.power_subsystem),
        "Id": "PowerSubsystem",
        "Name": "Rack Power Subsystem",
        "CapacityWatts": _w(r.allowable_max_w),
        "Allocation": {
            "RequestedWatts": _w(r.allowable_max_w),
            "AllocatedWatts": _w(r.setpoint_w if r.capped else r.allowable_max_w),
        },
        "Status": {"State": "Enabled", "Health": "OK"},
    }


def control_collection(p: ChassisPaths) -> JsonObject:
    members = [p.power_limit_control]
    return _collection("ControlCollection", p.controls, "Controls", members)


def power_limit_control(p: ChassisPaths, r: RackReadings) -> JsonObject:
    return {
        **_header("Control", p.power_limit_control),
        "Id": POWER_LIMIT_CONTROL_ID,
        "Name": "Rack Power Limit",
        "ControlType": "Power",
        "SetPointType": "Single",
        "SetPoint": _w(r.setpoint_w),
        "SetPointUnits": "W",
        "AllowableMin": _w(r.allowable_min_w),
        "AllowableMax": _w(r.allowable_max_w),
        "ControlMode": r.control_mode,
        "Implementation": "Programmable",
        "PhysicalContext": "Chassis",
        "Sensor": {"Reading": _w(r.reading_w)},
        "Status": {"State": "Enabled", "Health": "OK"},
    }


def session_service(*, timeout_s: int) -> JsonObject:
    return {
        **_header("SessionService", SESSION_SERVICE),
        "Id": "SessionService",
        "Name": "Session Service",
        "ServiceEnabled": True,
        "SessionTimeout": timeout_s,
        "Sessions": _link(SESSIONS),
        "Status": {"State": "Enabled", "Health": "OK"},
    }


def session_collection(session_ids: Sequence[str]) -> JsonObject:
    members = [session_uri(s) for s in session_ids]
    return _collection("SessionCollection", SESSIONS, "Session Collection", members)


def session(session_id: str, username: str) -> JsonObject:
    return {
        **_header("Session", session_uri(session_id)),
        "Id": session_id,
        "Name": "User Session",
        "UserName": username,
    }


def error_body(key: str, message: str, *, resolution: str = "None.") -> JsonObject:
    """The Redfish error response (DSP0266 "Error responses") with one Base registry message."""
    message_id = f"{BASE_REGISTRY}.{key}"
    return {
        "error": {
            "code": message_id,
            "message": message,
            "@Message.ExtendedInfo": [
                {
                    "@odata.type": odata_type("Message"),
                    "MessageId": message_id,
                    "Message": message,
                    "Severity": "Critical" if key in _CRITICAL else "Warning",
                    "Resolution": resolution,
                }
            ],
        }
    }


_CRITICAL = frozenset({"InternalError", "ServiceTemporarilyUnavailable", "GeneralError"})


def etag_of(*state: object) -> str:
    """A weak ETag over a resource's settable state (readings change every tick; a precondition
    on a PATCH is about the settings, not the latest sample)."""
    digest = hashlib.sha1(repr(state).encode(), usedforsecurity=False).hexdigest()[:16]
    return f'W/"{digest}"'


# --- PATCH and login bodies: built by the driver, parsed by the simulator ---


def _wire_w(w: float) -> int:
    # Whole watts: BMCs reject or truncate fractions; 1 W is far below any rack's deadband.
    return round(w)


def environment_limit_patch(w: float) -> JsonObject:
    return {"PowerLimitWatts": {"SetPoint": _wire_w(w)}}


def legacy_limit_patch(w: float) -> JsonObject:
    return {"PowerControl": [{"PowerLimit": {"LimitInWatts": _wire_w(w)}}]}


def control_setpoint_patch(w: float) -> JsonObject:
    return {"SetPoint": _wire_w(w)}


def login_body(username: str, password: str) -> JsonObject:
    return {"UserName": username, "Password": password}


class RequestError(ProtocolError):
    """A request body the service refuses: HTTP 400 with this Base registry message key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class LimitChange:
    """A parsed PATCH of a power limit: what it sets (None: left alone)."""

    setpoint_w: float | None = None
    control_mode: str | None = None
    remove_limit: bool = False
    """Legacy `LimitInWatts: null`: no limit."""


def _only(body: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in body:
        if key.startswith("@odata."):
            continue  # clients may echo annotations back; they change nothing
        if key not in allowed:
            raise RequestError("PropertyNotWritable", f"{where}{key} cannot be written")


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RequestError("PropertyValueTypeError", f"{where} must be an object")
    return value


def _setpoint(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError("PropertyValueTypeError", f"{where} must be a number")
    try:
        w = float(value)
    except OverflowError:
        raise RequestError("PropertyValueOutOfRange", f"{where} is out of range") from None
    if not math.isfinite(w):
        raise RequestError("PropertyValueTypeError", f"{where} must be finite")
    return w


def _mode(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in CONTROL_MODES:
        raise RequestError(
            "PropertyValueNotInList", f"{where} must be one of {sorted(CONTROL_MODES)}"
        )
    return str(value)


def _parse_control_fields(body: Mapping[str, Any], where: str) -> LimitChange:
    _only(body, frozenset({"SetPoint", "ControlMode"}), where)
    sp = _setpoint(body["SetPoint"], f"{where}SetPoint") if "SetPoint" in body else None
    mode = _mode(body["ControlMode"], f"{where}ControlMode") if "ControlMode" in body else None
    return LimitChange(setpoint_w=sp, control_mode=mode)


def parse_environment_patch(body: Mapping[str, Any]) -> LimitChange:
    _only(body, frozenset({"PowerLimitWatts"}), "")
    if "PowerLimitWatts" not in body:
        raise RequestError("PropertyMissing", "PowerLimitWatts is the only writable property")
    return _parse_control_fields(
        _object(body["PowerLimitWatts"], "PowerLimitWatts"), "PowerLimitWatts/"
    )


def parse_control_patch(body: Mapping[str, Any]) -> LimitChange:
    return _parse_control_fields(body, "")


def parse_legacy_patch(body: Mapping[str, Any]) -> LimitChange:
    _only(body, frozenset({"PowerControl"}), "")
    controls = body.get("PowerControl")
    if not isinstance(controls, list) or len(controls) != 1:
        raise RequestError("PropertyValueFormatError", "PowerControl must be a 1-member array")
    member = _object(controls[0], "PowerControl/0")
    _only(member, frozenset({"PowerLimit"}), "PowerControl/0/")
    limit = _object(member.get("PowerLimit"), "PowerControl/0/PowerLimit")
    _only(limit, frozenset({"LimitInWatts"}), "PowerControl/0/PowerLimit/")
    if "LimitInWatts" not in limit:
        raise RequestError("PropertyMissing", "PowerControl/0/PowerLimit/LimitInWatts missing")
    value = limit["LimitInWatts"]
    if value is None:
        return LimitChange(remove_limit=True)
    return LimitChange(setpoint_w=_setpoint(value, "LimitInWatts"))


def parse_login(body: Mapping[str, Any]) -> tuple[str, str]:
    user, password = body.get("UserName"), body.get("Password")
    if not isinstance(user, str) or not isinstance(password, str):
        raise RequestError("PropertyMissing", "UserName and Password (strings) are required")
    return user, password


# --- client side: parsers of what a BMC answers ---


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes, limit: int = MAX_BODY_BYTES) -> JsonObject:
    """A response or request body as a JSON object; ProtocolError for anything else."""
    if len(body) > limit:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {limit}")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError("body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"invalid JSON: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what} is {type(value).__name__}, not a number")
    try:
        f = float(value)
    except OverflowError:
        raise ProtocolError(f"{what} overflows") from None
    if not math.isfinite(f):
        raise ProtocolError(f"{what} is not finite")
    return f


def _optional_number(value: Any, what: str) -> float | None:
    return None if value is None else _number(value, what)


def _uri(value: Any, what: str) -> str:
    """A link target; only absolute paths on the same service (never another host)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a link object")
    uri = value.get("@odata.id")
    if (
        not isinstance(uri, str)
        or not uri.startswith(f"{SERVICE_ROOT}/")
        or len(uri) > MAX_URI_CHARS
        or any(c in uri for c in "?#\\\r\n\t ")
        or "/../" in uri
    ):
        raise ProtocolError(f"{what} is not a Redfish URI on this service")
    return uri


@dataclass(frozen=True, slots=True)
class ChassisLinks:
    environment_metrics: str | None
    power: str | None
    controls: str | None


def read_chassis_links(body: Mapping[str, Any]) -> ChassisLinks:
    def optional(key: str) -> str | None:
        return _uri(body[key], key) if key in body and body[key] is not None else None

    return ChassisLinks(optional("EnvironmentMetrics"), optional("Power"), optional("Controls"))


def read_power_watts(env: Mapping[str, Any]) -> float:
    """EnvironmentMetrics `PowerWatts.Reading` (W)."""
    excerpt = env.get("PowerWatts")
    if not isinstance(excerpt, dict):
        raise ProtocolError("EnvironmentMetrics has no PowerWatts")
    return _number(excerpt.get("Reading"), "PowerWatts.Reading")


@dataclass(frozen=True, slots=True)
class PowerLimit:
    """A power limit as a BMC reports it (W); None where the BMC does not say."""

    setpoint_w: float | None
    allowable_min_w: float | None = None
    allowable_max_w: float | None = None
    control_mode: str | None = None


def read_power_limit(env: Mapping[str, Any]) -> PowerLimit | None:
    """EnvironmentMetrics `PowerLimitWatts`, or None when this BMC does not offer it."""
    excerpt = env.get("PowerLimitWatts")
    if excerpt is None:
        return None
    if not isinstance(excerpt, dict):
        raise ProtocolError("PowerLimitWatts is not an object")
    mode = excerpt.get("ControlMode")
    if mode is not None and (not isinstance(mode, str) or mode not in CONTROL_MODES):
        raise ProtocolError(f"PowerLimitWatts.ControlMode {str(mode)[:40]!r} is unknown")
    lo = _optional_number(excerpt.get("AllowableMin"), "PowerLimitWatts.AllowableMin")
    hi = _optional_number(excerpt.get("AllowableMax"), "PowerLimitWatts.AllowableMax")
    if lo is not None and hi is not None and lo > hi:
        raise ProtocolError(f"PowerLimitWatts.AllowableMin {lo} exceeds AllowableMax {hi}")
    return PowerLimit(
        _optional_number(excerpt.get("SetPoint"), "PowerLimitWatts.SetPoint"), lo, hi, mode
    )


@dataclass(frozen=True, slots=True)
class LegacyPower:
    consumed_w: float
    limit: PowerLimit | None
    """None: the PowerControl has no PowerLimit (this BMC cannot cap through it)."""


def read_legacy_power(body: Mapping[str, Any]) -> LegacyPower:
    """Legacy Power: `PowerControl[0]` PowerConsumedWatts and PowerLimit.LimitInWatts."""
    controls = body.get("PowerControl")
    if not isinstance(controls, list) or not controls or not isinstance(controls[0], dict):
        raise ProtocolError("Power has no PowerControl")
    pc = controls[0]
    consumed = _number(pc.get("PowerConsumedWatts"), "PowerControl[0].PowerConsumedWatts")
    raw = pc.get("PowerLimit")
    if raw is None:
        return LegacyPower(consumed, None)
    if not isinstance(raw, dict):
        raise ProtocolError("PowerControl[0].PowerLimit is not an object")
    limit_w = _optional_number(raw.get("LimitInWatts"), "PowerLimit.LimitInWatts")
    capacity = _optional_number(pc.get("PowerCapacityWatts"), "PowerCapacityWatts")
    return LegacyPower(consumed, PowerLimit(limit_w, None, capacity))


def read_login(token: str | None, location: str | None) -> tuple[str, str | None]:
    """(X-Auth-Token, session URI) from a login answer's headers; the URI is None when the
    Location is unusable (the session then cannot be deleted, but it works)."""
    if not token or len(token) > 1024 or not token.isascii() or not token.isprintable():
        raise ProtocolError("login answered without a usable X-Auth-Token")
    uri: str | None = None
    if location:
        try:
            uri = _uri({"@odata.id": urlsplit(location).path}, "Location")  # may be absolute
        except (ProtocolError, ValueError):
            uri = None
    return token, uri


def error_message(body: bytes) -> str:
    """The message of a Redfish error body, for a log line; never raises."""
    try:
        err = parse_json(body).get("error")
    except ProtocolError:
        return ""
    if not isinstance(err, dict):
        return ""
    info = err.get("@Message.ExtendedInfo")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        msg = info[0].get("Message")
        if isinstance(msg, str):
            return msg[:200]
    msg = err.get("message")
    return msg[:200] if isinstance(msg, str) else ""


class Mechanism(StrEnum):
    """How a rack's power is capped, discovered per rack on first contact."""

    ENVIRONMENT_METRICS = "EnvironmentMetrics.PowerLimitWatts"
    LEGACY_POWER = "Power.PowerControl.PowerLimit"


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` header value of HTTP Basic (RFC 7617, UTF-8)."""
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_basic_authorization(header: str) -> tuple[str, str] | None:
    """(user, password) of a Basic `Authorization` header; None when it is not one."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(value) > 1024:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    return (user, password) if sep else None


def credentials(access: DeviceAccess) -> tuple[str | None, str | None]:
    """(username, password); the password from `password` or the first line of `password_file`.

    Reads a file (blocking): call at construction, never per request.
    """
    password = access.password
    if password is None and access.password_file is not None:
        try:
            text = Path(access.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read password_file {access.password_file}: {exc}") from None
        password = text.splitlines()[0] if text else ""
    return access.username, password
