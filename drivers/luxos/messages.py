"""The LuxOS message set (cgminer-style JSON API on TCP 4028), shared by driver and simulator.

One command per TCP connection: the client sends `{"command": "name", "parameter": "a,b"}`
(no newline, no length prefix), the miner answers one JSON object, usually followed by a NUL
byte (the cgminer convention), and closes. Every reply carries
`STATUS: [{"STATUS": "S"|"I"|"W"|"E", "Code": int, "Msg": str, "When": unix s, "Description":
"LUXminer <version>"}]`, `"id": 1`, and one body list named after the command (POWER,
SUMMARY, ...). Privileged commands (profileset, curtail, atmset, logoff) take the session id
from `logon` as their first parameter. A multi-command ("power+summary", parameterless only)
answers `{"power": [<reply>], "summary": [<reply>], "id": 1}`.

Key names and reply shapes follow the Luxor API docs (docs.luxor.tech/firmware/api) and what
pyasic 0.79 reads (`rpc/luxminer.py`, `miners/backends/luxminer.py`). Codes marked "docs" are
from the Luxor examples; error codes other than 402 (luxos-tooling: "Another session is
active") are not documented and are this simulator's choice.

Builders (`*_reply`) are used by the simulator, parsers (`parse_*`) by the driver. Parsers
raise `ProtocolError` (or its `CommandError` subclasses for STATUS "E") and nothing else, for
any input.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from drivers.base import ProtocolError
from drivers.cgminer import replies
from drivers.cgminer.replies import CommandError, first, multi_reply
from drivers.cgminer.wire import (
    MAX_MESSAGE_BYTES,
    Json,
    decode_object,
    encode_request,
    object_end,
)

PORT: Final = 4028
LUXMINER_VERSION: Final = "2024.6.18.181313-3afaf1f"
API_VERSION: Final = "3.7"

# Top-level keys: the STATUS envelope and one body list per command.
STATUS, ID = "STATUS", "id"
POWER, SUMMARY, VERSION, CONFIG = "POWER", "SUMMARY", "VERSION", "CONFIG"
DEVDETAILS, STATS, PROFILES, PROFILE = "DEVDETAILS", "STATS", "PROFILES", "PROFILE"
SESSION, CURTAIL, ATM = "SESSION", "CURTAIL", "ATM"
FANS, FANCTRL, TEMPCTRL, POOLS, GROUPS = "FANS", "FANCTRL", "TEMPCTRL", "POOLS", "GROUPS"

# Commands that need a session id as their first parameter.
PRIVILEGED: Final = frozenset({"profileset", "curtail", "atmset", "logoff"})

# CONFIG "CurtailMode" values.
CURTAIL_NONE, CURTAIL_SLEEP = "None", "Sleep"
SLEEP, WAKEUP = "sleep", "wakeup"


class Code(IntEnum):
    """STATUS Code values."""

    SUMMARY = 11  # cgminer
    INVALID_COMMAND = 14  # cgminer "Invalid command"
    VERSION = 22  # cgminer / docs
    DEVDETAILS = 69  # cgminer
    STATS = 70  # cgminer
    TEMPCTRL = 200
    FANS = 202
    POOLS = 7  # cgminer
    GROUPS = 208
    POWER = 311
    SESSION_CREATED = 316  # docs
    SESSION_DROPPED = 317
    SESSION_INFO = 319  # docs
    PROFILE_SET = 321  # docs
    PROFILES = 323
    CONFIG = 33
    CURTAIL = 335  # docs
    ATM = 339  # pyasic docstring
    ATM_SET = 340  # pyasic docstring
    INVALID_SESSION = 401
    SESSION_BUSY = 402  # luxos-tooling: "Another session is active"
    INVALID_PARAMETER = 403
    CURTAILED = 404
    ALREADY_ACTIVE = 405
    INTERNAL = 500


# --- errors (their base, CommandError: drivers.cgminer.replies) ---


class InvalidSession(CommandError):
    """The session id is unknown or expired: log on again."""


class SessionBusy(CommandError):
    """Another actor holds the miner's only session."""


class AlreadyActive(CommandError):
    """`curtail wakeup` on a miner that is not curtailed."""


