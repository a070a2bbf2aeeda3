"""The stock Antminer web interface's cgi API: one definition for the driver and the simulator.

Bitmain's stock firmware (S19/S21 generation, "AntminerModern" in pyasic) serves its web UI
from lighttpd on port 80; every page and cgi needs HTTP digest authentication (realm
"antMiner Configuration", MD5, qop "auth"; factory login root/root). The cgi scripts answer
JSON:

- `get_system_info.cgi`: the model (`minertype`, "Antminer S21"), serial, MAC, firmware date.
- `summary.cgi`: hashrate (`rate_5s`, `rate_ideal`, in `rate_unit`, "GH/s" on SHA-256 models)
  and health checks (`status`: rate, network, fans, temp; "s" = fine).
- `stats.cgi`: the same rates per chain, fans, and the running `miner-mode`.
- `get_miner_conf.cgi`: the stored configuration; the mode is `bitmain-work-mode`, a string.
- `set_miner_conf.cgi` (POST, JSON): the configuration as the web UI sends it, the mode as
  `miner-mode` (an int): 0 normal, 1 sleep, 3 low power. The cgi writes the whole
  configuration from the body, so a client sends back what it read with the mode changed.
  Answer `{"stats": "success", "code": "M000", "msg": "OK!"}`.

Stock firmware reports no power at all (no field in any of these, nor in the RPC): a driver
knows the mode and the hashrate, and estimates power from the mode's nominal figure.
Mode values and the set body's keys are those pyasic 0.79 (`config/mining`, `as_am_modern`)
and the web UI send.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from drivers.base import ProtocolError

Json = dict[str, Any]

HTTP_PORT = 80
RPC_PORT = 4028
REALM = "antMiner Configuration"
DEFAULT_USERNAME = "root"
DEFAULT_PASSWORD = "root"

SYSTEM_INFO = "/cgi-bin/get_system_info.cgi"
SUMMARY = "/cgi-bin/summary.cgi"
STATS = "/cgi-bin/stats.cgi"
GET_CONF = "/cgi-bin/get_miner_conf.cgi"
SET_CONF = "/cgi-bin/set_miner_conf.cgi"

MAX_BODY_BYTES = 64 * 1024
"""A cgi's answer is a few kB; anything larger is not this API."""
SET_OK_CODE = "M000"
FIRMWARE_DATE = "Thu Nov 14 17:50:24 CST 2024"
"""CompileTime / system_filesystem_version the simulator reports (a stock S21 build date)."""

_RATE_UNITS = {"H/S": 1e-12, "KH/S": 1e-9, "MH/S": 1e-6, "GH/S": 1e-3, "TH/S": 1.0, "PH/S": 1e3}


class Mode(IntEnum):
    """`miner-mode` / `bitmain-work-mode` values."""

    NORMAL = 0
    SLEEP = 1
    LOW = 3


