"""The daemon's telemetry message, built from the latest control cycle. No side effects: the
metrics that mirror it are the caller's to update."""

from __future__ import annotations

from collections.abc import Mapping

from controller.config import ReserveConfig
from controller.control.step import RESERVE_HORIZON_S
from controller.cycle import CycleOutput
from controller.wire.telemetry import (
    CapabilityReport,
    CycleReport,
    DeviceCounts,
    ReserveReport,
    SleepReport,
    Telemetry,
)


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
) -> Telemetry:
    """`out`: the latest cycle (None before the first: power is then not reported);
    `physical_min_s`: the fleet's least time to `out.target_w`, None when out of reach."""
    counts = DeviceCounts.from_mapping(devices)
    if out is None:
        return Telemetry(at=at, mode=mode, devices=counts)
    cap = out.capability
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
        capability=CapabilityReport(cap.horizons_s, cap.up_w, cap.down_w),
        saturated=out.result.saturated,
        reserve=ReserveReport(reserve.up_kw_5s, reserve.down_kw_5s, cap.up_w[i], cap.down_w[i]),
        physical_min_s=physical_min_s,
        sleep=SleepReport(out.result.parked, out.result.waking),
        cycle=CycleReport(cycles, overruns),
    )
