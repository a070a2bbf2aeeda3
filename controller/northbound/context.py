"""What a northbound interface gets from the daemon, and the ones a site file enables."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from controller.config import LoadedConfig
from controller.journal import Journal
from controller.market.rails import Rails
from controller.metrics import Metrics
from controller.wire.telemetry import Telemetry


@dataclass(frozen=True, slots=True)
class NorthboundContext:
    """What an interface gets from the daemon."""

    cfg: LoadedConfig
    rails: Rails
    """`rails.set_ceiling("dsx_flex" | "openadr", level_w or None, reason)`."""
    telemetry: Callable[[], Telemetry]
    """The telemetry message for now (measured power, capability, governing rail)."""
    journal: Journal | None
    metrics: Metrics


class Northbound(Protocol):
    name: str

    async def run(self) -> None:
        """Run until cancelled (reconnecting on its own); never raises for a peer's fault."""
        ...


def build(ctx: NorthboundContext) -> list[Northbound]:
    """The interfaces the site file enables."""
    out: list[Northbound] = []
    site = ctx.cfg.site
    if site.dsx_flex is not None:
        from controller.northbound.dsx_flex.agent import DsxFlexAgent

        out.append(DsxFlexAgent(ctx))
    if site.openadr is not None:
        from controller.northbound.openadr.ven import Ven

        out.append(Ven(ctx))
    return out
