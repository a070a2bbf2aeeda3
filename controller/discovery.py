"""`rampd discover`: find the miners on address ranges, tell their firmware and model by each
firmware's own API, and write the `[[devices]]` stanzas of a site file for them.

Every miner firmware rampd drives answers the cgminer-style JSON API on TCP 4028 (Braiins
OS+ read-only beside its gRPC API, Whatsminer beside its privileged commands): `version` names
the firmware (LUXminer, BOSer/BOSminer, BMMiner for stock Bitmain) and the model (`Type`);
Whatsminer answers `version` with its own `Msg` and names itself in `devdetails` (Driver
"bitmicro"/"btminer", the model in `Model`). A host is scanned with at most two exchanges, each
bounded by the timeout; hosts are scanned concurrently, at most `concurrency` at a time.

The template for a found miner is the shipped (or site-local) one whose protocol is the
firmware's and whose `access.model` is the model the miner reported; a miner without one is
listed in a comment, not in a stanza, so the written file always loads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.base import DriverError
from drivers.cgminer.client import exchange
from drivers.cgminer.wire import encode_request

API_PORT = 4028
MAX_HOSTS = 1 << 20
"""A scan larger than this is refused (a /12): a typo in a prefix length, not a site."""


@dataclass(frozen=True, slots=True)
class Found:
    host: str
    protocol: str
    """The driver that speaks this firmware: luxos, braiins, whatsminer or antminer."""
    firmware: str
    model: str
    template: str | None = None
    p_max_kw: float = 0.0
    """The template's rated power (what the site's max_kw adds up)."""


def hosts_of(cidrs: Iterable[str]) -> list[ipaddress.IPv4Address]:
    """Every host address of the given ranges (a bare address is a /32), in order, once.
    ValueError naming the bad range."""
    out: dict[ipaddress.IPv4Address, None] = {}
    for text in cidrs:
        try:
            net = ipaddress.IPv4Network(text, strict=False)
        except ValueError as exc:
            raise ValueError(f"{text!r}: not an IPv4 address or range ({exc})") from None
        if net.num_addresses > MAX_HOSTS:
            raise ValueError(f"{text!r}: {net.num_addresses} addresses, more than {MAX_HOSTS}")
        for host in net.hosts() if net.num_addresses > 2 else net:
            out[host] = None
    return list(out)


def _first(reply: dict[str, Any], key: str) -> dict[str, Any]:
    items = reply.get(key)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0]
    return {}


def _model(text: str) -> str:
    """The model a template names: 'Antminer S21' -> 'S21'; a Whatsminer's 'M60S_VK30' or
    'M60S.VK30' -> 'M60S' (the chip bin after the model changes nothing rampd uses)."""
    text = re.sub(r"(?i)^\s*antminer\s+", "", str(text)).strip()
    return re.split(r"[._]", text)[0] if re.match(r"(?i)^M\d", text) else text


def classify(version: dict[str, Any], devdetails: dict[str, Any] | None) -> Found | None:
    """What the `version` (and, when needed, `devdetails`) replies say; None: not a miner
    rampd drives. The host is filled in by the caller."""
    v = _first(version, "VERSION")
    d = _first(devdetails or {}, "DEVDETAILS")
    if "LUXminer" in v:
        return Found("", "luxos", f"LuxOS {v['LUXminer']}", _model(v.get("Type", "")))
    if "BOSer" in v or "BOSminer" in v:
        fw = v.get("BOSer") or v.get("BOSminer")
        return Found("", "braiins", f"Braiins OS+ {fw}", _model(d.get("Model", "")))
    if "BMMiner" in v or "bmminer" in v:
        fw = f"Bitmain BMMiner {v.get('BMMiner', '')}".strip()
        return Found("", "antminer", fw, _model(v.get("Type", "")))
    driver = str(d.get("Driver", "")).lower()
    if driver in ("bitmicro", "btminer"):
        msg = version.get("Msg")
        fw = msg.get("fw_ver", "") if isinstance(msg, dict) else ""
        return Found("", "whatsminer", f"Whatsminer {fw}".strip(), _model(d.get("Model", "")))
    return None


async def identify(host: str, timeout_s: float) -> Found | None:
    """One host: None when nothing answers on 4028 or the answer is no miner rampd drives."""
    try:
        version = await exchange(host, API_PORT, encode_request("version"), timeout_s)
        found = classify(version, None)
        if found is None or found.protocol == "braiins":  # the model is in devdetails
            details = await exchange(host, API_PORT, encode_request("devdetails"), timeout_s)
            found = classify(version, details)
    except DriverError:
        return None
    if found is None:
        return None
    return Found(host, found.protocol, found.firmware, found.model)


async def scan(
    hosts: Sequence[ipaddress.IPv4Address], *, concurrency: int = 256, timeout_s: float = 1.0
) -> list[Found]:
    """Every miner among `hosts`, in address order; at most `concurrency` hosts at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(addr: ipaddress.IPv4Address) -> Found | None:
        async with gate:
            return await identify(str(addr), timeout_s)

    results = await asyncio.gather(*(one(h) for h in hosts))
    return [f for f in results if f is not None]