# --- framing (the wire itself, object ends and decoding: drivers.cgminer.wire) ---


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    params: tuple[str, ...]

    @property
    def commands(self) -> tuple[str, ...]:
        """The commands of a multi-command ("power+summary"), or just this one."""
        return tuple(self.command.split("+"))


def decode_request(data: bytes | bytearray) -> Request:
    obj = decode_object(data, "request")
    command = obj.get("command")
    if not isinstance(command, str) or not command:
        raise ProtocolError("request without a command")
    param = obj.get("parameter")
    if param is None or param == "":
        params: tuple[str, ...] = ()
    elif isinstance(param, str):
        params = tuple(p.strip() for p in param.split(","))
    elif isinstance(param, int | float) and not isinstance(param, bool):
        params = (str(param),)
    else:
        raise ProtocolError("parameter must be a string")
    return Request(command.strip(), params)


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """JSON plus the trailing NUL byte cgminer-style APIs send."""
    return json.dumps(reply, separators=(",", ":")).encode() + b"\x00"


def decode_reply(data: bytes | bytearray) -> Json:
    return decode_object(data, "reply")


# --- reply builders (simulator side) ---


def _description() -> str:
    return f"LUXminer {LUXMINER_VERSION}"


def status_entry(code: int, msg: str, status: str = "S") -> Json:
    return {
        "Code": int(code),
        "Description": _description(),
        "Msg": msg,
        "STATUS": status,
        "When": int(time.time()),
    }


def ok_reply(code: int, msg: str, key: str | None = None, items: Sequence[Json] = ()) -> Json:
    reply: Json = {STATUS: [status_entry(code, msg)], ID: 1}
    if key is not None:
        reply[key] = list(items)
    return reply


def error_reply(code: int, msg: str) -> Json:
    return {STATUS: [status_entry(code, msg, "E")], ID: 1}


def power_reply(watts: float, psu_on: bool) -> Json:
    return ok_reply(Code.POWER, "Power usage", POWER, [{"PSU": psu_on, "Watts": round(watts)}])


def summary_reply(ghs_5s: float, ghs_av: float, elapsed_s: int, accepted: int = 0) -> Json:
    body = {
        "Accepted": accepted,
        "Elapsed": elapsed_s,
        "GHS 30m": round(ghs_av, 2),
        "GHS 5s": round(ghs_5s, 2),
        "GHS av": round(ghs_av, 2),
        "Hardware Errors": 0,
        "Rejected": 0,
        "Stale": 0,
        "Total MH": round(ghs_av * 1e3 * elapsed_s, 0),
    }
    return ok_reply(Code.SUMMARY, "Summary", SUMMARY, [body])


def version_reply(type_name: str) -> Json:
    body = {
        "API": API_VERSION,
        "CompileTime": "Tue Jun 18 18:19:10 UTC 2024",
        "LUXminer": LUXMINER_VERSION,
        "Miner": LUXMINER_VERSION.split("-")[0],
        "Type": type_name,
    }
    return ok_reply(Code.VERSION, "LUXminer versions", VERSION, [body])


def config_reply(
    *,
    type_name: str,
    profile: str,
    curtailed: bool,
    psu_on: bool,
    atm_enabled: bool,
    hostname: str,
    mac: str,
) -> Json:
    body = {
        "ASC Count": 3,
        "Cooling": "Air",
        "CurtailMode": CURTAIL_SLEEP if curtailed else CURTAIL_NONE,
        "Hostname": hostname,
        "IsAtmEnabled": atm_enabled,
        "IsPowerSupplyOn": psu_on,
        "IsTuning": False,
        "MACAddr": mac,
        "Model": type_name,
        "OS": "LuxOS",
        "Profile": profile,
        "RedLed": "off",
        "SystemStatus": "Normal",
    }
    return ok_reply(Code.CONFIG, "LUXminer config", CONFIG, [body])


def devdetails_reply(type_name: str, boards: int = 3) -> Json:
    items = [
        {
            "DEVDETAILS": b,
            "Name": "ASC",
            "ID": b,
            "Driver": "LUXminer",
            "Kernel": "",
            "Model": type_name,
            "Device Path": f"/dev/board{b}",
        }
        for b in range(boards)
    ]
    return ok_reply(Code.DEVDETAILS, f"{boards} ASC(s)", DEVDETAILS, items)


