"""The simulated grid frequency (drivers/sim/grid.py): noise statistics, hold, trace replay
mapped per unit onto the site's nominal, interpolation, the end of a trace."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from drivers.core.spec import DeviceSpec
from drivers.sim.grid import (
    FAST_SIGMA_HZ,
    SIGMA_HZ,
    TAU_S,
    FrequencyTrace,
    GridFrequency,
    GridMode,
    TraceError,
)
from drivers.sim.physics import SitePhysics
from tests.helpers import device_spec

DT = 0.02
GB_2019 = Path(__file__).resolve().parents[2] / "bench/data/grid_frequency_gb_2019-08-09_1s.csv"
"""Real GB frequency (see bench/data/README.md)."""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run(grid: GridFrequency, seconds: float, dt: float = DT) -> np.ndarray:
    return np.array([grid.step(dt) for _ in range(round(seconds / dt))])


def test_noise_wanders_around_nominal_with_the_configured_spread_and_memory() -> None:
    grid = GridFrequency(60.0, seed=7)
    hz = run(grid, 3600.0)  # 120 time constants
    dev = hz - 60.0
    assert abs(dev.mean()) < 0.01  # a few sigma / sqrt(120 independent stretches)
    total = math.hypot(SIGMA_HZ, FAST_SIGMA_HZ)
    assert 0.7 * total < dev.std() < 1.3 * total
    assert np.abs(dev).max() < 6 * total
    # The slow part has memory of tens of seconds: one-second means correlate over 10 s as
    # exp(-10 / tau); the fast part does not.
    sec = dev.reshape(-1, round(1 / DT)).mean(axis=1)
    lag = round(10.0)
    r = float(np.corrcoef(sec[:-lag], sec[lag:])[0, 1])
    assert math.exp(-lag / TAU_S) - 0.2 < r < math.exp(-lag / TAU_S) + 0.2
    # Sample to sample, only the fast noise (~2 mHz) and a tiny slow increment move it.
    step = np.diff(dev).std()
    assert 0.7 * math.sqrt(2) * FAST_SIGMA_HZ < step < 1.3 * math.sqrt(2) * FAST_SIGMA_HZ


def test_noise_is_around_a_50_hz_nominal_too_and_seeded() -> None:
    a, b = GridFrequency(50.0, seed=3), GridFrequency(50.0, seed=3)
    ha, hb = run(a, 60.0), run(b, 60.0)
    assert np.array_equal(ha, hb)
    assert abs(float(ha.mean()) - 50.0) < 0.1


def test_hold_is_exact_until_noise_is_asked_for() -> None:
    grid = GridFrequency(60.0, seed=1)
    run(grid, 5.0)
    grid.hold(59.8)
    assert grid.hz == 59.8  # at once, before any step
    assert set(run(grid, 2.0).tolist()) == {59.8}
    assert grid.status()["mode"] == "hold"
    grid.noise()
    assert grid.mode is GridMode.NOISE and grid.hz == 60.0
    assert np.abs(run(grid, 1.0) - 60.0).max() < 0.05  # the wander restarts from nominal
    for bad in (math.nan, math.inf, 0.0, 50.0, 67.0):
        with pytest.raises(ValueError):
            grid.hold(bad)
    assert grid.mode is GridMode.NOISE


def test_a_50_hz_trace_replays_per_unit_on_a_60_hz_site_interpolated(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "t_s,hz\n0,50.0\n1,49.5\n3,49.5\n4,50.1\n")
    trace = FrequencyTrace.load(path, 50.0)
    assert trace.duration_s == 4.0
    grid = GridFrequency(60.0, seed=0)
    grid.replay(trace)
    assert grid.hz == pytest.approx(60.0)  # the first sample, at once
    hz = run(grid, 4.0)
    t = DT * np.arange(1, len(hz) + 1)
    # 49.5 Hz on 50 is -1 %: 59.4 Hz on 60; linear in between the 1 s samples.
    expected = 60.0 * (1 + (np.interp(t, [0, 1, 3, 4], [50.0, 49.5, 49.5, 50.1]) - 50.0) / 50.0)
    assert np.allclose(hz, expected, atol=1e-9)
    assert hz[round(0.5 / DT) - 1] == pytest.approx(59.7)  # halfway down the first second
    assert hz[round(2.0 / DT) - 1] == pytest.approx(59.4)
    status = grid.status()
    assert status["mode"] == "trace" and status["trace"] == "t.csv"
    assert status["remaining_s"] == pytest.approx(0.0, abs=1e-6)


def test_at_the_end_of_a_trace_the_grid_returns_to_noise_around_nominal(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "t_s,hz\n0,49.0\n2,49.0\n")
    grid = GridFrequency(60.0, seed=0)
    grid.replay(FrequencyTrace.load(path, 50.0))
    before = run(grid, 2.0)
    assert np.allclose(before, 58.8)
    assert grid.status()["mode"] == "trace"
    after = run(grid, 10.0)
    assert grid.status()["mode"] == "noise" and grid.trace is None
    assert np.abs(after - 60.0).max() < 0.1
    assert grid.status()["trace"] is None and grid.status()["remaining_s"] is None


def test_a_real_recording_maps_its_nadir_and_infers_its_nominal() -> None:
    trace = FrequencyTrace.load(GB_2019)  # no nominal given: 50 Hz from its median
    assert trace.nominal_hz == 50.0 and trace.duration_s == 359.0
    assert trace.hz.min() == pytest.approx(48.787)
    assert trace.at(120.0, 60.0) == pytest.approx(60.0 * 48.787 / 50.0)  # 58.544 Hz
    assert trace.at(120.0, 50.0) == pytest.approx(48.787)


def test_timestamps_or_plain_rows_give_the_times(tmp_path: Path) -> None:
    stamped = write(
        tmp_path / "s.csv",
        "timestamp_utc,Frequency\n2024-01-01T00:00:00Z,60.0\n2024-01-01T00:00:02Z,59.9\n",
    )
    trace = FrequencyTrace.load(stamped)
    assert trace.nominal_hz == 60.0 and trace.t_s.tolist() == [0.0, 2.0]
    plain = FrequencyTrace.load(write(tmp_path / "p.csv", "f\n50.0\n49.9\n49.8\n"), 50)
    assert plain.t_s.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("t_s,power\n0,1\n1,2\n", "no frequency column"),
        ("t_s,hz\n0,50\n", "header and at least two"),
        ("t_s,hz\n0,50\n1,fifty\n", "not a number"),
        ("t_s,hz\n0,50\n0,50\n", "must increase"),
        ("t_s,hz\n0,50\n1,56\n", "not a 50 Hz grid"),
    ],
)
def test_bad_traces_say_why(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(TraceError, match=why):
        FrequencyTrace.load(write(tmp_path / "bad.csv", text), 50.0)


def test_a_missing_trace_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not found"):
        FrequencyTrace.load(tmp_path / "nope.csv")


def test_the_physics_serves_the_grid_at_its_nominal() -> None:
    spec: DeviceSpec = device_spec(name="d")
    ph = SitePhysics([spec], seed=0, nominal_hz=50.0)
    assert ph.hz == 50.0
    ph.grid.hold(49.7)
    assert ph.hz == 49.7  # no step needed
    ph.grid.noise()
    for _ in range(100):
        ph.step(DT)
    assert abs(ph.hz - 50.0) < 0.1
    assert ph.hz == ph.grid.hz
