"""What a northbound interface gets from the daemon, and the ones a site file enables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from controller.config import LoadedConfig
from controller.journal import Journal
from controller.market.rails import Rails
from controller.metrics import Metrics
from controller.row_ceilings import RowCeilings
from controller.wire.telemetry import Telemetry
from drivers.core.image import ProcessImage
from drivers.core.state import F64, DeviceState


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as the daemon sees it now (a zone: what its own telemetry said)."""

    measured_w: float | None
    """Its latest reading; None when it has none fresh (never read, stale, FAULT)."""
    planned_w: float
    """The latest cycle's setpoint for it (p_max before the first cycle)."""
    min_w: float
    max_w: float
    """Its bounds now (a zone's, learned from its reported capability)."""
    rated_w: float
    """Its configured p_max."""

    @classmethod
    def of(
        cls, image: ProcessImage, planned_w: F64, name: str, now: float, max_age_s: float
    ) -> DeviceView | None:
        """`name` in `image` (None: no such device); `now` on the monotonic clock."""
        try:
            row = image.names.index(name)
        except ValueError:
            return None
        at = float(image.measured_at[row])
        fresh = now - at <= max_age_s and image.state[row] != DeviceState.FAULT  # NaN: never
        return cls(
            measured_w=float(image.measured_w[row]) if fresh else None,
            planned_w=float(planned_w[row]),
            min_w=float(image.p_min_w[row]),
            max_w=float(image.p_max_w[row]),
            rated_w=image.specs[row].p_max_w,
        )


def _no_devices(name: str) -> DeviceView | None:
    return None


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
    ceilings: RowCeilings = field(default_factory=RowCeilings)
    """Caps on single devices' setpoints, which the control cycle applies (a zone feed)."""
    device: Callable[[str], DeviceView | None] = _no_devices
    """A device by name as the daemon sees it now (its current image)."""


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
