"""The daemon's telemetry message, built from the latest control cycle. No side effects: the
metrics that mirror it are the caller's to update.

Ramp limits bound what the site offers: capability within a horizon is at most what the limits
let the target move within it (the fleet's physics may allow more; the control math in
`controller.control` knows nothing of the limits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from controller.config import RampLimitsConfig, ReserveConfig
from controller.control.step import RESERVE_HORIZON_S
from controller.cycle import CycleOutput
from controller.target import TargetTracker, allowance_w
from controller.wire.telemetry import (
    CapabilityReport,
    CycleReport,
    DeviceCounts,
    RailsReport,
    RampLimitReport,
    ReserveReport,
    ServiceReport,
    SleepReport,
    Telemetry,
)


def ramp_limit_report(tracker: TargetTracker, now_mono: float, now_unix: float) -> RampLimitReport:
    """The telemetry's `ramp_limit` section from the tracker (as of its latest call)."""
    lims = tracker.ramp_limits or RampLimitsConfig()
    by, reach = tracker.limit_state()
    return RampLimitReport(
        lims.up_kw_per_min,
        lims.down_kw_per_min,
        lims.max_change_kw_per_5s,
        by,
        None if reach is None else now_unix + (reach - now_mono),
    )


def limited_capability(
    horizons_s: Sequence[float],
    up_w: Sequence[float],
    down_w: Sequence[float],
    ramp: RampLimitReport | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(up, down) within each horizon, each at most what the ramp limits allow within it."""
    if ramp is None:
        return tuple(up_w), tuple(down_w)
    lims = RampLimitsConfig(
        up_kw_per_min=ramp.up_kw_per_min,
        down_kw_per_min=ramp.down_kw_per_min,
        max_change_kw_per_5s=ramp.max_change_kw_per_5s,
    )
    up = tuple(min(w, allowance_w(lims, h, True)) for h, w in zip(horizons_s, up_w, strict=True))
    down = tuple(
        min(w, allowance_w(lims, h, False)) for h, w in zip(horizons_s, down_w, strict=True)
    )
    return up, down


def build_telemetry(
    out: CycleOutput | None,
    *,
    at: float,
    mode: str,
    devices: Mapping[str, int],
    cycles: int,
    overruns: int,
    reserve: ReserveConfig,
    physical_min_s: float | None,
    ramp_limit: RampLimitReport | None = None,
    hz: float | None = None,
    services: dict[str, ServiceReport] | None = None,
    rails: RailsReport | None = None,
) -> Telemetry:
    """`out`: the latest cycle (None before the first: power is then not reported);
    `physical_min_s`: the fleet's least time to `out.target_w`, None when out of reach;
    `ramp_limit` (`ramp_limit_report`): reported, and caps the capability (and the reserve
    held, its 5 s figures)."""
    counts = DeviceCounts.from_mapping(devices)
    if out is None:
        return Telemetry(at=at, mode=mode, devices=counts)
    cap = out.capability
    up_w, down_w = limited_capability(cap.horizons_s, cap.up_w, cap.down_w, ramp_limit)
    i = cap.horizons_s.index(RESERVE_HORIZON_S)
    return Telemetry(
        at=at,
        mode=mode,
        devices=counts,
        measured_w=out.meter_w if out.meter_fresh else out.result.predicted_site_w,
        measured_source="meter" if out.meter_fresh else "estimate",
        target_w=out.target_w,
        min_w=cap.min_w,
        max_w=cap.max_w,
        noncontrollable_w=out.result.noncontrollable_w,
        capability=CapabilityReport(cap.horizons_s, up_w, down_w),
        saturated=out.result.saturated,
        reserve=ReserveReport(reserve.up_kw_5s, reserve.down_kw_5s, up_w[i], down_w[i]),
        physical_min_s=physical_min_s,
        sleep=SleepReport(out.result.parked, out.result.waking),
        cycle=CycleReport(cycles, overruns),
        ramp_limit=ramp_limit,
        hz=hz,
        services=services,
        rails=rails,
    )