def templates_by_model(dirs: Sequence[Path]) -> dict[tuple[str, str], tuple[str, float]]:
    """(protocol, model in lower case) -> (template name, its p_max_kw), the first directory
    winning."""
    out: dict[tuple[str, str], tuple[str, float]] = {}
    for folder in dirs:
        for path in sorted(folder.glob("*.toml")):
            try:
                raw = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
            model = (raw.get("access") or {}).get("model")
            protocol = raw.get("protocol")
            p_max = raw.get("p_max_kw")
            if isinstance(model, str) and isinstance(protocol, str):
                p_max_kw = float(p_max) if isinstance(p_max, int | float) else 0.0
                out.setdefault((protocol, _model(model).lower()), (path.stem, p_max_kw))
    return out


def with_templates(found: Sequence[Found], dirs: Sequence[Path]) -> list[Found]:
    table = templates_by_model(dirs)
    out = []
    for f in found:
        name, p_max_kw = table.get((f.protocol, f.model.lower()), (None, 0.0))
        out.append(Found(f.host, f.protocol, f.firmware, f.model, name, p_max_kw))
    return out


def _runs(found: Sequence[Found]) -> Iterator[tuple[str, str, int]]:
    """(template, first address, count) over consecutive addresses of one template."""
    ordered = sorted(
        (int(ipaddress.IPv4Address(f.host)), f.template, f.host) for f in found if f.template
    )
    run: list[tuple[int, str, str]] = []
    for item in ordered:
        if run and (item[1] != run[0][1] or item[0] != run[-1][0] + 1):
            yield run[0][1], run[0][2], len(run)
            run = []
        run.append(item)
    if run:
        yield run[0][1], run[0][2], len(run)


def stanzas(found: Sequence[Found]) -> str:
    """The `[[devices]]` stanzas for `found` (templates resolved), one per run of
    consecutive addresses; miners without a template as comments."""
    lines: list[str] = []
    names: dict[str, int] = {}
    by_host = {f.host: f for f in found}
    for template, first, count in _runs(found):
        k = names[template] = names.get(template, 0) + 1
        name = template if k == 1 else f"{template}-{k}"
        f = by_host[first]
        lines += [
            f"# {count} x {f.model} on {f.firmware}, from {first}",
            "[[devices]]",
            f'name = "{name}"',
            f'template = "{template}"',
            f"count = {count}",
            f'address = "{first}"',
            "",
        ]
    for f in found:
        if not f.template:
            lines.append(
                f"# {f.host}: {f.model or 'unknown model'} on {f.firmware}: no template for "
                f"protocol {f.protocol!r} and model {f.model!r}; add one to configs/devices"
            )
    return "\n".join(lines).rstrip() + "\n"


def site_file(found: Sequence[Found], *, site_id: str = "site") -> str:
    """A whole site file for `found` (templates resolved; at least one with a template):
    the stanzas behind the settings every site needs. Review it: the broker and the meter
    are the site's, not discovered; max_kw is the miners' rated power."""
    max_kw = sum(f.p_max_kw for f in found if f.template)
    return (
        f"# Written by `rampd discover`: {len(found)} miners found.\n"
        f'site_id = "{site_id}"\n\n'
        "[mqtt]\n"
        'host = "127.0.0.1"\n'
        "port = 1883\n\n"
        "[site]\n"
        f"max_kw = {max_kw:.1f}\n\n"
        "# The site meter (SunSpec over Modbus TCP) is not discovered: set its address.\n"
        "[meter]\n"
        'host = "127.0.0.1"\n'
        "port = 502\n\n" + stanzas(found)
    )