def parse_mode(value: object) -> Mode:
    """A mode as the firmware writes it: an int, or a string of digits (get_miner_conf)."""
    if isinstance(value, bool):
        raise ProtocolError(f"invalid miner mode {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        try:
            return Mode(value)
        except ValueError:
            pass
    raise ProtocolError(f"invalid miner mode {value!r}")


# --- replies, parsed ---


@dataclass(frozen=True, slots=True)
class Rates:
    """Hashrate in TH/s: the last 5 s and what the firmware expects at its settings."""

    rate_5s_ths: float
    rate_ideal_ths: float
    elapsed_s: int


@dataclass(frozen=True, slots=True)
class Stats:
    rates: Rates
    mode: Mode | None
    """The running mode (None: this firmware's stats do not carry it)."""


@dataclass(frozen=True, slots=True)
class Summary:
    rates: Rates
    problems: tuple[str, ...]
    """The health checks not "s" (e.g. "fans: Fan speed low"), empty when all is fine."""


@dataclass(frozen=True, slots=True)
class MinerConf:
    mode: Mode
    raw: Json
    """The whole configuration as read: what a set sends back."""


@dataclass(frozen=True, slots=True)
class SystemInfo:
    minertype: str
    serial: str
    mac: str
    hostname: str
    firmware: str


def decode(body: bytes) -> Json:
    """A cgi's JSON object."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _number(obj: Json, key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ProtocolError(f"{key}: expected a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ProtocolError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ProtocolError(f"{key}: implausible value {value!r}")
    return x


def _first(reply: Json, key: str) -> Json:
    items = reply.get(key)
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ProtocolError(f"no {key}[0] in the reply")
    first: Json = items[0]
    return first


def _rates(item: Json) -> Rates:
    unit = str(item.get("rate_unit", "GH/s")).strip().upper()
    scale = _RATE_UNITS.get(unit)
    if scale is None:
        raise ProtocolError(f"unknown rate_unit {unit!r}")
    return Rates(
        _number(item, "rate_5s") * scale,
        _number(item, "rate_ideal") * scale,
        int(_number(item, "elapsed")),
    )


def parse_summary(reply: Json) -> Summary:
    item = _first(reply, "SUMMARY")
    problems = []
    status = item.get("status", [])
    if isinstance(status, list):
        for check in status:
            if isinstance(check, dict) and check.get("status", "s") != "s":
                problems.append(f"{check.get('type', '?')}: {check.get('msg', '')}".strip())
    return Summary(_rates(item), tuple(problems))


def parse_stats(reply: Json) -> Stats:
    item = _first(reply, "STATS")
    mode = parse_mode(item["miner-mode"]) if "miner-mode" in item else None
    return Stats(_rates(item), mode)


def parse_conf(reply: Json) -> MinerConf:
    if "bitmain-work-mode" not in reply:
        raise ProtocolError("no bitmain-work-mode in the miner configuration")
    work_mode = reply["bitmain-work-mode"]
    # Factory configurations may leave it empty: normal (as pyasic reads it).
    mode = Mode.NORMAL if work_mode == "" else parse_mode(work_mode)
    return MinerConf(mode, reply)


def parse_system_info(reply: Json) -> SystemInfo:
    minertype = reply.get("minertype")
    if not isinstance(minertype, str) or not minertype:
        raise ProtocolError("no minertype in the system info")
    return SystemInfo(
        minertype,
        str(reply.get("serinum", "")),
        str(reply.get("macaddr", "")),
        str(reply.get("hostname", "")),
        str(reply.get("system_filesystem_version", "")),
    )


def set_body(conf: Json, mode: Mode) -> Json:
    """What the web UI posts to set_miner_conf: the configuration read (`conf`, from
    get_miner_conf) with its mode changed. Key names differ between the two: the read's
    `bitmain-work-mode` / `bitmain-freq-level` go out as `miner-mode` / `freq-level`."""
    body: Json = {
        "bitmain-fan-ctrl": bool(conf.get("bitmain-fan-ctrl", False)),
        "bitmain-fan-pwm": str(conf.get("bitmain-fan-pwm", "100")),
        "miner-mode": int(mode),
        "freq-level": str(conf.get("bitmain-freq-level", "100")),
        "pools": conf.get("pools", []),
    }
    return body


def check_set_reply(reply: Json) -> None:
    if reply.get("code") != SET_OK_CODE or reply.get("stats") != "success":
        raise ProtocolError(
            f"set_miner_conf refused: {reply.get('code', '?')} {reply.get('msg', '')}".strip()
        )


# --- replies, built (the simulator) ---


def _head(msg: str, when: int, type_name: str) -> Json:
    return {
        "STATUS": {"STATUS": "S", "when": when, "Msg": msg, "api_version": "1.0.0"},
        "INFO": {
            "miner_version": "uart_trans.1.3",
            "CompileTime": FIRMWARE_DATE,
            "type": type_name,
        },
    }


def _rate_fields(rate_5s_ghs: float, rate_ideal_ghs: float, elapsed_s: int) -> Json:
    return {
        "elapsed": elapsed_s,
        "rate_5s": round(rate_5s_ghs, 2),
        "rate_30m": round(rate_5s_ghs, 2),
        "rate_avg": round(rate_5s_ghs, 2),
        "rate_ideal": round(rate_ideal_ghs, 2),
        "rate_unit": "GH/s",
    }


def summary_reply(
    type_name: str, when: int, rate_5s_ghs: float, rate_ideal_ghs: float, elapsed_s: int
) -> Json:
    checks = [
        {"type": t, "status": "s", "code": 0, "msg": ""}
        for t in ("rate", "network", "fans", "temp")
    ]
    item = _rate_fields(rate_5s_ghs, rate_ideal_ghs, elapsed_s) | {
        "hw_all": 0,
        "bestshare": 0,
        "status": checks,
    }
    return _head("summary", when, type_name) | {"SUMMARY": [item]}


def stats_reply(
    type_name: str,
    when: int,
    rate_5s_ghs: float,
    rate_ideal_ghs: float,
    elapsed_s: int,
    mode: Mode,
    serial: str,
    chains: int = 3,
    asics: int = 108,
) -> Json:
    hashing = rate_5s_ghs > 0
    fan = [4200, 4230, 4170, 4200] if hashing else [0, 0, 0, 0]
    chain = [
        {
            "index": c,
            "freq_avg": 490 if hashing else 0,
            "rate_ideal": round(rate_ideal_ghs / chains, 2),
            "rate_real": round(rate_5s_ghs / chains, 2),
            "asic_num": asics,
            "temp_pic": [62, 62, 75, 75] if hashing else [25, 25, 25, 25],
            "temp_pcb": [62, 62, 75, 75] if hashing else [25, 25, 25, 25],
            "temp_chip": [67, 67, 80, 80] if hashing else [25, 25, 25, 25],
            "hw": 0,
            "eeprom_loaded": True,
            "sn": f"{serial}C{c}",
            "hwp": 0.0,
        }
        for c in range(chains)
    ]
    item = _rate_fields(rate_5s_ghs, rate_ideal_ghs, elapsed_s) | {
        "chain_num": chains,
        "fan_num": len(fan),
        "fan": fan,
        "hwp_total": 0.0,
        "miner-mode": int(mode),
        "freq-level": 100,
        "chain": chain,
    }
    return _head("stats", when, type_name) | {"STATS": [item]}


def conf_reply(mode: Mode, stored: Json) -> Json:
    """get_miner_conf: what was stored by the last set (pools, fans), the mode as a string."""
    return {
        "pools": stored.get("pools", []),
        "api-listen": True,
        "api-network": True,
        "api-groups": "A:stats:pools:devs:summary:version",
        "api-allow": "A:0/0,W:*",
        "bitmain-fan-ctrl": bool(stored.get("bitmain-fan-ctrl", False)),
        "bitmain-fan-pwm": str(stored.get("bitmain-fan-pwm", "100")),
        "bitmain-use-vil": True,
        "bitmain-freq": "490",
        "bitmain-voltage": "1300",
        "bitmain-ccdelay": "0",
        "bitmain-pwth": "0",
        "bitmain-work-mode": str(int(mode)),
        "bitmain-freq-level": str(stored.get("freq-level", "100")),
    }


def system_info_reply(type_name: str, hostname: str, ip: str, mac: str, serial: str) -> Json:
    return {
        "minertype": type_name,
        "nettype": "DHCP",
        "netdevice": "eth0",
        "macaddr": mac,
        "hostname": hostname,
        "ipaddress": ip,
        "netmask": "255.255.255.0",
        "gateway": "",
        "dnsservers": "",
        "system_mode": "GNU/Linux",
        "system_kernel_version": "Linux 4.9.113 #1 SMP PREEMPT",
        "system_filesystem_version": FIRMWARE_DATE,
        "firmware_type": "Release",
        "Algorithm": "SHA256",
        "serinum": serial,
    }


def set_reply(ok: bool, msg: str = "OK!") -> Json:
    if ok:
        return {"stats": "success", "code": SET_OK_CODE, "msg": msg}
    return {"stats": "error", "code": "M001", "msg": msg}


# --- HTTP digest authentication (RFC 7616 with MD5 and qop "auth", as lighttpd does it) ---


def challenge(nonce: str, *, stale: bool = False) -> str:
    """The WWW-Authenticate header of a 401."""
    header = f'Digest realm="{REALM}", charset="UTF-8", algorithm=MD5, nonce="{nonce}", qop="auth"'
    return header + (", stale=true" if stale else "")


_PAIR = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_authorization(header: str) -> dict[str, str] | None:
    """The parameters of a `Digest ...` Authorization header (None: not digest)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    out = {}
    for m in _PAIR.finditer(rest):
        quoted, bare = m.group(2), m.group(3)
        out[m.group(1).lower()] = (
            quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted is not None else bare
        )
    return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def digest_response(
    username: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
    qop: str = "auth",
    realm: str = REALM,
) -> str:
    """The `response` a client computes (and the server checks) for one request."""
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method.upper()}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


def authorization(
    username: str, password: str, method: str, uri: str, nonce: str, nc: int, cnonce: str
) -> str:
    """An Authorization header answering `nonce` (for clients without a digest library)."""
    ncs = f"{nc:08x}"
    resp = digest_response(username, password, method, uri, nonce, ncs, cnonce)
    return (
        f'Digest username="{username}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
        f'response="{resp}", algorithm=MD5, qop=auth, nc={ncs}, cnonce="{cnonce}"'
    )


def nonce_of(www_authenticate: str) -> str:
    """The nonce of a digest challenge."""
    params = parse_authorization(www_authenticate)
    if not params or not params.get("nonce"):
        raise ProtocolError(f"not a digest challenge: {www_authenticate[:80]!r}")
    return params["nonce"]
