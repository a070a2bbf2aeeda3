"""Device physics of the simulator: ramps, dead time, quantization, sleep/wake, the meter."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from controller.config import DeviceSpec, SimParams
from drivers.core.state import DeviceState
from drivers.sim.physics import Fault, SitePhysics
from tests.helpers import device_spec

DT = 0.02


def spec(name: str = "d", **kw: Any) -> DeviceSpec:
    return device_spec(name=name, **kw)


def run_for(ph: SitePhysics, seconds: float) -> None:
    for _ in range(round(seconds / DT)):
        ph.step(DT)


def test_starts_at_p_max_running() -> None:
    ph = SitePhysics([spec(), spec("e", p_max_w=5000.0)], 0.0, dt_s=DT)
    assert ph.power_w.tolist() == [10_000.0, 5000.0]
    assert ph.cmd_setpoint_w.tolist() == [10_000.0, 5000.0]
    assert (ph.state == DeviceState.ON).all()
    half = SitePhysics([spec()], 0.0, dt_s=DT, initial_fraction=0.5)
    assert half.power_w[0] == 5000.0


def test_ramp_rate_limits_up_and_down() -> None:
    ph = SitePhysics([spec()], 0.0, dt_s=DT)
    ph.command(0, setpoint_w=2000.0)
    run_for(ph, 1.0)  # down at 2000 W/s
    assert ph.power_w[0] == pytest.approx(8000.0, abs=1.0)
    run_for(ph, 5.0)
    assert ph.power_w[0] == pytest.approx(2000.0)
    ph.command(0, setpoint_w=9000.0)
    run_for(ph, 2.0)  # up at 1000 W/s
    assert ph.power_w[0] == pytest.approx(4000.0, abs=1.0)


def test_setpoint_is_bounded_by_nameplate() -> None:
    ph = SitePhysics([spec()], 0.0, dt_s=DT)
    ph.command(0, setpoint_w=0.0)
    run_for(ph, 10.0)
    assert ph.power_w[0] == pytest.approx(1000.0)  # p_min, not 0: running needs run=0 to sleep
    ph.command(0, setpoint_w=1e9)
    run_for(ph, 20.0)
    assert ph.power_w[0] == pytest.approx(10_000.0)


def test_dead_time_delays_the_response() -> None:
    ph = SitePhysics([spec(dead_time_s=0.5), spec("fast")], 0.0, dt_s=DT)
    ph.command([0, 1], setpoint_w=5000.0)
    run_for(ph, 0.4)
    assert ph.power_w[0] == 10_000.0  # still inside its dead time
    assert ph.power_w[1] < 10_000.0
    run_for(ph, 0.2)
    assert ph.power_w[0] < 10_000.0
    # Moved for about 0.1 s after the dead time.
    assert ph.power_w[0] == pytest.approx(10_000.0 - 2000.0 * 0.1, abs=2000.0 * 2 * DT)


def test_power_is_quantized_down_to_steps() -> None:
    ph = SitePhysics([spec(step_w=750.0)], 0.0, dt_s=DT)
    ph.command(0, setpoint_w=4000.0)
    run_for(ph, 10.0)
    assert ph.power_w[0] == 3750.0
    ph.command(0, setpoint_w=1100.0)  # floor would give 750, below p_min
    run_for(ph, 10.0)
    assert ph.power_w[0] == 1000.0


def test_sleep_after_sleep_s_then_wake_after_wake_s() -> None:
    ph = SitePhysics([spec(sleep_s=1.0, wake_s=2.0)], 0.0, dt_s=DT)
    ph.command(0, run=0)
    run_for(ph, 0.9)
    assert ph.state[0] == DeviceState.ON and ph.power_w[0] == 10_000.0
    run_for(ph, 0.2)
    assert ph.state[0] == DeviceState.SLEEPING and ph.power_w[0] == 100.0
    ph.command(0, run=1)
    run_for(ph, 1.0)
    assert ph.state[0] == DeviceState.WAKING and ph.power_w[0] == 100.0
    run_for(ph, 1.1)
    assert ph.state[0] == DeviceState.ON
    run_for(ph, 1.0)  # on for ~1.1 s: ramps up from idle at its ramp rate
    assert ph.power_w[0] == pytest.approx(100.0 + 1000.0 * 1.1, abs=1000.0 * 3 * DT)


def test_run_command_cancels_a_pending_sleep_and_sleep_aborts_a_wake() -> None:
    ph = SitePhysics([spec(sleep_s=1.0, wake_s=1.0)], 0.0, dt_s=DT)
    ph.command(0, run=0)
    run_for(ph, 0.5)
    ph.command(0, run=1)
    run_for(ph, 2.0)
    assert ph.state[0] == DeviceState.ON and ph.power_w[0] == 10_000.0
    ph.command(0, run=0)
    run_for(ph, 1.1)
    ph.command(0, run=1)
    run_for(ph, 0.5)
    assert ph.state[0] == DeviceState.WAKING
    ph.command(0, run=0)
    run_for(ph, 2.0)
    assert ph.state[0] == DeviceState.SLEEPING


def test_noise_only_on_the_reported_reading_and_seeded() -> None:
    a = SitePhysics([spec(noise_w=50.0)] * 3, 0.0, seed=7, dt_s=DT)
    b = SitePhysics([spec(noise_w=50.0)] * 3, 0.0, seed=7, dt_s=DT)
    run_for(a, 1.0)
    run_for(b, 1.0)
    assert (a.power_w == 10_000.0).all()
    assert not (a.reported_w == a.power_w).all()
    assert np.abs(a.reported_w - a.power_w).max() < 50.0 * 6
    assert a.reported_w.tolist() == b.reported_w.tolist()
    assert a.meter_w == b.meter_w


def test_meter_is_device_sum_plus_drifting_noncontrollable_load() -> None:
    ph = SitePhysics([spec(), spec("e")], 800_000.0, dt_s=0.1, meter_noise_w=10.0)
    seen = []
    for _ in range(200):
        for _ in range(10):
            ph.step(0.1)
        nc = ph.truth() - float(ph.power_w.sum())
        seen.append(nc)
        assert abs(ph.meter_w - ph.truth()) < 10.0 * 6
    arr = np.array(seen)
    assert abs(arr.mean() - 800_000.0) < 0.05 * 800_000.0
    assert arr.max() - arr.min() > 0.005 * 800_000.0  # it moves ...
    assert arr.max() - arr.min() < 0.2 * 800_000.0  # ... by a few percent
    assert ph.energy_wh == pytest.approx(ph.truth() * 200 / 3600, rel=0.1)


def test_reboot_restores_the_default_setpoint_once() -> None:
    ph = SitePhysics([spec(), spec("e")], 0.0, dt_s=DT)
    ph.command([0, 1], setpoint_w=3000.0)
    run_for(ph, 5.0)
    ph.reboot(0)
    ph.step(DT)
    assert ph.fault[0] == Fault.NONE
    assert ph.cmd_setpoint_w.tolist() == [10_000.0, 3000.0]
    run_for(ph, 10.0)
    assert ph.power_w.tolist() == [10_000.0, 3000.0]


def test_step_is_vectorized_over_many_devices() -> None:
    specs = [spec(f"d{i}", dead_time_s=0.1 * (i % 5), step_w=100.0 * (i % 2)) for i in range(5000)]
    ph = SitePhysics(specs, 1e6, dt_s=DT)
    ph.command(np.arange(5000), setpoint_w=np.linspace(1000.0, 10_000.0, 5000))
    run_for(ph, 12.0)
    target = np.linspace(1000.0, 10_000.0, 5000)
    odd = np.arange(5000) % 2 == 1
    quantized = np.where(odd, np.maximum(np.floor(target / 100) * 100, 1000), target)
    assert np.allclose(ph.power_w, quantized)


# --- workload demand (GPU racks): true power follows min(cap, demand) ---

GPU = SimParams(demand_min_frac=0.5, demand_max_frac=0.8, job_s=20.0)


def gpu(name: str = "g", **kw: Any) -> DeviceSpec:
    return spec(name, ramp_up_w_s=20_000.0, ramp_down_w_s=20_000.0, sim=GPU, **kw)


def test_constant_demand_is_p_max_and_leaves_noise_untouched() -> None:
    plain = SitePhysics([spec(noise_w=50.0), spec("e", noise_w=50.0)], 0.0, seed=3, dt_s=DT)
    mixed = SitePhysics([spec(noise_w=50.0), gpu("e", noise_w=50.0)], 0.0, seed=3, dt_s=DT)
    assert plain.demand_w.tolist() == [10_000.0, 10_000.0]
    run_for(plain, 2.0)
    run_for(mixed, 2.0)
    # The job generator is separate: a miner's readings do not depend on its neighbours.
    assert plain.reported_w[0] == mixed.reported_w[0]
    assert plain.power_w[0] == mixed.power_w[0] == 10_000.0


def test_demand_is_piecewise_constant_jobs_within_the_range() -> None:
    ph = SitePhysics([gpu(f"g{i}") for i in range(50)], 0.0, seed=5, dt_s=0.1)
    seen = [ph.demand_w.copy()]
    for _ in range(3000):  # 300 s
        ph.step(0.1)
        seen.append(ph.demand_w.copy())
    d = np.array(seen)
    assert (d >= 5000.0).all() and (d <= 8000.0).all()
    changes = (np.diff(d, axis=0) != 0).sum(axis=0)
    # Jobs last 10-30 s: 300 s holds about 10-30 of them per device, never one per step.
    assert changes.min() >= 8 and changes.max() <= 31
    assert d.std() > 500.0  # levels really vary


def test_power_follows_min_of_cap_and_demand_within_a_second() -> None:
    ph = SitePhysics([gpu(), gpu("h")], 0.0, seed=1, dt_s=DT)
    ph.set_demand([0, 1], 7000.0)
    run_for(ph, 1.0)
    assert ph.power_w.tolist() == pytest.approx([7000.0, 7000.0])
    ph.command(0, setpoint_w=4000.0)  # cap below demand: the cap binds
    ph.command(1, setpoint_w=9000.0)  # cap above demand: the job binds
    run_for(ph, 1.0)
    assert ph.power_w.tolist() == pytest.approx([4000.0, 7000.0])
    ph.set_demand(0, 3000.0)  # the job shrinks below the cap
    ph.set_demand(1, 9500.0)  # ... and grows above it
    run_for(ph, 1.0)
    assert ph.power_w.tolist() == pytest.approx([3000.0, 9000.0])


def test_pinned_demand_resumes_random_jobs_after_hold() -> None:
    ph = SitePhysics([gpu()], 0.0, seed=2, dt_s=0.1)
    ph.set_demand(0, 6000.0, hold_s=5.0)
    for _ in range(45):
        ph.step(0.1)
    assert ph.demand_w[0] == 6000.0
    for _ in range(10):
        ph.step(0.1)
    assert ph.demand_w[0] != 6000.0
    assert 5000.0 <= ph.demand_w[0] <= 8000.0


def test_sim_params_validate_their_range() -> None:
    with pytest.raises(ValueError):
        SimParams(demand_min_frac=0.9, demand_max_frac=0.5)
