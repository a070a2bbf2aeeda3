"""The fan-out bench's floor for stock Antminers: bare asyncio streams, no rampd driver code.

The same request the driver's command path sends (`drivers.antminer.client`): one POST of
set_miner_conf.cgi per miner with the whole configuration read before (the driver reuses the
one its last readback poll read) and the mode changed, digest-authenticated preemptively on a
kept-alive connection (the driver's aiohttp session keeps one per miner and answers each
miner's challenge once). Connections, challenges and configurations are set up before the
clock starts; one burst is one command to every miner, at most `concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from drivers.antminer import web as w

if TYPE_CHECKING:
    from controller.tools.bench.fanout import Timed
    from drivers.core.spec import DeviceSpec

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _exchange(conn: _Conn, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a kept-alive connection: status, headers (lower-case), body."""
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _request(
    spec: DeviceSpec, method: str, path: str, auth: str | None, body: bytes | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {spec.host}:{spec.port}", "Accept: */*"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _login(spec: DeviceSpec) -> tuple[str, str]:
    access = spec.access
    return access.username or w.DEFAULT_USERNAME, access.password or w.DEFAULT_PASSWORD


async def floor_antminer(specs: Sequence[DeviceSpec], bursts: int, concurrency: int) -> list[Timed]:
    # Imported here: the fan-out module imports this one to list its floors.
    from controller.tools.bench.fanout import _bounded, _timed, burst_values
    from controller.tools.bench.site_run import BenchError

    n = len(specs)
    conns: list[_Conn | None] = [None] * n
    nonces = [""] * n
    counts = [0] * n
    confs: list[dict[str, Any]] = [{}] * n

    def auth(k: int, method: str, path: str) -> str:
        user, password = _login(specs[k])
        counts[k] += 1
        cnonce = secrets.token_hex(8)
        return w.authorization(user, password, method, path, nonces[k], counts[k], cnonce)

    async def setup(k: int) -> None:
        s = specs[k]
        conn = conns[k] = await asyncio.open_connection(s.host, s.port)
        status, headers, _ = await _exchange(conn, _request(s, "GET", w.GET_CONF, None))
        if status != 401:
            raise BenchError(f"floor: {s.name} answered {status} without credentials")
        nonces[k] = w.nonce_of(headers.get("www-authenticate", ""))
        req = _request(s, "GET", w.GET_CONF, auth(k, "GET", w.GET_CONF))
        status, _, body = await _exchange(conn, req)
        if status != 200:
            raise BenchError(f"floor: {s.name} refused the login ({status})")
        confs[k] = w.parse_conf(w.decode(body)).raw

    times = []
    try:
        await _bounded(n, concurrency, setup)
        for b in range(bursts):
            values = burst_values(specs, bursts - b)  # the last at the top
            bodies = [
                json.dumps(
                    w.set_body(confs[k], w.Mode.NORMAL if values[k] >= s.p_max_w else w.Mode.LOW)
                ).encode()
                for k, s in enumerate(specs)
            ]

            async def one(bodies: list[bytes], k: int) -> None:
                s = specs[k]
                req = _request(s, "POST", w.SET_CONF, auth(k, "POST", w.SET_CONF), bodies[k])
                status, _, body = await _exchange(conns[k], req)  # type: ignore[arg-type]
                if status != 200:
                    raise BenchError(f"floor: {s.name} answered {status}")
                w.check_set_reply(w.decode(body))

            times.append(await _timed(n, concurrency, functools.partial(one, bodies)))
    finally:
        for c in conns:
            if c is not None:
                with contextlib.suppress(OSError):
                    c[1].close()
    return times


__all__ = ["floor_antminer"]
