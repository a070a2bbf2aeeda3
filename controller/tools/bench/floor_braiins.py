"""The fan-out bench's floor for Braiins OS+ miners: bare grpclib calls, no rampd driver code.

The same request the driver's command path sends (`drivers.braiins.client`): one
`PerformanceService/SetPowerTarget` per miner (the target in whole watts, saved and applied),
with the miner's token in the "authorization" metadata, on a held HTTP/2 channel per miner (the
driver holds one per miner and logs in at adoption). Channels and tokens are set up before the
clock starts; one burst is one command to every miner, at most `concurrency` in flight.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grpclib.client import Channel, UnaryUnaryMethod

from drivers.braiins import api
from drivers.braiins.api import pb

if TYPE_CHECKING:
    from controller.tools.bench.fanout import Timed
    from drivers.core.spec import DeviceSpec

_SetPowerTarget = UnaryUnaryMethod[pb.SetPowerTargetRequest, pb.SetPowerTargetResponse]


async def floor_braiins(specs: Sequence[DeviceSpec], bursts: int, concurrency: int) -> list[Timed]:
    from controller.tools.bench.fanout import _bounded, _timed, burst_values
    from controller.tools.bench.site_run import BenchError

    n = len(specs)
    channels = [Channel(s.host, s.port) for s in specs]
    methods: list[_SetPowerTarget] = [
        UnaryUnaryMethod(
            c, api.SET_POWER_TARGET, pb.SetPowerTargetRequest, pb.SetPowerTargetResponse
        )
        for c in channels
    ]
    metadata: list[tuple[tuple[str, str], ...]] = [()] * n

    async def login(k: int) -> None:
        user, password = api.credentials(specs[k].access)
        method = UnaryUnaryMethod(channels[k], api.LOGIN, pb.LoginRequest, pb.LoginResponse)
        reply = await method(pb.LoginRequest(username=user, password=password), timeout=10.0)
        metadata[k] = ((api.AUTH_METADATA, reply.token),)

    times = []
    try:
        await _bounded(n, concurrency, login)
        for b in range(bursts):
            values = burst_values(specs, bursts - b)  # the last at the top
            reqs = [
                api.set_power_target_request(round(min(max(float(v), s.p_min_w), s.p_max_w)))
                for v, s in zip(values, specs, strict=True)
            ]

            async def one(reqs: list[pb.SetPowerTargetRequest], k: int) -> None:
                reply = await methods[k](reqs[k], metadata=metadata[k])
                if reply.power_target.watt != reqs[k].power_target.watt:
                    raise BenchError(f"floor: {specs[k].name} answered {reply.power_target.watt} W")

            times.append(await _timed(n, concurrency, functools.partial(one, reqs)))
    finally:
        for c in channels:
            c.close()
    return times


__all__ = ["floor_braiins"]