@dataclass(frozen=True, slots=True)
class Profile:
    """One entry of `profiles`: a frequency/voltage preset and its estimated power."""

    name: str
    watts: float
    hashrate_ths: float
    frequency_mhz: float = 0.0
    voltage_v: float = 0.0
    step: str = "0"


def profiles_reply(profiles: Sequence[Profile]) -> Json:
    items = [
        {
            "CanRestore": False,
            "Frequency": p.frequency_mhz,
            "HasOverrides": False,
            "Hashrate": round(p.hashrate_ths, 1),
            "IsDynamic": True,
            "IsTuned": False,
            "Profile Name": p.name,
            "Step": p.step,
            "Voltage": round(p.voltage_v, 2),
            "Watts": round(p.watts),
        }
        for p in profiles
    ]
    return ok_reply(Code.PROFILES, "List profiles", PROFILES, items)


def profileset_reply(profile: str) -> Json:
    body = {"Board": 0, "FrequencyStep": 5, "Profile": profile, "VoltageStep": 0.05}
    return ok_reply(Code.PROFILE_SET, "Profile Set", PROFILE, [body])


def session_reply(session_id: str, created: bool) -> Json:
    body = [{"SessionID": session_id}]
    if created:
        return ok_reply(Code.SESSION_CREATED, "Session created", SESSION, body)
    return ok_reply(Code.SESSION_INFO, "Session information", SESSION, body)


def curtail_reply(action: str) -> Json:
    text = "sleep mode" if action == SLEEP else "wake up"
    return ok_reply(Code.CURTAIL, "Curtailment command sent", CURTAIL, [{"Action": text}])


def atm_reply(enabled: bool) -> Json:
    body = {
        "Enabled": enabled,
        "MaxProfile": "default",
        "MinProfile": "",
        "PostRampMinutes": 15,
        "StartupMinutes": 15,
        "TempWindow": 7,
    }
    return ok_reply(Code.ATM, "ATM configuration values", ATM, [body])


def stats_reply(ghs: float, ideal_ghs: float, elapsed_s: int, boards: int = 3) -> Json:
    """cgminer-shaped stats: [0] the miner, [1] the boards (what pyasic reads)."""
    detail: Json = {
        "STATS": 1,
        "ID": "LUXminer0",
        "Elapsed": elapsed_s,
        "rate_unit": "GH",
        "total_rate": round(ghs, 2),
        "total_rateideal": round(ideal_ghs, 2),
    }
    for b in range(1, boards + 1):
        detail[f"chain_rate{b}"] = round(ghs / boards, 2)
        detail[f"chain_acn{b}"] = 108
        detail[f"temp_chip{b}"] = "62-64-63-65"
        detail[f"temp_pcb{b}"] = "50-52-51-53"
    items = [{"STATS": 0, "ID": "LUXminer", "Elapsed": elapsed_s, "Type": "LUXminer"}, detail]
    return ok_reply(Code.STATS, "LUXminer stats", STATS, items)


def fans_reply(rpm: int, speed_pct: int, fans: int = 4) -> Json:
    reply = ok_reply(
        Code.FANS,
        f"{fans} Fan(s)",
        FANS,
        [{"FAN": f"FAN{k}", "ID": k, "RPM": rpm, "Speed": speed_pct} for k in range(fans)],
    )
    reply[FANCTRL] = [{"FanMaxSpeed": 100, "FanMinSpeed": 20, "MinFans": 1, "PowerOffSpeed": 20}]
    return reply


def tempctrl_reply() -> Json:
    body = {"Dangerous": 70.0, "Hot": 65.0, "Mode": "Automatic", "Target": 55.0}
    return ok_reply(Code.TEMPCTRL, "Temperature control", TEMPCTRL, [body])


def pools_reply(url: str, user: str, alive: bool) -> Json:
    body = {
        "Accepted": 0,
        "GROUP": 0,
        "POOL": 0,
        "Priority": 0,
        "Quota": 1,
        "Rejected": 0,
        "Stale": 0,
        "Status": "Alive" if alive else "Disabled",
        "Stratum Active": alive,
        "URL": url,
        "User": user,
    }
    return ok_reply(Code.POOLS, "1 Pool(s)", POOLS, [body])


