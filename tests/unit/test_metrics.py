"""Metrics: the energy counter, mode, dispatcher timestamps and the scrape-time collectors."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from prometheus_client import generate_latest

from controller.metrics import MODES, Metrics
from drivers.core.state import DeviceState
from tests.helpers_prometheus import realistic_daemon


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_energy_integrates_site_power() -> None:
    m = Metrics("t")
    m.set_site_power(2_000_000.0, 0.1, meter_fresh=True)
    m.set_site_power(1_000_000.0, 0.2, meter_fresh=False)
    assert value(m, "rampd_site_energy_joules_total") == pytest.approx(400_000.0)
    assert value(m, "rampd_site_power_watts") == 1_000_000.0
    assert value(m, "rampd_site_meter_fresh") == 0.0


@pytest.mark.parametrize(
    ("watts", "seconds"), [(math.nan, 0.1), (-5e5, 0.1), (1e6, 0.0), (1e6, math.inf)]
)
def test_energy_counter_never_decreases_or_breaks(watts: float, seconds: float) -> None:
    m = Metrics("t")
    m.add_energy(1e6, 1.0)
    m.add_energy(watts, seconds)
    assert value(m, "rampd_site_energy_joules_total") == 1e6


def test_mode_is_a_state_set() -> None:
    m = Metrics("t")
    assert set(MODES) == {"normal", "released", "failsafe"}
    m.set_mode("failsafe")
    assert {mode: value(m, "rampd_mode", mode=mode) for mode in MODES} == {
        "normal": 0.0,
        "released": 0.0,
        "failsafe": 1.0,
    }


def test_dispatcher_timestamps() -> None:
    m = Metrics("t")
    started = value(m, "rampd_dispatcher_last_seen_timestamp_seconds")
    assert started is not None and started > 1e9  # the silence timer runs from the start
    assert value(m, "rampd_last_dispatch_timestamp_seconds") == 0.0
    m.count_dispatch(False, "stale", now_unix=2e9)  # a rejected dispatch is no sign of life
    assert value(m, "rampd_dispatcher_last_seen_timestamp_seconds") == started
    m.count_dispatch(True, "", now_unix=2e9 + 1)
    assert value(m, "rampd_last_dispatch_timestamp_seconds") == 2e9 + 1
    m.heartbeat_seen(now_unix=2e9 + 5)
    assert value(m, "rampd_dispatcher_last_seen_timestamp_seconds") == 2e9 + 5
    assert value(m, "rampd_last_dispatch_timestamp_seconds") == 2e9 + 1
    assert value(m, "rampd_dispatches_total", result="rejected", reason="stale") == 1.0


def test_collectors_read_drivers_and_fleet_at_scrape_time() -> None:
    d = realistic_daemon()
    m = d.metrics
    luxos = next(drv for drv in d.drivers if drv.name == "luxos")
    luxos.poll_errors += 7  # type: ignore[attr-defined]
    luxos.command_errors += 2  # type: ignore[attr-defined]
    d.meter.errors += 3
    assert value(m, "rampd_device_errors_total", driver="luxos", op="poll") == 7.0
    assert value(m, "rampd_device_errors_total", driver="luxos", op="command") == 2.0
    assert value(m, "rampd_device_errors_total", driver="meter", op="poll") == 3.0
    name, kind = d.image.names[0], d.image.kinds[int(d.image.kind_id[0])]
    port = next(drv.port for drv in d.drivers if 0 in drv.port.rows)
    port.reading(int(np.flatnonzero(port.rows == 0)[0]), 1234.5, DeviceState.ON)
    assert value(m, "rampd_device_power_watts", device=name, kind=kind) == 1234.5
    planned = float(d.cycle.planned_w[0])
    assert value(m, "rampd_device_setpoint_watts", device=name, kind=kind) == planned
    # Registering again replaces rather than duplicates.
    m.watch_drivers(d.drivers)
    m.enable_device_metrics(d.image, lambda: d.cycle.planned_w)
    text = generate_latest(m.registry).decode()
    assert text.count("# TYPE rampd_device_errors_total counter") == 1
    assert text.count("# TYPE rampd_device_power_watts gauge") == 1
    assert 'driver="meter"' not in text  # the second watch_drivers had no meter


def test_no_per_device_series_by_default() -> None:
    text = generate_latest(Metrics("t").registry).decode()
    assert "device=" not in text


async def test_asyncio_tasks_gauge_counts_the_served_loops_live_tasks() -> None:
    m = Metrics("t")
    assert value(m, "rampd_asyncio_tasks") is None  # no loop watched: no sample, not a 0
    port = m.serve("127.0.0.1", 0)  # from the loop: watches it
    try:
        assert port > 0
        before = value(m, "rampd_asyncio_tasks")
        assert before is not None and before >= 1  # this test's own task at least
        gate = asyncio.Event()
        tasks = [asyncio.create_task(gate.wait()) for _ in range(5)]
        assert value(m, "rampd_asyncio_tasks") == before + 5
        gate.set()
        await asyncio.gather(*tasks)
        assert value(m, "rampd_asyncio_tasks") == before  # done tasks do not count
    finally:
        m.close()
