"""Power breaches (`grid.powerbreach.alert.v1`): the measured load above a feed's active
target beyond tolerance for longer than the grace.

Lifecycle, one `breach_id` throughout: `active` once the load has stayed above the threshold
(target + tolerance) for `grace_s`; `escalated` once, when it is still open `escalate_after_s`
after detection or has turned critical since; `resolved` when the load has stayed within the
threshold for `resolve_after_s`, or the feed has no constraint any more. Severity by the 20%
rule: critical when the load is more than 20% above the target, warning otherwise. A
best-effort target (`strategy.best_effort`) is never breached: the ISV accepted a
non-compliant feed rather than disruptive shedding, which a breach would ask infrastructure
for. Shed hints name the site's devices in merit order (lower priority first) until their
sheddable power covers the excess.

Pure: no I/O, no clock (callers pass unix time).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from controller.northbound.dsx_flex.config import BreachConfig
from controller.northbound.dsx_flex.power import kilowatts
from controller.northbound.dsx_flex.schedule import Target
from controller.northbound.dsx_flex.status import tolerance_w
from controller.wire.timestamps import rfc3339
from drivers.core.spec import DeviceSpec

Status = Literal["active", "escalated", "resolved"]
Severity = Literal["warning", "critical"]
CRITICAL_OVER: Final = 0.20
MAX_HINTS: Final = 32
MINERS: Final = frozenset({"luxos", "braiins", "whatsminer", "antminer"})
"""Protocols of single machines (a node each); Redfish racks and Modbus rows are chassis."""


@dataclass(frozen=True, slots=True)
class Alert:
    feed: str
    status: Status
    severity: Severity
    breach_id: str
    detected_at: float
    resolved_at: float | None
    target: Target
    measured_w: float

    @property
    def excess_w(self) -> float:
        level = self.target.level_w
        return 0.0 if level is None else max(self.measured_w - level, 0.0)

    def to_wire(self, hints: Sequence[dict[str, Any]], actions: Sequence[str]) -> dict[str, Any]:
        """`PowerBreachAlertData`: hints and actions only while open (the schema's rule)."""
        assert self.target.constraint is not None
        breach: dict[str, Any] = {
            "breach_id": self.breach_id,
            "detected_at": rfc3339(self.detected_at),
        }
        if self.resolved_at is not None:
            breach["resolved_at"] = rfc3339(self.resolved_at)
        out: dict[str, Any] = {
            "feed_tag": self.feed,
            "status": self.status,
            "severity": self.severity,
            "breach": breach,
            "target": {
                "correlation_id": self.target.correlation_id,
                "load_constraint": self.target.constraint.to_wire(),
            },
            "measured_load": kilowatts(self.measured_w),
            "infrastructure_actions": [] if self.status == "resolved" else list(actions),
        }
        if self.status != "resolved":
            out["shed_hints"] = list(hints)
        return out


def severity(measured_w: float, level_w: float) -> Severity:
    return "critical" if measured_w > level_w * (1.0 + CRITICAL_OVER) else "warning"


@dataclass(slots=True)
class _Open:
    breach_id: str
    detected_at: float
    status: Status
    severity: Severity
    target: Target
    below_since: float | None = None


class BreachWatch:
    """One feed's breach state; `step` once per evaluation."""

    def __init__(self, cfg: BreachConfig, feed: str) -> None:
        self.cfg = cfg
        self.feed = feed
        self._above_since: float | None = None
        self._open: _Open | None = None

    @property
    def open(self) -> bool:
        return self._open is not None

    @property
    def breach_id(self) -> str | None:
        return None if self._open is None else self._open.breach_id

    def step(self, now: float, measured_w: float | None, target: Target | None) -> Alert | None:
        """The alert to publish now, if any. `target`: the feed's winner (None: none)."""
        level = None if target is None or target.best_effort else target.level_w
        b = self._open
        if level is None or target is None:
            self._above_since = None
            if b is None:
                return None
            return self._resolve(b, now, measured_w)
        if measured_w is None:
            return None  # no reading: nothing to judge, hold whatever was decided
        threshold = level + tolerance_w(level, self.cfg.tolerance_pct, self.cfg.tolerance_kw * 1e3)
        above = measured_w > threshold
        sev = severity(measured_w, level)
        if b is None:
            if not above:
                self._above_since = None
                return None
            if self._above_since is None:
                self._above_since = now
            if now - self._above_since < self.cfg.grace_s:
                return None
            b = self._open = _Open(str(uuid.uuid4()), now, "active", sev, target)
            return self._alert(b, measured_w, None)
        b.target = target
        if not above:
            if b.below_since is None:
                b.below_since = now
            if now - b.below_since >= self.cfg.resolve_after_s:
                return self._resolve(b, now, measured_w)
            return None
        b.below_since = None
        worse = sev == "critical" and b.severity == "warning"
        if b.status == "active" and (worse or now - b.detected_at >= self.cfg.escalate_after_s):
            b.status, b.severity = "escalated", sev
            return self._alert(b, measured_w, None)
        return None

    def _resolve(self, b: _Open, now: float, measured_w: float | None) -> Alert:
        self._open = None
        self._above_since = None
        level = b.target.level_w or 0.0
        m = level if measured_w is None else measured_w
        b.status = "resolved"
        return Alert(
            self.feed,
            "resolved",
            severity(m, level),
            b.breach_id,
            b.detected_at,
            now,
            b.target,
            m,
        )

    def _alert(self, b: _Open, measured_w: float, resolved_at: float | None) -> Alert:
        return Alert(
            self.feed,
            b.status,
            b.severity,
            b.breach_id,
            b.detected_at,
            resolved_at,
            b.target,
            measured_w,
        )


def _hint(d: DeviceSpec, rank: int) -> tuple[dict[str, Any], float]:
    """(the hint, the power it sheds) for one device."""
    kind = "node" if d.protocol in MINERS else "chassis"
    if d.protocol in MINERS and d.p_idle_w < d.p_min_w:
        hint = {"resource_id": d.name, "resource_type": kind, "action": "suspend", "priority": rank}
        return hint, d.p_max_w - d.p_idle_w
    hint = {
        "resource_id": d.name,
        "resource_type": kind,
        "action": "power_cap",
        "priority": rank,
        "target_power": kilowatts(d.p_min_w),
    }
    return hint, d.p_max_w - d.p_min_w


def shed_hints(devices: Sequence[DeviceSpec], excess_w: float) -> list[dict[str, Any]]:
    """Devices in merit order (priority, then name) until they cover `excess_w`; zones (a
    child site: its own agent) and breakers (an infrastructure action of their own) are not
    hinted."""
    order = sorted(
        (d for d in devices if d.protocol not in ("zone", "breaker") and not d.services_only),
        key=lambda d: (d.priority, d.name),
    )
    out: list[dict[str, Any]] = []
    covered = 0.0
    for d in order:
        if covered >= excess_w or len(out) >= MAX_HINTS:
            break
        hint, shed = _hint(d, len(out) + 1)
        if shed <= 0.0:
            continue
        out.append(hint)
        covered += shed
    return out


def infrastructure_actions(status: Status, severity: Severity, has_breakers: bool) -> list[str]:
    """Least to most disruptive: nodes first; racks once escalated; breakers only when
    escalated, critical and the site has some."""
    if status == "resolved":
        return []
    actions = ["SHUTDOWN_NODES"]
    if status == "escalated":
        actions.append("SHUTDOWN_RACKS")
        if severity == "critical" and has_breakers:
            actions.append("TRIP_BREAKERS")
    return actions
