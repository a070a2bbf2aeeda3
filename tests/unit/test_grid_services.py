"""The grid services' logic on a process image: triggers confirmed by plausible samples,
deployment on the event path to fast devices only, the target lowered by what was shed, the
evidence recorded, the staggered restoration under the ramp limits, droop, and what can be
armed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.config import RampLimitsConfig, ServicesConfig
from controller.grid.frequency import Sample
from controller.grid.services import CONFIRM_SAMPLES, Deployment, GridServices
from drivers.core.command import Commands, Intent
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from tests.helpers import device_spec

FEEDER_W = 500e3


def site() -> ProcessImage:
    """4 feeders (trip in 50 ms, services only), 2 loads that cannot shed in time, 2 miners
    that sleep in 2 s."""
    feeders = [
        device_spec(
            name=f"f{i}", protocol="breaker", p_min_w=FEEDER_W, p_max_w=FEEDER_W, p_idle_w=0.0,
            dead_time_s=0.02, sleep_s=0.05, wake_s=90.0, services_only=True,
        )
        for i in range(4)
    ]  # fmt: skip
    loads = [device_spec(name=f"l{i}", p_min_w=25e3, p_max_w=250e3) for i in range(2)]
    miners = [
        device_spec(
            name=f"m{i}", protocol="luxos", p_min_w=1750.0, p_max_w=3500.0, p_idle_w=20.0,
            dead_time_s=1.0, sleep_s=2.0, wake_s=120.0,
        )
        for i in range(2)
    ]  # fmt: skip
    image = ProcessImage([*feeders, *loads, *miners])
    image.measured_w[:] = [FEEDER_W] * 4 + [200e3] * 2 + [3500.0] * 2
    image.state[:] = DeviceState.ON
    return image


class Rig:
    def __init__(self, ffr_kw: float = 900.0, ufr_kw: float = 500.0, **ramp: float) -> None:
        self.now = 100.0
        self.meter = 3_000e3
        self.sent: list[Commands] = []
        self.ended: list[Deployment] = []
        self.image = site()
        cfg = ServicesConfig.model_validate(
            {"ffr": {"armed_kw": ffr_kw}, "ufr": {"armed_kw": ufr_kw}}
        )
        self.svc = GridServices(
            cfg,
            RampLimitsConfig.model_validate(ramp),
            nominal_hz=60.0,
            site_max_w=4_000e3,
            image=self.image,
            submit=self.sent.append,
            meter_w=lambda: self.meter,
            on_end=self.ended.append,
            clock=lambda: self.now,
        )

    def sample(self, hz: float, plausible: bool = True) -> None:
        self.now += 0.05
        self.svc.on_sample(Sample(hz, self.now, plausible))

    def run(self, seconds: float, dt: float = 0.1) -> None:
        for _ in range(round(seconds / dt)):
            self.now += dt
            self.svc.tick(self.now, dt)


def test_ffr_deploys_on_confirmed_samples_to_feeders_only_and_lowers_the_target() -> None:
    r = Rig()
    r.sample(59.90)
    r.sample(59.84)  # one sample below: not yet
    assert not r.sent
    for _ in range(CONFIRM_SAMPLES - 1):
        r.sample(59.83)
    assert len(r.sent) == 1
    cmd = r.sent[0]
    # 900 kW armed: two 500 kW feeders, tripped (SLEEP); loads and miners untouched.
    assert cmd.rows.tolist() == [0, 1] and (cmd.intent == Intent.SLEEP).all()
    assert r.svc.offset_w(r.now) == pytest.approx(-2 * FEEDER_W)
    assert r.svc.held[[0, 1, 2, 3]].all() and not r.svc.held[4:].any()
    d = r.svc.services["ffr"].deployment
    assert d is not None and d.before_w == 3_000e3
    # UFR (lower trigger) is not deployed by 59.83 Hz.
    assert r.svc.services["ufr"].deployment is None


def test_implausible_or_lone_samples_never_deploy() -> None:
    r = Rig()
    for hz in (59.0, 59.0, 59.0):
        r.sample(hz, plausible=False)
    r.sample(59.80)
    r.sample(59.95)
    r.sample(59.80)
    assert not r.sent


def test_ufr_uses_what_ffr_left_and_both_can_be_deployed() -> None:
    r = Rig(ffr_kw=900.0, ufr_kw=500.0)
    armable = r.svc.armable_w()
    # Feeders (2 MW) can shed within both deadlines; FFR's armed 900 kW is taken out of UFR's.
    assert armable["ffr"] == pytest.approx(4 * FEEDER_W)
    assert armable["ufr"] == pytest.approx(4 * FEEDER_W - 900e3)
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.65)
    assert [c.rows.tolist() for c in r.sent] == [[0, 1], [2]]
    assert r.svc.offset_w(r.now) == pytest.approx(-3 * FEEDER_W)


def test_the_evidence_is_recorded_and_the_end_restores_one_feeder_at_a_time() -> None:
    r = Rig(max_change_kw_per_5s=500.0)  # 100 kW/s
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.8)
    r.meter = 2_000e3
    r.run(1.2)
    d = r.svc.services["ffr"].deployment
    assert d is not None and d.response_w == {0.25: 2_000e3, 0.5: 2_000e3, 1.0: 2_000e3}
    assert r.svc.recall() == 1
    assert r.ended == [d] and d.ended_by == "recall" and d.end_w == 2_000e3
    r.sent.clear()
    r.run(4.9)  # the first feeder at once, the second 500 kW / 100 kW/s = 5 s later
    assert [c.rows.tolist() for c in r.sent] == [[0]] and (r.sent[0].intent == Intent.RUN).all()
    r.run(0.3)
    assert [c.rows.tolist() for c in r.sent] == [[0], [1]]
    # The target offset comes back at 100 kW/s: after ~5.2 s about 520 kW of the 1 MW.
    assert -r.svc.offset_w(r.now) == pytest.approx(1_000e3 - 100e3 * 5.2, abs=20e3)
    r.run(6.0)
    assert r.svc.offset_w(r.now) == 0.0 and not r.svc.held[4:].any()


def test_a_deployment_ends_after_its_sustain_time() -> None:
    r = Rig()
    r.svc.services["ffr"].sustain_s = 2.0
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.8)
    r.run(1.5)
    assert r.svc.services["ffr"].deployment is not None
    r.run(1.0)
    assert r.svc.services["ffr"].deployment is None and r.ended[0].ended_by == "sustain"


def test_droop_moves_the_target_with_frequency_outside_the_deadband() -> None:
    r = Rig()
    r.svc.pfr = r.svc.pfr.model_copy(update={"band_kw": 200.0})
    r.sample(60.010)
    assert r.svc.droop_w(r.now) == 0.0  # inside 17 mHz
    r.sample(59.917)
    # (-0.083 + 0.017) Hz / (0.05 * 60 Hz) * 4 MW = -88 kW
    assert r.svc.droop_w(r.now) == pytest.approx(-0.066 / 3.0 * 4_000e3)
    r.sample(59.5)
    assert r.svc.droop_w(r.now) == -200e3  # the band
    r.sample(60.5)
    assert r.svc.droop_w(r.now) == 200e3
    r.now += 5.0  # no fresh frequency: no droop
    assert r.svc.droop_w(r.now) == 0.0


def test_services_only_devices_found_open_are_closed_while_nothing_is_deployed() -> None:
    r = Rig()
    r.image.state[3] = DeviceState.SLEEPING
    r.run(0.1)
    assert [c.rows.tolist() for c in r.sent] == [[3]] and r.sent[0].intent[0] == Intent.RUN
    r.run(1.0)
    assert len(r.sent) == 1  # not again at once


def test_nothing_fast_enough_means_nothing_armable_and_a_deployment_says_so() -> None:
    r = Rig()
    r.image.state[:4] = DeviceState.FAULT
    assert r.svc.armable_w()["ffr"] == 0.0
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.8)
    d = r.svc.services["ffr"].deployment
    assert d is not None and d.rows.size == 0 and d.expected_w == 0.0 and not r.sent
    assert math.isfinite(d.before_w)
    assert np.all(r.svc.offset_w(r.now) == 0.0)


def test_ride_through_nothing_unarmed_acts_within_58_8_to_61_2_hz() -> None:
    r = Rig(ffr_kw=0.0, ufr_kw=0.0)
    for hz in (59.9, 59.5, 59.0, 58.8, 58.8, 61.2, 61.2, 60.0):
        r.sample(hz)
        r.run(0.1)
    assert not r.sent and r.svc.offset_w(r.now) == 0.0
    assert not any(s.deployment for s in r.svc.services.values())


def test_a_recalled_service_arms_again_only_after_the_frequency_recovers() -> None:
    r = Rig()
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.80)
    r.svc.recall()
    r.sent.clear()
    for _ in range(5):  # still low: no second deployment
        r.sample(59.80)
    assert r.svc.services["ffr"].deployment is None
    r.sample(59.95)  # recovered past the trigger and its margin
    for _ in range(CONFIRM_SAMPLES):
        r.sample(59.80)
    assert r.svc.services["ffr"].deployment is not None