def groups_reply() -> Json:
    body = {"GROUP": 0, "Name": "Default", "Quota": 1}
    return ok_reply(Code.GROUPS, "1 Group(s)", GROUPS, [body])


# --- parsing (driver side) ---


@dataclass(frozen=True, slots=True)
class Status:
    status: str
    code: int
    msg: str
    when: int


_STATUS_LETTERS = frozenset({"S", "I", "W", "E", "F"})


def parse_status(reply: Mapping[str, Any]) -> Status:
    try:
        entry = reply[STATUS][0]
        status = entry["STATUS"]
        code = entry.get("Code", 0)
        msg = entry.get("Msg", "")
        when = entry.get("When", 0)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProtocolError("reply without a STATUS") from None
    if not isinstance(status, str) or status not in _STATUS_LETTERS:
        raise ProtocolError(f"unknown STATUS {status!r}"[:120])
    if not _is_int(code) or not isinstance(msg, str):
        raise ProtocolError("malformed STATUS")
    return Status(status, int(code), msg, int(when) if _is_int(when) else 0)


def is_success(reply: Mapping[str, Any]) -> bool:
    """STATUS "S" (success) or "I" (informational); "W", "E" and "F" are not."""
    return parse_status(reply).status in ("S", "I")


def check(reply: Mapping[str, Any], command: str) -> Json:
    """Raise the matching CommandError unless the reply reports success; return it."""
    st = parse_status(reply)
    if st.status in ("S", "I"):
        return dict(reply)
    low = st.msg.lower()
    if st.code == Code.SESSION_BUSY or "another session" in low or "session in use" in low:
        raise SessionBusy(command, st.code, st.msg)
    stale = "session" in low and ("invalid" in low or "expired" in low)
    if st.code == Code.INVALID_SESSION or stale:
        raise InvalidSession(command, st.code, st.msg)
    if st.code == Code.ALREADY_ACTIVE or "already active" in low:
        raise AlreadyActive(command, st.code, st.msg)
    raise CommandError(command, st.code, st.msg)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(item: Mapping[str, Any], key: str, where: str) -> float:
    try:
        v = item[key]
    except KeyError:
        raise ProtocolError(f"{where} without {key!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(f"{where}.{key} is not a number: {v!r}"[:120])
    f = float(v)
    if not math.isfinite(f):
        raise ProtocolError(f"{where}.{key} is not finite")
    return f


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"{where}.{key} is not a string")
    return v


@dataclass(frozen=True, slots=True)
class PowerReading:
    watts: float
    psu_on: bool


def split_multi(reply: Mapping[str, Any], commands: Sequence[str]) -> dict[str, Json]:
    """The replies of a multi-command by command, each still unchecked (`replies.split_multi`)."""
    return replies.split_multi(reply, commands, check)


def parse_power(reply: Mapping[str, Any]) -> PowerReading:
    item = first(check(reply, "power"), POWER)
    psu = item.get("PSU", True)
    if not isinstance(psu, bool):
        raise ProtocolError("POWER.PSU is not a boolean")
    return PowerReading(_number(item, "Watts", POWER), psu)


@dataclass(frozen=True, slots=True)
class SummaryReading:
    ghs_5s: float
    ghs_av: float
    elapsed_s: float

    @property
    def hashrate_ths(self) -> float:
        return self.ghs_5s / 1e3


def parse_summary(reply: Mapping[str, Any]) -> SummaryReading:
    item = first(check(reply, "summary"), SUMMARY)
    ghs_5s = _number(item, "GHS 5s", SUMMARY)
    ghs_av = _number(item, "GHS av", SUMMARY) if "GHS av" in item else ghs_5s
    elapsed = _number(item, "Elapsed", SUMMARY) if "Elapsed" in item else 0.0
    if ghs_5s < 0 or ghs_av < 0:
        raise ProtocolError("negative hashrate")
    return SummaryReading(ghs_5s, ghs_av, elapsed)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    luxminer: str
    api: str
    type_name: str


