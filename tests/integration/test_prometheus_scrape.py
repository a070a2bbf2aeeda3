"""A real Prometheus server on loopback scrapes rampd's /metrics; the site power comes back
through its HTTP API, and the alert rules and the dashboard's queries run on what it scraped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.metrics import Metrics
from drivers.core.state import STATE_NAMES
from tests.helpers_prometheus import (
    ALERT_RULES,
    Sample,
    dashboard_exprs,
    load_dashboard,
    prometheus_server,
    realistic_daemon,
    recording_rules,
)


def _value_is(expected: float) -> Callable[[list[Sample]], bool]:
    def check(samples: list[Sample]) -> bool:
        return len(samples) == 1 and samples[0].value == expected

    return check


def test_prometheus_scrapes_site_power(tmp_path: Path) -> None:
    metrics = Metrics("9.9.9-test")
    metrics.set_site_power(1_234_567.0, 0.1, meter_fresh=True)
    metrics.site_target.set(1_250_000.0)
    port = metrics.serve("127.0.0.1", 0)
    try:
        with prometheus_server([f"127.0.0.1:{port}"], tmp_path / "prom") as prom:
            [sample] = prom.wait_for("rampd_site_power_watts", _value_is(1_234_567.0))
            assert sample.labels == {
                "__name__": "rampd_site_power_watts",
                "job": "rampd",
                "instance": f"127.0.0.1:{port}",
            }
            # A live series, not a stale first sample: a new value comes through too.
            metrics.set_site_power(987_654.5, 0.1, meter_fresh=True)
            prom.wait_for("rampd_site_power_watts", _value_is(987_654.5))
            prom.wait_for('rampd_build_info{version="9.9.9-test"}', _value_is(1.0))
            prom.wait_for('up{job="rampd"}', _value_is(1.0))
            targets = prom.api("targets")["activeTargets"]
            assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
    finally:
        metrics.close()


def test_rules_and_dashboard_queries_run_on_scraped_daemon_metrics(tmp_path: Path) -> None:
    """The alert rules load and evaluate without error in a real server, and every dashboard
    query executes against what it scraped from a daemon in a realistic state."""
    dashboard_rules = tmp_path / "dashboard-rules.yml"
    exprs = dashboard_exprs(load_dashboard())
    dashboard_rules.write_text(json.dumps(recording_rules(exprs)))
    n_alerts = ALERT_RULES.read_text().count("- alert:")
    daemon = realistic_daemon()
    port = daemon.metrics.serve("127.0.0.1", 0)
    try:
        with prometheus_server(
            [f"127.0.0.1:{port}"], tmp_path / "prom", rule_files=[ALERT_RULES, dashboard_rules]
        ) as prom:
            prom.wait_for("rampd_devices", lambda s: len(s) == len(STATE_NAMES))

            def all_evaluated(data: Any) -> bool:
                rules = [r for g in data["groups"] for r in g["rules"]]
                return len(rules) == n_alerts + len(exprs) and all(
                    not str(r["lastEvaluation"]).startswith("0001") for r in rules
                )

            data = prom.wait_api("rules", all_evaluated)
            bad = [
                (r["name"], r.get("lastError"))
                for g in data["groups"]
                for r in g["rules"]
                if r["health"] != "ok"
            ]
            assert bad == []
            for _, expr in exprs:
                prom.query(expr)  # raises PrometheusError on a query error
            # The device-state query of the dashboard sees the daemon's fleet.
            states = prom.query("sum by (state) (rampd_devices)")
            assert {s.labels["state"]: s.value for s in states} == daemon.cycle.counts_by_state()
    finally:
        daemon.metrics.close()
