"""The Whatsminer API v2 message set (TCP 4028, JSON, one request per connection), shared by
driver and simulator.

Plain commands are cgminer-style: `{"command": "summary"}` in, the miner answers one JSON object
and closes. Two reply shapes exist side by side:

- the cgminer ones (summary, devs, devdetails, pools): `{"STATUS": [{"STATUS": "S", "When": s,
  "Code": 11, "Msg": "Summary", "Description": "btminer"}], "SUMMARY": [{...}], "id": 1}`; a
  multi-command ("summary+devs") answers `{"summary": [<reply>], "devs": [<reply>], "id": 1}`;
- the Whatsminer ones (get_token, get_version, status, get_psu, get_miner_info,
  get_error_code and every privileged command): `{"STATUS": "S", "When": s, "Code": 131,
  "Msg": <text or object>, "Description": ""}`.

Privileged commands (set_power_pct, power_off, power_on, adjust_power_limit, ...) travel
encrypted (`crypto`): `{"enc": 1, "data": base64}` around `{"cmd": ..., <params as strings>,
"token": <sign>}`, answered `{"enc": base64}` around a Whatsminer-shaped reply. A request the
miner cannot decrypt or whose token it does not know is answered in plain text (the client may
not hold the key that would read it).

Codes are the API v2 list (14 invalid command, 23 invalid JSON, 45 permission denied, 131 OK,
132 command error, 134 token OK, 135 check token error, 136 token over max times, 137 base64
decode error); reply texts follow what deployed firmware is reported to send ("invalid cmd",
"check token err"); "token is expired" for a token past its life is this simulator's choice.

Builders (`*_reply`) are used by the simulator, parsers (`parse_*`) by the driver. Parsers raise
`ProtocolError` (or its `CommandError` subclasses for STATUS "E") and nothing else, for any input.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from drivers.base import ProtocolError
from drivers.cgminer import replies
from drivers.cgminer.replies import CommandError, first, multi_reply
from drivers.cgminer.wire import Json, decode_object
from drivers.core.spec import DeviceAccess
from drivers.whatsminer import crypto

PORT: Final = 4028
API_VERSION: Final = "2.0.5"
"""set_power_pct_v2 and adjust_power_limit came with API 2.0.5 (pyasic's api_min_version)."""
FW_VERSION: Final = "20230911.12.Rel"
"""A 2023 build: API v2 on 4028 (pyasic takes firmware after 2024-11 for the v3 API on 4433)."""
DESCRIPTION: Final = "btminer"
"""cgminer-style replies' Description; pyasic identifies the firmware by "BTMINER" in a reply."""
DEFAULT_PASSWORD: Final = "admin"

PCT_MIN: Final = 0
PCT_MAX: Final = 100
"""set_power_pct's `percent`: an integer string 0..100 (API v2.0.5, "fast" power adjustment;
pyasic itself only sends 1..99)."""

# Top-level keys.
STATUS, ID = "STATUS", "id"
SUMMARY, DEVS, DEVDETAILS, POOLS = "SUMMARY", "DEVS", "DEVDETAILS", "POOLS"

# Plain (read) commands answered in the cgminer shape, which multi-commands may combine.
CGMINER_COMMANDS: Final = frozenset({"summary", "devs", "edevs", "devdetails", "pools"})


class Code(IntEnum):
    POOLS = 7  # cgminer
    DEVS = 9  # cgminer
    SUMMARY = 11  # cgminer
    INVALID_COMMAND = 14
    INVALID_JSON = 23
    PERMISSION_DENIED = 45
    DEVDETAILS = 69  # cgminer
    OK = 131
    COMMAND_ERROR = 132
    TOKEN = 134
    TOKEN_CHECK = 135
    TOKEN_MAX = 136
    BASE64 = 137


MSG_OK: Final = "API command OK"
MSG_INVALID_COMMAND: Final = "invalid cmd"
MSG_INVALID_JSON: Final = "json cmd err"
MSG_TOKEN_INVALID: Final = "check token err"
MSG_TOKEN_EXPIRED: Final = "token is expired"
MSG_TOKEN_MAX: Final = "token over max times"
MSG_BASE64: Final = "base64 decode error"


def password_of(access: DeviceAccess) -> str:
    """The admin password: `password`, else the first line of `password_file`, else the
    factory default. Reads a file (blocking): call at construction, never per request."""
    if access.password is not None:
        return access.password
    if access.password_file is not None:
        try:
            text = Path(access.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read password_file {access.password_file}: {exc}") from None
        return text.splitlines()[0] if text else ""
    return DEFAULT_PASSWORD


# --- errors (their base, CommandError: drivers.cgminer.replies) ---


class TokenError(CommandError):
    """The token is unknown or expired: get a new one."""


class CryptFailure(CommandError):
    """The miner could not decrypt the command: the admin password is not the miner's."""


# --- framing (object ends and decoding: drivers.cgminer.wire) ---


def encode_command(command: str) -> bytes:
    """A plain command as sent on the wire (no terminator)."""
    return json.dumps({"command": command}).encode()


def encode_privileged(token: crypto.Token, command: str, **params: str) -> bytes:
    """A privileged command, encrypted with the token's key and signed with its sign."""
    body: Json = {"cmd": command, **params, "token": token.sign}
    return json.dumps({"enc": 1, "data": crypto.encrypt(token.key, body)}).encode()


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """Compact JSON, without the NUL other cgminer-style APIs end with."""
    return json.dumps(reply, separators=(",", ":")).encode()


def encrypted_reply(key: bytes, reply: Mapping[str, Any]) -> Json:
    return {"enc": crypto.encrypt(key, dict(reply))}


def open_reply(reply: Json, key: bytes) -> Json:
    """The reply to a privileged command: decrypted where the miner encrypted it, as is where
    it answered in plain text (a token or decryption failure)."""
    enc = reply.get("enc")
    if enc is None:
        return reply
    if not isinstance(enc, str):
        raise ProtocolError("reply's enc is not a string")
    try:
        return crypto.decrypt(key, enc)
    except crypto.CryptoError as exc:
        raise ProtocolError(f"encrypted reply: {exc}") from None


# --- reply builders (simulator side) ---


def _when() -> int:
    return int(time.time())


def plain_reply(code: int, msg: str | Json, status: str = "S") -> Json:
    """The Whatsminer shape: STATUS a letter, Msg text or an object."""
    return {"STATUS": status, "When": _when(), "Code": int(code), "Msg": msg, "Description": ""}


def ok_reply(msg: str | Json = MSG_OK) -> Json:
    return plain_reply(Code.OK, msg)


def error_reply(code: int, msg: str) -> Json:
    return plain_reply(code, msg, "E")


def cg_reply(code: int, msg: str, key: str, items: Sequence[Json]) -> Json:
    """The cgminer shape: STATUS a one-element list, the body under `key`."""
    entry = {"STATUS": "S", "When": _when(), "Code": int(code), "Msg": msg}
    entry["Description"] = DESCRIPTION
    return {STATUS: [entry], key: list(items), ID: 1}


def token_reply(time_s: str, salt: str, newsalt: str) -> Json:
    return plain_reply(Code.TOKEN, {"time": time_s, "salt": salt, "newsalt": newsalt})


@dataclass(frozen=True, slots=True)
class SummaryFields:
    """What the simulator reports in `summary` (SI where it can; the wire has its units)."""

    power_w: float
    ghs: float
    factory_ghs: float
    power_limit_w: float
    elapsed_s: int
    mac: str
    freq_mhz: float
    fan_rpm: int


def summary_reply(f: SummaryFields) -> Json:
    mhs = round(f.ghs * 1e3, 2)
    body = {
        "Elapsed": f.elapsed_s,
        "MHS av": mhs,
        "MHS 5s": mhs,
        "MHS 1m": mhs,
        "MHS 5m": mhs,
        "MHS 15m": mhs,
        "HS RT": mhs,
        "Accepted": 0,
        "Rejected": 0,
        "Total MH": round(mhs * f.elapsed_s, 0),
        "Temperature": 65.0 if f.ghs > 0 else 30.0,
        "freq_avg": round(f.freq_mhz),
        "Fan Speed In": f.fan_rpm,
        "Fan Speed Out": f.fan_rpm,
        "Power": round(f.power_w),
        "Power Rate": round(f.power_w / (f.ghs / 1e3), 2) if f.ghs > 0 else 0.0,
        "Pool Rejected%": 0.0,
        "Pool Stale%": 0.0,
        "Uptime": f.elapsed_s,
        "Hash Stable": f.ghs > 0,
        "Target Freq": round(f.freq_mhz),
        "Target MHS": mhs,
        "Env Temp": 25.0,
        "Power Mode": "Normal",
        "Factory GHS": round(f.factory_ghs),
        "Power Limit": round(f.power_limit_w),
        "Chip Temp Min": 60.0 if f.ghs > 0 else 30.0,
        "Chip Temp Max": 75.0 if f.ghs > 0 else 30.0,
        "Chip Temp Avg": 68.0 if f.ghs > 0 else 30.0,
        "Btminer Fast Boot": "disable",
        "Upfreq Complete": 1 if f.ghs > 0 else 0,
        "MAC": f.mac,
        "Firmware Version": f"'{FW_VERSION}'",
    }
    return cg_reply(Code.SUMMARY, "Summary", SUMMARY, [body])


def devdetails_reply(model: str, boards: int = 3) -> Json:
    items = [
        {"DEVDETAILS": b, "Name": "SM", "ID": b, "Driver": "bitmicro", "Kernel": "", "Model": model}
        for b in range(boards)
    ]
    return cg_reply(Code.DEVDETAILS, "Device Details", DEVDETAILS, items)


def devs_reply(ghs: float, factory_ghs: float, freq_mhz: float, boards: int = 3) -> Json:
    mhs = round(ghs * 1e3 / boards, 2)
    items = [
        {
            "ASC": b,
            "Slot": b,
            "Enabled": "Y",
            "Status": "Alive",
            "Temperature": 68.0 if ghs > 0 else 30.0,
            "Chip Frequency": round(freq_mhz),
            "MHS av": mhs,
            "MHS 5s": mhs,
            "MHS 1m": mhs,
            "MHS 5m": mhs,
            "MHS 15m": mhs,
            "Factory GHS": round(factory_ghs / boards),
            "Upfreq Complete": 1 if ghs > 0 else 0,
            "Effective Chips": 156,
            "PCB SN": f"BTM{b}",
            "Chip Temp Min": 60.0,
            "Chip Temp Max": 75.0,
            "Chip Temp Avg": 68.0,
        }
        for b in range(boards)
    ]
    return cg_reply(Code.DEVS, f"{boards} ASC(s)", DEVS, items)


def pools_reply(url: str, user: str, alive: bool) -> Json:
    body = {
        "POOL": 1,
        "URL": url,
        "Status": "Alive" if alive else "Dead",
        "Priority": 0,
        "Quota": 1,
        "Accepted": 0,
        "Rejected": 0,
        "Stale": 0,
        "User": user,
        "Stratum Active": alive,
        "Stratum Difficulty": 65536.0,
    }
    return cg_reply(Code.POOLS, "1 Pool(s)", POOLS, [body])


def version_reply(chip: str) -> Json:
    return ok_reply({"api_ver": API_VERSION, "fw_ver": FW_VERSION, "platform": "H6", "chip": chip})


def status_reply(mineroff: bool) -> Json:
    return ok_reply({"mineroff": "true" if mineroff else "false", "FirmwareVersion": FW_VERSION})


def psu_reply(power_w: float, on: bool) -> Json:
    vin = 230.0
    return ok_reply(
        {
            "name": "P222B",
            "hw_version": "V01.00",
            "sw_version": "V01.00.V01.03",
            "model": "P222B",
            "iin": f"{power_w / vin * 1000:.0f}",
            "vin": f"{vin * 100:.0f}",
            "pin": f"{power_w:.0f}",
            "fan_speed": "6720" if on else "0",
            "version": "1",
            "serial_no": "",
            "vendor": "1",
            "temp0": "40.0",
        }
    )


def miner_info_reply(ip: str, hostname: str, mac: str, serial: str) -> Json:
    return ok_reply(
        {
            "ip": ip,
            "proto": "static",
            "netmask": "255.255.255.0",
            "gateway": "",
            "dns": "",
            "hostname": hostname,
            "mac": mac,
            "ledstat": "auto",
            "minersn": serial,
        }
    )


def error_code_reply() -> Json:
    return ok_reply({"error_code": []})


# --- parsing (driver side) ---


def is_token_failure(code: int, msg: str) -> bool:
    low = msg.lower()
    return code == Code.TOKEN_CHECK or ("token" in low and ("invalid" in low or "expire" in low))


def check(reply: Mapping[str, Any], command: str) -> Json:
    """Raise the matching CommandError unless the reply reports success; return it. Both
    shapes: STATUS a letter (Whatsminer) or a one-element list (cgminer)."""
    status = reply.get(STATUS)
    entry: Any = reply
    if isinstance(status, list):
        if not status or not isinstance(status[0], Mapping):
            raise ProtocolError("reply with an empty STATUS")
        entry = status[0]
        status = entry.get("STATUS")
    if not isinstance(status, str):
        raise ProtocolError("reply without a STATUS")
    code, msg = entry.get("Code", 0), entry.get("Msg", "")
    if not isinstance(code, int) or isinstance(code, bool):
        code = 0
    if status in ("S", "I"):
        return dict(reply)
    if status not in ("E", "W", "F"):
        raise ProtocolError(f"unknown STATUS {status!r}"[:120])
    text = msg if isinstance(msg, str) else json.dumps(msg)[:120]
    if is_token_failure(code, text):
        raise TokenError(command, code, text)
    if code in (Code.INVALID_JSON, Code.BASE64):
        raise CryptFailure(command, code, text)
    raise CommandError(command, code, text)


def _msg_object(reply: Mapping[str, Any], command: str) -> Mapping[str, Any]:
    msg = check(reply, command).get("Msg")
    if not isinstance(msg, Mapping):
        raise ProtocolError(f"{command}: Msg is not an object")
    return msg


def _number(item: Mapping[str, Any], key: str, where: str) -> float:
    try:
        v = item[key]
    except KeyError:
        raise ProtocolError(f"{where} without {key!r}") from None
    if isinstance(v, str):  # some firmware quotes numbers
        try:
            v = float(v)
        except ValueError:
            raise ProtocolError(f"{where}.{key} is not a number: {v!r}"[:120]) from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(f"{where}.{key} is not a number: {v!r}"[:120])
    f = float(v)
    if not math.isfinite(f):
        raise ProtocolError(f"{where}.{key} is not finite")
    return f


@dataclass(frozen=True, slots=True)
class TokenInfo:
    time_s: str
    salt: str
    newsalt: str


def parse_token(reply: Mapping[str, Any]) -> TokenInfo:
    msg = _msg_object(reply, "get_token")
    parts = [msg.get(k) for k in ("time", "salt", "newsalt")]
    if not all(isinstance(p, str) and p for p in parts):
        raise ProtocolError("get_token: Msg needs time, salt and newsalt strings")
    time_s, salt, newsalt = (str(p) for p in parts)
    return TokenInfo(time_s, salt, newsalt)


@dataclass(frozen=True, slots=True)
class SummaryReading:
    power_w: float
    ghs: float
    """Hashrate over the last seconds (MHS 5s / 1000)."""
    elapsed_s: float
    """Seconds since btminer started: a restart (which forgets set_power_pct) resets it."""
    power_limit_w: float | None

    @property
    def hashrate_ths(self) -> float:
        return self.ghs / 1e3


def parse_summary(reply: Mapping[str, Any]) -> SummaryReading:
    item = first(check(reply, "summary"), SUMMARY)
    power = _number(item, "Power", SUMMARY)
    key = "MHS 5s" if "MHS 5s" in item else "MHS av"
    mhs = _number(item, key, SUMMARY)
    elapsed = _number(item, "Elapsed", SUMMARY) if "Elapsed" in item else math.nan
    limit = _number(item, "Power Limit", SUMMARY) if "Power Limit" in item else None
    if mhs < 0:
        raise ProtocolError("negative hashrate")
    return SummaryReading(power, mhs / 1e3, elapsed, limit if limit and limit > 0 else None)


def parse_status(reply: Mapping[str, Any]) -> bool:
    """Whether mining is off (`power_off`, or stopped by the firmware)."""
    msg = _msg_object(reply, "status")
    off = msg.get("mineroff")
    if isinstance(off, bool):
        return off
    if off not in ("true", "false"):
        raise ProtocolError(f"status: mineroff is {off!r}"[:80])
    return bool(off == "true")


def parse_devdetails(reply: Mapping[str, Any]) -> list[str]:
    check(reply, "devdetails")
    items = reply.get(DEVDETAILS)
    if not isinstance(items, list) or not items:
        raise ProtocolError("reply without DEVDETAILS")
    out = []
    for item in items:
        model = item.get("Model") if isinstance(item, Mapping) else None
        if not isinstance(model, str):
            raise ProtocolError("DEVDETAILS entry without a Model")
        out.append(model)
    return out


def parse_version(reply: Mapping[str, Any]) -> tuple[str, str]:
    """(api_ver, fw_ver) from get_version."""
    msg = _msg_object(reply, "get_version")
    api, fw = msg.get("api_ver", ""), msg.get("fw_ver", "")
    return (api if isinstance(api, str) else "", fw if isinstance(fw, str) else "")


def split_multi(reply: Mapping[str, Any], commands: Sequence[str]) -> dict[str, Json]:
    """The replies of a multi-command by command, each still unchecked (`replies.split_multi`)."""
    return replies.split_multi(reply, commands, check)


def percent_for(power_w: float, rated_w: float) -> int:
    """set_power_pct's integer percent of the rated power for `power_w`, within 0..100; the
    percent at or below (a miner never runs above what it was told)."""
    if rated_w <= 0:
        return PCT_MAX
    pct = math.floor(power_w / rated_w * 100.0 + 1e-6)
    return max(PCT_MIN, min(PCT_MAX, pct))


__all__ = [
    "PORT",
    "Code",
    "CommandError",
    "CryptFailure",
    "Json",
    "SummaryFields",
    "SummaryReading",
    "TokenError",
    "TokenInfo",
    "check",
    "decode_object",
    "encode_command",
    "encode_privileged",
    "encode_reply",
    "multi_reply",
    "open_reply",
    "parse_devdetails",
    "parse_status",
    "parse_summary",
    "parse_token",
    "parse_version",
    "password_of",
    "percent_for",
    "split_multi",
]