def parse_version(reply: Mapping[str, Any]) -> VersionInfo:
    item = first(check(reply, "version"), VERSION)
    lux = item.get("LUXminer")
    if not isinstance(lux, str):
        raise ProtocolError("not a LuxOS miner (VERSION without LUXminer)")
    api = item.get("API", "")
    return VersionInfo(lux, api if isinstance(api, str) else "", _string(item, "Type", VERSION))


@dataclass(frozen=True, slots=True)
class ConfigInfo:
    profile: str
    curtailed: bool
    atm_enabled: bool | None
    model: str


def parse_config(reply: Mapping[str, Any]) -> ConfigInfo:
    item = first(check(reply, "config"), CONFIG)
    mode = _string(item, "CurtailMode", CONFIG)
    atm = item.get("IsAtmEnabled")
    model = item.get("Model", "")
    return ConfigInfo(
        profile=_string(item, "Profile", CONFIG),
        curtailed=mode.lower() not in ("", "none"),
        atm_enabled=atm if isinstance(atm, bool) else None,
        model=model if isinstance(model, str) else "",
    )


def parse_devdetails(reply: Mapping[str, Any]) -> list[str]:
    """The Model of each board."""
    check(reply, "devdetails")
    items = reply.get(DEVDETAILS)
    if not isinstance(items, list) or not items:
        raise ProtocolError("reply without DEVDETAILS")
    models = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ProtocolError("DEVDETAILS entry is not an object")
        models.append(_string(item, "Model", DEVDETAILS))
    return models


def parse_profiles(reply: Mapping[str, Any]) -> list[Profile]:
    """Profiles sorted by power, lowest first."""
    check(reply, "profiles")
    items = reply.get(PROFILES)
    if not isinstance(items, list) or not items:
        raise ProtocolError("reply without PROFILES")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ProtocolError("PROFILES entry is not an object")
        name = _string(item, "Profile Name", PROFILES)
        watts = _number(item, "Watts", PROFILES)
        if not name or watts <= 0:
            raise ProtocolError(f"implausible profile {name!r} of {watts} W")
        ths = _number(item, "Hashrate", PROFILES) if "Hashrate" in item else 0.0
        freq = _number(item, "Frequency", PROFILES) if "Frequency" in item else 0.0
        volt = _number(item, "Voltage", PROFILES) if "Voltage" in item else 0.0
        step = item.get("Step", "")
        out.append(Profile(name, watts, ths, freq, volt, step if isinstance(step, str) else ""))
    out.sort(key=lambda p: p.watts)
    return out


def parse_session(reply: Mapping[str, Any], command: str = "logon") -> str:
    """The SessionID ("" from `session` when none is active)."""
    item = first(check(reply, command), SESSION)
    return _string(item, "SessionID", SESSION)


def parse_atm(reply: Mapping[str, Any]) -> bool:
    item = first(check(reply, "atm"), ATM)
    enabled = item.get("Enabled")
    if not isinstance(enabled, bool):
        raise ProtocolError("ATM.Enabled is not a boolean")
    return enabled


def parse_profileset(reply: Mapping[str, Any]) -> str:
    item = first(check(reply, "profileset"), PROFILE)
    return _string(item, "Profile", PROFILE)


def choose_profile(profiles: Sequence[Profile], setpoint_w: float) -> Profile:
    """The highest-power profile at or below `setpoint_w`; the lowest one if none is.

    `profiles` sorted by watts (as `parse_profiles` returns them).
    """
    if not profiles:
        raise ValueError("no profiles")
    best = profiles[0]
    for p in profiles:
        if p.watts <= setpoint_w + 1e-6:
            best = p
    return best


__all__ = [
    "MAX_MESSAGE_BYTES",
    "PORT",
    "PRIVILEGED",
    "AlreadyActive",
    "Code",
    "CommandError",
    "ConfigInfo",
    "InvalidSession",
    "Json",
    "PowerReading",
    "Profile",
    "Request",
    "SessionBusy",
    "Status",
    "SummaryReading",
    "VersionInfo",
    "check",
    "choose_profile",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "is_success",
    "multi_reply",
    "object_end",
    "parse_atm",
    "parse_config",
    "parse_devdetails",
    "parse_power",
    "parse_profiles",
    "parse_profileset",
    "parse_session",
    "parse_status",
    "parse_summary",
    "parse_version",
    "split_multi",
]
