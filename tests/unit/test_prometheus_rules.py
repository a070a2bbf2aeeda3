"""Alerting rules: promtool checks them and runs their unit tests; the example Prometheus
config (which loads them) is valid."""

from __future__ import annotations

from typing import Any

import yaml

from tests.helpers_prometheus import ALERT_RULES, ALERT_TESTS, PROMETHEUS_CONFIG, promtool

REQUIRED = {"RampdTargetMissed", "RampdDispatchSilent", "RampdDevicesFaulted", "RampdCycleOverruns"}


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERT_RULES.read_text())
    return [r for g in data["groups"] for r in g["rules"] if "alert" in r]


def test_rules_check() -> None:
    rc, out = promtool("check", "rules", str(ALERT_RULES))
    assert rc == 0, out
    assert f"SUCCESS: {len(_alerts())} rules found" in out, out


def test_rules_unit_tests_pass() -> None:
    rc, out = promtool("test", "rules", str(ALERT_TESTS))
    assert rc == 0 and "SUCCESS" in out, out


def test_example_prometheus_config_is_valid() -> None:
    rc, out = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert rc == 0, out
    assert "SUCCESS: 1 rule files found" in out, out


def test_alerts_are_complete_and_each_is_tested() -> None:
    alerts = _alerts()
    names = {a["alert"] for a in alerts}
    assert names >= REQUIRED
    for a in alerts:
        assert a["labels"]["severity"] in {"warning", "critical"}, a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names <= tested, f"alerts never seen firing in tests: {sorted(names - tested)}"
