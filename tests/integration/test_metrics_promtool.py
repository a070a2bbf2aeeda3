"""The daemon's real /metrics, served over HTTP, passes `promtool check metrics` silently.

promtool exits 0 even when it prints lint findings (a counter without `_total`, a non-base
unit, a missing HELP), so any output at all is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.app import Daemon
from tests.helpers_prometheus import http_get, promtool, realistic_daemon

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def served() -> Iterator[tuple[Daemon, str]]:
    daemon = realistic_daemon()
    port = daemon.metrics.serve("127.0.0.1", 0)
    try:
        yield daemon, f"http://127.0.0.1:{port}/metrics"
    finally:
        daemon.metrics.close()


def test_promtool_finds_nothing_in_daemon_metrics(served: tuple[Daemon, str]) -> None:
    _, url = served
    text = http_get(url)
    rc, out = promtool("check", "metrics", stdin=text)
    assert rc == 0 and out == "", f"promtool check metrics (exit {rc}):\n{out}"
    # The check ran on the full exposition, not on an empty page.
    body = text.decode()
    for name in (
        "rampd_build_info",
        "rampd_site_power_watts",
        "rampd_site_energy_joules_total",
        "rampd_devices",
        "rampd_device_errors_total",
        "rampd_device_power_watts",
        "rampd_cycle_duration_seconds_bucket",
        "rampd_dispatches_total",
        "rampd_mode",
    ):
        assert f"\n{name}{{" in body or f"\n{name} " in body, f"{name} missing from /metrics"


def test_openmetrics_exposition_is_complete(served: tuple[Daemon, str]) -> None:
    """Prometheus negotiates OpenMetrics: the same families, properly terminated."""
    _, url = served
    body = http_get(url, accept=OPENMETRICS).decode()
    assert body.endswith("# EOF\n")
    assert "# TYPE rampd_build info\n" in body
    assert "# TYPE rampd_site_energy_joules counter\n" in body
    assert "_created" not in body  # no shadow series doubling every counter


def test_promtool_reports_convention_breaches() -> None:
    """The check is not vacuous: promtool does print findings, which the test above rejects."""
    bad = (
        b"# HELP rampd_commands Commands sent\n# TYPE rampd_commands counter\n"
        b"rampd_commands 3\n"
        b"# HELP rampd_power_kilowatts Site power\n# TYPE rampd_power_kilowatts gauge\n"
        b"rampd_power_kilowatts 5\n"
    )
    _, out = promtool("check", "metrics", stdin=bad)
    assert 'counter metrics should have "_total" suffix' in out
    assert out.strip(), "promtool printed nothing for a counter without _total"
