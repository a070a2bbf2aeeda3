"""DSX Flex breaches: grace, one breach id through active -> escalated -> resolved, the 20%
rule, best effort, shed hints in merit order; and the ramp events and compliance."""

from __future__ import annotations

from typing import Any

from controller.northbound.dsx_flex.breach import (
    BreachWatch,
    infrastructure_actions,
    severity,
    shed_hints,
)
from controller.northbound.dsx_flex.config import BreachConfig
from controller.northbound.dsx_flex.power import Power
from controller.northbound.dsx_flex.schedule import Target
from controller.northbound.dsx_flex.status import Bounds, RampTracker, calculated_load_w
from controller.wire.telemetry import RailsReport, Telemetry
from tests.helpers import device_spec

CFG = BreachConfig(
    tolerance_pct=2.0, tolerance_kw=10.0, grace_s=5.0, escalate_after_s=20.0, resolve_after_s=3.0
)


def tgt(kw: float | None, best_effort: bool = False, cid: str = "c1") -> Target:
    c = None if kw is None else Power(kw, "kilowatt")
    return Target("a", 0.0, None, c, best_effort, cid, "acme", 0.0, 1)


def run(w: BreachWatch, t0: float, t1: float, kw: float, target: Target | None) -> list[Any]:
    out = []
    t = t0
    while t < t1:
        a = w.step(t, kw * 1e3, target)
        if a is not None:
            out.append((t, a.status, a.severity, a.breach_id))
        t += 0.5
    return out


def test_lifecycle_with_one_id_escalation_by_time_and_resolution() -> None:
    w = BreachWatch(CFG, "a")
    t = tgt(500.0)
    assert run(w, 0, 30, 509.0, t) == []  # within max(2%, 10 kW): not a breach
    got = run(w, 30, 100, 540.0, t)  # 8% above: warning
    assert [(s, sev) for _, s, sev, _ in got] == [("active", "warning"), ("escalated", "warning")]
    assert got[0][0] == 35.0  # the grace, from when it went above
    assert got[1][0] == 55.0  # escalate_after_s after detection
    ids = {g[3] for g in got}
    back = run(w, 100, 110, 505.0, t)
    assert [(s, i) for _, s, _, i in back] == [("resolved", got[0][3])]
    assert back[0][0] == 103.0 and len(ids) == 1
    # A new breach is a new id.
    again = run(w, 110, 120, 540.0, t)
    assert again and again[0][3] != got[0][3]


def test_blips_do_not_breach_and_turning_critical_escalates() -> None:
    w = BreachWatch(CFG, "a")
    t = tgt(500.0)
    for start in (0, 10, 20):  # above for 4 s at a time, below between
        assert run(w, start, start + 4, 560.0, t) == []
        assert run(w, start + 4, start + 10, 480.0, t) == []
    got = run(w, 30, 40, 560.0, t) + run(w, 40, 45, 650.0, t)
    assert [(s, sev) for _, s, sev, _ in got] == [("active", "warning"), ("escalated", "critical")]


def test_the_20_percent_rule() -> None:
    assert severity(600e3, 500e3) == "warning"
    assert severity(600.1e3, 500e3) == "critical"


def test_no_breach_under_best_effort_and_a_removed_target_resolves() -> None:
    w = BreachWatch(CFG, "a")
    assert run(w, 0, 60, 900.0, tgt(500.0, best_effort=True)) == []
    got = run(w, 60, 70, 900.0, tgt(500.0))
    assert [s for _, s, _, _ in got] == ["active"]
    a = w.step(71.0, 900e3, None)
    assert a is not None and a.status == "resolved" and a.resolved_at == 71.0
    assert not w.open


def test_shed_hints_follow_merit_order_until_the_excess_is_covered() -> None:
    devices = [
        device_spec(
            name="s21-b", protocol="luxos", priority=1, p_max_w=3500, p_min_w=1000, p_idle_w=50
        ),
        device_spec(
            name="s21-a", protocol="luxos", priority=1, p_max_w=3500, p_min_w=1000, p_idle_w=50
        ),
        device_spec(
            name="gpu-1",
            protocol="redfish",
            priority=0,
            p_max_w=10_000,
            p_min_w=4000,
            setpoint_is_cap=True,
        ),
        device_spec(name="zone-x", protocol="zone", priority=0),
        device_spec(name="breaker", protocol="breaker", priority=0, services_only=True),
    ]
    hints = shed_hints(devices, 8000.0)
    assert [(h["resource_id"], h["action"], h["priority"]) for h in hints] == [
        ("gpu-1", "power_cap", 1),
        ("s21-a", "suspend", 2),
    ]
    assert hints[0]["resource_type"] == "chassis" and hints[1]["resource_type"] == "node"
    assert hints[0]["target_power"] == {"value": 4.0, "unit": "kilowatt"}
    assert len(shed_hints(devices, 1e9)) == 3  # all it has; zones and breakers never


def test_infrastructure_actions_escalate_least_disruptive_first() -> None:
    assert infrastructure_actions("active", "critical", True) == ["SHUTDOWN_NODES"]
    assert infrastructure_actions("escalated", "warning", True) == [
        "SHUTDOWN_NODES",
        "SHUTDOWN_RACKS",
    ]
    assert infrastructure_actions("escalated", "critical", True)[-1] == "TRIP_BREAKERS"
    assert infrastructure_actions("escalated", "critical", False)[-1] == "SHUTDOWN_RACKS"
    assert infrastructure_actions("resolved", "critical", True) == []


# -- ramp events and the calculated load --------------------------------------------------------


def test_ramp_events_start_on_a_change_and_end_on_arrival() -> None:
    r = RampTracker()
    assert r.change(600e3, 10.0) == "start_ramp_down" and r.event_start == 10.0
    assert r.judge(900e3, 600e3, 12e3) is None and r.in_flight
    assert r.judge(611e3, 600e3, 12e3) == "end_ramp_down" and not r.in_flight
    assert r.change(400e3, 20.0) == "start_ramp_down" and r.event_start == 10.0  # same event
    assert r.change(700e3, 30.0) == "start_ramp_up"
    assert r.judge(690e3, 700e3, 14e3) == "end_ramp_up" and r.event_start == 10.0
    assert r.change(None, 40.0) == "start_ramp_up"
    assert r.judge(None, 1000e3, 20e3) is None  # no reading, no verdict
    assert r.judge(990e3, 1000e3, 20e3) == "end_ramp_up" and r.event_start is None


def tel(target_kw: float, governing: str, **wishes: float | None) -> Telemetry:
    return Telemetry(
        at=0.0,
        mode="normal",
        target_w=target_kw * 1e3,
        min_w=200e3,
        max_w=1000e3,
        rails=RailsReport(
            governing, "", {k: None if v is None else v * 1e3 for k, v in wishes.items()}
        ),
    )


def test_the_calculated_load_is_where_the_rails_take_the_site_within_reach() -> None:
    b = Bounds(200e3, 1000e3, 1000e3)
    lower = tel(900, "default", default=1000, price=None, dsx_flex=None)
    assert calculated_load_w(lower, 600e3, b) == 600e3
    assert calculated_load_w(lower, None, b) == 1000e3
    assert calculated_load_w(lower, 100e3, b) == 200e3  # below reach: the minimum
    priced = tel(700, "price", default=1000, price=500, dsx_flex=600)
    assert calculated_load_w(priced, 600e3, b) == 500e3  # a lower rail below it governs
    dispatched = tel(850, "dispatch", default=1000, dsx_flex=600)
    assert calculated_load_w(dispatched, 600e3, b) == 850e3  # the grid dispatch above it
