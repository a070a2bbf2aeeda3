"""The fan-out bench's floor for Whatsminers: bare asyncio, the driver's command frames.

What `WhatsminerDriver` sends for a fleet-wide RUN, without the driver: per miner one
connection carrying `{"enc": 1, "data": ...}` around `set_power_pct` (the percent of the rated
power at or below the burst's value), signed with a token fetched before the clock starts (the
driver fetches its tokens at adoption), the encrypted reply read to the miner's close. Frames
are built before each burst is timed, as the LuxOS floor builds its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from drivers.base import ProtocolError
from drivers.core.spec import DeviceSpec
from drivers.whatsminer import crypto
from drivers.whatsminer import messages as m

if TYPE_CHECKING:
    from controller.tools.bench.fanout import Timed

TOKEN_TIMEOUT_S = 5.0


async def _once(host: str, port: int, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(frame)
        return await reader.read()  # the miner answers one object and closes
    finally:
        writer.close()


async def floor_whatsminer(
    specs: Sequence[DeviceSpec], bursts: int, concurrency: int
) -> list[Timed]:
    # Imported here: fanout imports this module to wire the floor in.
    from controller.tools.bench.fanout import _bounded, _timed, burst_values
    from controller.tools.bench.site_run import BenchError

    n = len(specs)
    tokens: list[crypto.Token | None] = [None] * n
    passwords = [m.password_of(s.access) for s in specs]

    async def get_token(k: int) -> None:
        s = specs[k]
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            raw = await _once(s.host, s.port, m.encode_command("get_token"))
        info = m.parse_token(m.decode_object(raw))
        tokens[k] = crypto.Token.derive(passwords[k], info.salt, info.time_s, info.newsalt)

    try:
        await _bounded(n, concurrency, get_token)
    except (OSError, TimeoutError, ProtocolError) as exc:
        raise BenchError(f"whatsminer floor: get_token failed: {exc}") from None
    held = [t for t in tokens if t is not None]
    if len(held) != n:
        raise BenchError(f"whatsminer floor: {n - len(held)} miners gave no token")

    times = []
    for b in range(bursts):
        values = burst_values(specs, bursts - b)  # the last at the top
        frames = [
            m.encode_privileged(
                held[k],
                "set_power_pct",
                percent=str(m.percent_for(float(values[k]), s.p_max_w)),
            )
            for k, s in enumerate(specs)
        ]

        async def one(frames: list[bytes], k: int) -> None:
            await _once(specs[k].host, specs[k].port, frames[k])

        times.append(await _timed(n, concurrency, functools.partial(one, frames)))
    return times


__all__ = ["floor_whatsminer"]
