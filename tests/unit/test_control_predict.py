"""Device model: dead time + ramp limits from a ring of past setpoints; poll offsets."""

from __future__ import annotations

import numpy as np
import pytest

from controller.control import DelayModel, FleetParams


def model(dead: list[float], up: float = 10.0, down: float = 20.0) -> DelayModel:
    n = len(dead)
    params = FleetParams.of(
        p_min_w=[0.0] * n,
        p_max_w=[1e3] * n,
        ramp_up_w_s=[up] * n,
        ramp_down_w_s=[down] * n,
        dead_time_s=dead,
    )
    m = DelayModel(params, max_dead_time_s=3.0, cycle_s=0.1)
    m.set_dt(0.1)
    m.reset(np.zeros(n))
    return m


def send(m: DelayModel, setpoints: list[float]) -> None:
    m.next_row()[:] = setpoints
    m.commit()


def advance(m: DelayModel) -> None:
    m.advance(m.up_step_w, -m.down_step_w)


def test_follows_the_delayed_setpoint_at_its_ramp_rate() -> None:
    m = model([0.2, 0.0])
    assert m.delay.tolist() == [2, 0]
    send(m, [100.0, 100.0])
    seen = []
    for _ in range(4):
        advance(m)
        seen.append(m.model.tolist())
        send(m, [100.0, 100.0])
    # Ramp 10 W/s -> 1 W per 0.1 s cycle; device 0 waits two cycles.
    assert seen == [[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [2.0, 4.0]]


def test_ramp_down_rate_and_arrival() -> None:
    m = model([0.0], up=1e9, down=20.0)
    send(m, [10.0])
    advance(m)
    assert m.model[0] == 10.0  # fast up
    send(m, [0.0])
    advance(m)
    assert m.model[0] == pytest.approx(8.0)  # 20 W/s down
    for _ in range(10):
        send(m, [0.0])
        advance(m)
    assert m.model[0] == 0.0


def test_poll_sets_prediction_and_keeps_the_offset() -> None:
    m = model([0.0], up=1e9, down=1e9)
    send(m, [500.0])
    advance(m)
    m.correct(np.array([0]), np.array([530.0]))
    assert m.pred[0] == 530.0
    assert m.bias_sum == 30.0
    send(m, [600.0])
    advance(m)
    assert m.pred[0] == 630.0  # the model moved with its setpoint; the offset stayed
    m.pin(np.array([0]), np.array([10.0]))
    assert m.pred[0] == 10.0
    assert m.bias_sum == 0.0


def test_row_blend_and_per_device_gather_agree() -> None:
    rng = np.random.default_rng(3)
    dead = rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0], 40).tolist()
    a, b = model(dead), model(dead)
    a.MAX_CLASSES = 10  # blend whole rows for each of the 7 delays
    b.MAX_CLASSES = 0  # gather per device
    for m in (a, b):
        m._dt = float("nan")
        m.set_dt(0.1)
    assert a._blend and not b._blend
    for _ in range(30):
        sp = rng.uniform(0, 1e3, 40).tolist()
        for m in (a, b):
            send(m, sp)
            advance(m)
        np.testing.assert_array_equal(a.model, b.model)
    w = np.ones(40)
    assert a.ahead_sum(3, w, a.up_step_w, -a.down_step_w) == pytest.approx(
        b.ahead_sum(3, w, b.up_step_w, -b.down_step_w)
    )


def test_ahead_is_exact_for_a_held_setpoint() -> None:
    m = model([0.5, 1.0])
    for _ in range(12):
        send(m, [300.0, 200.0])
        advance(m)
    # Setpoints held: the model 3 cycles ahead is where 3 more advances take it.
    ahead = m.ahead_sum(3, np.ones(2), m.up_step_w, -m.down_step_w)
    for _ in range(3):
        send(m, [300.0, 200.0])
        advance(m)
    assert ahead == pytest.approx(float(m.model.sum()))


def test_dead_time_above_the_cap_is_clipped() -> None:
    params = FleetParams.of(
        p_min_w=[0.0], p_max_w=[1.0], ramp_up_w_s=[1.0], ramp_down_w_s=[1.0], dead_time_s=[10.0]
    )
    m = DelayModel(params, max_dead_time_s=1.0, cycle_s=0.1)
    m.set_dt(0.1)
    assert m.delay.tolist() == [10]
    assert m.k == 12


def test_a_capped_device_is_predicted_at_its_demand_not_with_a_constant_offset() -> None:
    # A GPU rack: cap 80 kW, job needs 60 kW. A constant offset (-20 kW) learned at the cap
    # would predict 30 kW when the cap drops to 50 kW; the truth is 50 kW.
    params = FleetParams.of(
        p_min_w=[30e3, 30e3],
        p_max_w=[80e3, 80e3],
        ramp_up_w_s=[1e6, 1e6],
        ramp_down_w_s=[1e6, 1e6],
        capped=[True, False],
    )
    m = DelayModel(params, max_dead_time_s=1.0, cycle_s=0.1)
    m.set_dt(0.1)
    ctrl = np.ones(2, dtype=np.bool_)
    m.reset(np.array([80e3, 80e3]))
    m.correct(np.array([0, 1]), np.array([60e3, 60e3]))
    m.apply_ceilings(ctrl)
    assert m.pred.tolist() == [60e3, 60e3]
    send(m, [50e3, 50e3])
    m.advance(m.up_step_w, -m.down_step_w)
    m.apply_ceilings(ctrl)
    # The capped row follows min(cap, demand); the other keeps its offset (a gain error).
    assert m.pred.tolist() == [50e3, 30e3]
    assert m.bias_sum == pytest.approx(-20e3)
    # Back at the cap, a reading at the cap means the demand is at least the cap.
    send(m, [80e3, 80e3])
    m.advance(m.up_step_w, -m.down_step_w)
    m.correct(np.array([0]), np.array([79.5e3]))
    m.apply_ceilings(ctrl)
    assert m.pred[0] == 80e3
