"""The telemetry message (every second): power, target, range, capability, reserve, sleep,
devices, cycle. SI units in the model, kW on the wire. Pure, no I/O.

Before the daemon's first control cycle it has nothing to say about power: the message is then
only `at`, `mode` and `devices` (`capability` is None in the model). From the first cycle on,
every field is present, null where unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from controller.wire.ack import RAMP_LIMIT_NAMES, RampLimitName
from controller.wire.codec import (
    WireError,
    decode_object,
    kw,
    optional_choice,
    optional_int,
    optional_number,
    optional_str,
    optional_time,
    optional_w,
    required,
    section,
)
from controller.wire.timestamps import rfc3339

_HORIZON: Final = re.compile(r"(\d+(?:\.\d+)?)s")


def _horizon_key(h: float) -> str:
    return f"{h:g}s"


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    on: int = 0
    sleeping: int = 0
    waking: int = 0
    fault: int = 0
    unknown: int = 0
    unresponsive: int = 0

    @classmethod
    def from_mapping(cls, counts: Mapping[str, int]) -> DeviceCounts:
        """From `counts_by_state()` (the cycle's view); states it does not name count 0."""
        return cls(**{k: int(counts.get(k, 0)) for k in cls.__dataclass_fields__})

    def to_wire(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def total(self) -> int:
        return sum(self.to_wire().values())


@dataclass(frozen=True, slots=True)
class CapabilityReport:
    """Power the site can add (`up_w`) or shed (`down_w`) within each horizon (None: not
    known)."""

    horizons_s: tuple[float, ...]
    up_w: tuple[float | None, ...]
    down_w: tuple[float | None, ...]

    def within(self, horizon_s: float) -> tuple[float | None, float | None]:
        """(up, down) within `horizon_s`; (None, None) when not reported."""
        try:
            i = self.horizons_s.index(horizon_s)
        except ValueError:
            return None, None
        return self.up_w[i], self.down_w[i]

    def to_wire(self) -> dict[str, dict[str, float | None]]:
        keys = [_horizon_key(h) for h in self.horizons_s]
        return {
            "up_kw": {k: kw(v) for k, v in zip(keys, self.up_w, strict=True)},
            "down_kw": {k: kw(v) for k, v in zip(keys, self.down_w, strict=True)},
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> CapabilityReport:
        up, down = section(obj, "up_kw") or {}, section(obj, "down_kw") or {}
        horizons: list[float] = []
        for key in [*up, *down]:
            m = _HORIZON.fullmatch(key)
            if m is None:
                raise WireError(f"capability horizon {key!r} not like '5s'", code="bad_type")
            h = float(m.group(1))
            if h not in horizons:
                horizons.append(h)
        horizons.sort()
        keys = [_horizon_key(h) for h in horizons]
        up_w = tuple(optional_w(up, k) for k in keys)
        down_w = tuple(optional_w(down, k) for k in keys)
        if any(v is not None and v < 0 for v in (*up_w, *down_w)):
            raise WireError("capability negative", code="out_of_range")
        return cls(tuple(horizons), up_w, down_w)


@dataclass(frozen=True, slots=True)
class ReserveReport:
    """The fast reserve asked for (config) and held (reachable within 5 s now)."""

    up_kw_5s: float
    down_kw_5s: float
    up_held_w: float | None
    down_held_w: float | None

    def to_wire(self) -> dict[str, float | None]:
        return {
            "up_kw_5s": self.up_kw_5s,
            "down_kw_5s": self.down_kw_5s,
            "up_held_kw": kw(self.up_held_w),
            "down_held_kw": kw(self.down_held_w),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ReserveReport:
        return cls(
            up_kw_5s=required(optional_number(obj, "up_kw_5s"), "reserve up_kw_5s"),
            down_kw_5s=required(optional_number(obj, "down_kw_5s"), "reserve down_kw_5s"),
            up_held_w=optional_w(obj, "up_held_kw"),
            down_held_w=optional_w(obj, "down_held_kw"),
        )


@dataclass(frozen=True, slots=True)
class RampLimitReport:
    """The ramp limits configured (kW; None: no limit), the one slowing the target now (None:
    none is), and when the target reaches where it is heading (unix s; None unless limited)."""

    up_kw_per_min: float | None = None
    down_kw_per_min: float | None = None
    max_change_kw_per_5s: float | None = None
    limited_by: RampLimitName | None = None
    reach_at: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "up_kw_per_min": self.up_kw_per_min,
            "down_kw_per_min": self.down_kw_per_min,
            "max_change_kw_per_5s": self.max_change_kw_per_5s,
            "limited_by": self.limited_by,
            "reach_at": None if self.reach_at is None else rfc3339(self.reach_at),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> RampLimitReport:
        limits = [optional_number(obj, k) for k in RAMP_LIMIT_NAMES]
        if any(v is not None and v <= 0 for v in limits):
            raise WireError("ramp_limit limits must be > 0 or null", code="out_of_range")
        up, down, window = limits
        by = optional_choice(obj, "limited_by", RAMP_LIMIT_NAMES)
        return cls(up, down, window, cast(RampLimitName | None, by), optional_time(obj, "reach_at"))


@dataclass(frozen=True, slots=True)
class ServiceReport:
    """One frequency service: what is armed, what could shed within its deadline now, and
    whether it is deployed (since when, unix s)."""

    armed_w: float
    max_armable_w: float
    deployed: bool
    since: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "armed_kw": kw(self.armed_w),
            "max_armable_kw": kw(self.max_armable_w),
            "deployed": self.deployed,
            "since": None if self.since is None else rfc3339(self.since),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ServiceReport:
        deployed = obj.get("deployed")
        if not isinstance(deployed, bool):
            raise WireError("services deployed must be true or false", code="bad_type")
        return cls(
            armed_w=required(optional_w(obj, "armed_kw"), "services armed_kw"),
            max_armable_w=required(optional_w(obj, "max_armable_kw"), "services max_armable_kw"),
            deployed=deployed,
            since=optional_time(obj, "since"),
        )


@dataclass(frozen=True, slots=True)
class RailsReport:
    """Which rail governs the target and why, what each rail asks (None: not active), the
    power price in force and each class's breakeven and curtailed share."""

    governing: str
    reason: str
    wishes_w: dict[str, float | None]
    price_usd_per_mwh: float | None = None
    price_interval_start: float | None = None
    price_stale: bool = False
    breakeven_usd_per_mwh: dict[str, float] = field(default_factory=dict)
    curtailed: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """Top-level fields of the telemetry message."""
        price = (
            None
            if self.price_usd_per_mwh is None
            else {
                "usd_per_mwh": self.price_usd_per_mwh,
                "interval_start": None
                if self.price_interval_start is None
                else rfc3339(self.price_interval_start),
                "stale": self.price_stale,
            }
        )
        breakeven = {k: round(v, 2) for k, v in self.breakeven_usd_per_mwh.items()}
        return {
            "governing": self.governing,
            "governing_reason": self.reason,
            "rails": {k: kw(w) for k, w in self.wishes_w.items()},
            "price": price,
            "economics": {
                "breakeven_usd_per_mwh": breakeven,
                "curtailed": {k: round(v, 3) for k, v in self.curtailed.items()},
            },
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> RailsReport | None:
        governing = optional_str(obj, "governing")
        if governing is None:
            return None
        rails = section(obj, "rails") or {}
        price = section(obj, "price")
        econ = section(obj, "economics") or {}
        stale = False if price is None else price.get("stale")
        if not isinstance(stale, bool):
            raise WireError("price stale must be true or false", code="bad_type")
        return cls(
            governing=governing,
            reason=optional_str(obj, "governing_reason") or "",
            wishes_w={str(k): optional_w(rails, k) for k in rails},
            price_usd_per_mwh=None if price is None else optional_number(price, "usd_per_mwh"),
            price_interval_start=None if price is None else optional_time(price, "interval_start"),
            price_stale=stale,
            breakeven_usd_per_mwh=_numbers(econ, "breakeven_usd_per_mwh"),
            curtailed=_numbers(econ, "curtailed"),
        )


def _numbers(obj: Mapping[str, Any], key: str) -> dict[str, float]:
    inner = section(obj, key) or {}
    out = {str(k): optional_number(inner, k) for k in inner}
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, slots=True)
class SleepReport:
    parked: int
    """Devices told to sleep (asleep or on their way)."""
    waking: int
    """Devices told to wake, not running yet."""

    def to_wire(self) -> dict[str, int]:
        return {"parked": self.parked, "waking": self.waking}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> SleepReport:
        return cls(
            parked=required(optional_int(obj, "parked"), "sleep parked"),
            waking=required(optional_int(obj, "waking"), "sleep waking"),
        )


@dataclass(frozen=True, slots=True)
class CycleReport:
    count: int
    overruns: int

    def to_wire(self) -> dict[str, int]:
        return {"count": self.count, "overruns": self.overruns}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> CycleReport:
        return cls(
            count=required(optional_int(obj, "count"), "cycle count"),
            overruns=required(optional_int(obj, "overruns"), "cycle overruns"),
        )


@dataclass(frozen=True, slots=True)
class Telemetry:
    at: float
    """Unix seconds."""
    mode: str
    devices: DeviceCounts = field(default_factory=DeviceCounts)
    measured_w: float | None = None
    """The meter's reading, or the device model's estimate when the meter is stale."""
    measured_source: str | None = None
    """"meter" or "estimate"."""
    target_w: float | None = None
    min_w: float | None = None
    max_w: float | None = None
    noncontrollable_w: float | None = None
    capability: CapabilityReport | None = None
    saturated: int | None = None
    """-1 target below what is reachable this cycle, +1 above, 0 reachable."""
    reserve: ReserveReport | None = None
    physical_min_s: float | None = None
    """Least time to the current target (0: there; None: out of reach)."""
    sleep: SleepReport | None = None
    cycle: CycleReport | None = None
    ramp_limit: RampLimitReport | None = None
    hz: float | None = None
    """Grid frequency, the latest plausible reading (None: no fresh one)."""
    services: dict[str, ServiceReport] | None = None
    rails: RailsReport | None = None

    @property
    def started(self) -> bool:
        """The daemon has run a control cycle: the power fields mean something."""
        return self.capability is not None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object as published."""
        if self.capability is None:
            return {"at": rfc3339(self.at), "mode": self.mode, "devices": self.devices.to_wire()}
        return {
            "at": rfc3339(self.at),
            "measured_kw": kw(self.measured_w),
            "measured_source": self.measured_source,
            "target_kw": kw(self.target_w),
            "min_kw": kw(self.min_w),
            "max_kw": kw(self.max_w),
            "noncontrollable_kw": kw(self.noncontrollable_w),
            "capability": self.capability.to_wire(),
            "devices": self.devices.to_wire(),
            "mode": self.mode,
            "saturated": self.saturated,
            "reserve": None if self.reserve is None else self.reserve.to_wire(),
            "physical_min_s": self.physical_min_s,
            "sleep": None if self.sleep is None else self.sleep.to_wire(),
            "cycle": None if self.cycle is None else self.cycle.to_wire(),
            "ramp_limit": None if self.ramp_limit is None else self.ramp_limit.to_wire(),
            "hz": self.hz,
            "services": None
            if self.services is None
            else {name: s.to_wire() for name, s in self.services.items()},
        } | ({} if self.rails is None else self.rails.to_wire())

    def encode(self) -> bytes:
        return json.dumps(self.to_wire()).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Telemetry:
        """WireError (a ValueError) when a field is not what the protocol says; unknown
        fields are ignored."""
        obj = decode_object(payload)
        at = required(optional_time(obj, "at"), "at")
        mode = required(optional_str(obj, "mode"), "mode")
        devices = section(obj, "devices")
        counts = DeviceCounts()
        if devices is not None:
            bad = [k for k, v in devices.items() if isinstance(v, bool) or not isinstance(v, int)]
            if bad:
                raise WireError(f"devices {bad[0]} must be an integer", code="bad_type")
            counts = DeviceCounts.from_mapping(devices)
        lo, hi = optional_w(obj, "min_kw"), optional_w(obj, "max_kw")
        if lo is not None and hi is not None and lo > hi:
            raise WireError("min_kw above max_kw", code="out_of_range")
        pm = optional_number(obj, "physical_min_s")
        if pm is not None and pm < 0:
            raise WireError("physical_min_s must be >= 0 or null", code="out_of_range")
        cap, reserve = section(obj, "capability"), section(obj, "reserve")
        sleep, cycle = section(obj, "sleep"), section(obj, "cycle")
        ramp_limit = section(obj, "ramp_limit")
        services = section(obj, "services")
        saturated = optional_int(obj, "saturated")
        hz = optional_number(obj, "hz")
        return cls(
            at=at,
            mode=mode,
            devices=counts,
            measured_w=optional_w(obj, "measured_kw"),
            measured_source=optional_str(obj, "measured_source"),
            target_w=optional_w(obj, "target_kw"),
            min_w=lo,
            max_w=hi,
            noncontrollable_w=optional_w(obj, "noncontrollable_kw"),
            capability=None if cap is None else CapabilityReport.from_wire(cap),
            saturated=saturated,
            reserve=None if reserve is None else ReserveReport.from_wire(reserve),
            physical_min_s=pm,
            sleep=None if sleep is None else SleepReport.from_wire(sleep),
            cycle=None if cycle is None else CycleReport.from_wire(cycle),
            ramp_limit=None if ramp_limit is None else RampLimitReport.from_wire(ramp_limit),
            hz=hz,
            services=None
            if services is None
            else {str(k): ServiceReport.from_wire(_obj(v, k)) for k, v in services.items()},
            rails=RailsReport.from_wire(obj),
        )


def _obj(v: object, name: object) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise WireError(f"services {name} must be an object", code="bad_type")
    return v
