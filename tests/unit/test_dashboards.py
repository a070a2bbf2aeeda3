"""The Grafana dashboard and its provisioning: structure, and every query parses (promtool)
and names only metrics rampd exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.metrics import Metrics
from tests.helpers_prometheus import (
    ALERT_RULES,
    REPO,
    dashboard_exprs,
    dashboard_panels,
    load_dashboard,
    promtool,
    realistic_daemon,
    recording_rules,
)

GRAFANA = REPO / "configs" / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_dashboard_header_and_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 42
    assert dashboard["uid"] == "rampd" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # Other variables query through the chosen datasource too.
    for name, var in variables.items():
        if name != "datasource" and var["type"] == "query":
            assert var["datasource"] == DATASOURCE, name


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = dashboard_panels(dashboard)
    assert panels
    for panel in panels:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), where
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == DATASOURCE, annotation["name"]


def test_panel_ids_unique_and_layout_fits_the_grid(dashboard: dict[str, Any]) -> None:
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"}, p["id"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in "hwxy"), p["id"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["id"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), p["id"])
                assert other == p["id"], f"panels {other} and {p['id']} overlap at {(x, y)}"


def test_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    text = "\n".join(expr for _, expr in dashboard_exprs(dashboard))
    for needed in (
        "rampd_site_target_watts",
        "rampd_site_power_watts",  # target vs measured, tracking error
        'rampd_capability_watts{instance=~".*", direction="up"}',
        'rampd_capability_watts{instance=~".*", direction="down"}',
        "sum by (state) (rampd_devices",
        "histogram_quantile(0.99, sum by (instance, le) (rate(rampd_cycle_duration_seconds_bucket",
        "rampd_cycle_overruns_total",
        "sum by (driver, le) (rate(rampd_command_duration_seconds_bucket",
        "sum by (result, reason)",
    ):
        assert needed in text, needed


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every panel's PromQL, variables filled in, as recording rules: promtool parses them."""
    exprs = dashboard_exprs(dashboard)
    assert all("$" not in expr for _, expr in exprs), [e for e in exprs if "$" in e[1]]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(json.dumps(recording_rules(exprs), indent=2))
    rc, out = promtool("check", "rules", str(rules))
    assert rc == 0, out
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The parse check above is not vacuous."""
    rules = tmp_path / "bad.yml"
    rules.write_text(json.dumps(recording_rules([("x", "sum by (le (rate(x[1m]))")])))
    rc, out = promtool("check", "rules", str(rules))
    assert rc != 0 and "parse error" in out, out


def _exported_names(metrics: Metrics) -> set[str]:
    """Every series name the registry can expose, from each family's name and type."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum", ""),
        "info": ("_info",),
    }
    names = set()
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def _referenced(expr: str) -> set[str]:
    return set(re.findall(r"\brampd_[a-z0-9_]+\b", expr)) - {
        n for n in re.findall(r"\brampd_[a-z0-9_]+:[a-z0-9_:]+", expr)
    }


def test_queries_and_alerts_name_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """PromQL parses any name; a typo would just show "no data". Check the names instead."""
    exported = _exported_names(realistic_daemon().metrics)
    used = {n for _, expr in dashboard_exprs(dashboard) for n in _referenced(expr)}
    alerts = yaml.safe_load(ALERT_RULES.read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            used |= _referenced(rule["expr"])
    assert used, "no rampd_ metric referenced at all"
    assert used <= exported, f"not exported by rampd: {sorted(used - exported)}"


def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "rampd.yaml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http")
    dash = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rampd.yaml").read_text())
    assert dash["apiVersion"] == 1
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
