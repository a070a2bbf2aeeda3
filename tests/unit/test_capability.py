"""Capabilities learned at adoption: validated, written through the port into the columns the
control model reads, and used by it (presets as quanta, no sleep without a sleep command,
an UNRESPONSIVE device out of control and capability); a reloaded image keeps them."""

from __future__ import annotations

import numpy as np
import pytest

from controller.control import Controller, FleetParams, Snapshot
from drivers.core.capability import Capabilities, Control
from drivers.core.command import CommandShaper, Intent
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from tests.helpers import device_spec


def miners(n: int = 3) -> ProcessImage:
    return ProcessImage(
        [
            device_spec(
                name=f"m{i}",
                protocol="antminer",
                p_min_w=1000.0,
                p_max_w=3500.0,
                p_idle_w=20.0,
                wake_s=60.0,
                sleep_s=5.0,
            )
            for i in range(n)
        ]
    )


def test_presets_are_sorted_and_spaced_and_bad_ones_refused() -> None:
    caps = Capabilities.presets([3500.0, 2625.0], reports_power=False)
    assert caps.control is Control.PRESETS
    assert (caps.p_min_w, caps.p_max_w, caps.step_w) == (2625.0, 3500.0, 875.0)
    assert caps.preset_at_or_below(3400.0) == 2625.0
    assert caps.preset_at_or_below(100.0) == 2625.0  # nothing below: the lowest
    assert caps.preset_at_or_below(3500.0) == 3500.0
    with pytest.raises(ValueError):
        Capabilities.presets([])
    with pytest.raises(ValueError):
        Capabilities.continuous(3000.0, 1000.0)
    with pytest.raises(ValueError):
        Capabilities.continuous(0.0, float("nan"))
    with pytest.raises(ValueError):
        Capabilities(Control.CONTINUOUS, 0.0, 1.0, presets_w=(1.0,))


def test_adoption_writes_the_model_columns_and_counts_a_change() -> None:
    image = miners()
    port = image.port("antminer")
    v0 = image.limits_version
    assert port.adopted(0, Capabilities.presets((2625.0, 3500.0), reports_power=False))
    assert port.adopted(1, Capabilities.continuous(1400.0, 3500.0, can_sleep=False))
    assert image.limits_version == v0 + 2
    # The same again changes nothing the model reads.
    assert not port.adopted(1, Capabilities.continuous(1400.0, 3500.0, can_sleep=False))
    assert image.limits_version == v0 + 2
    assert image.p_min_w.tolist() == [2625.0, 1400.0, 1000.0]
    assert image.step_w.tolist() == [875.0, 0.0, 0.0]
    assert image.reports_power.tolist() == [False, True, True]
    assert image.sleep_s.tolist() == [5.0, 0.0, 5.0] and image.wake_s.tolist()[1] == 0.0
    assert port.capabilities(2) is None
    params = FleetParams.from_image(image)
    assert params.sleepable.tolist() == [True, False, True]


def snapshot(image: ProcessImage, state: list[DeviceState], measured_w: float) -> Snapshot:
    n = image.n
    return Snapshot(
        t=0.0,
        meter_w=float("nan"),
        measured_w=np.full(n, measured_w),
        new_reading=np.ones(n, dtype=np.bool_),
        state=np.array(state, dtype=np.int8),
        meter_age_s=0.0,
        delivered_w=np.full(n, np.nan),
        acked_sleep=np.zeros(n, dtype=np.bool_),
    )


def controller_for(image: ProcessImage) -> Controller:
    return Controller(FleetParams.from_image(image), deadband_w=0.0, cycle_s=0.1)


def test_the_model_plans_presets_on_their_grid_and_never_sleeps_a_device_that_cannot() -> None:
    image = miners(4)
    port = image.port("antminer")
    for local in range(4):
        port.adopted(local, Capabilities.presets((1750.0, 3500.0), can_sleep=False))
    ctl = controller_for(image)
    on = [DeviceState.ON] * 4
    for _ in range(50):  # far below what the awake fleet can reach, for seconds
        result = ctl.step(snapshot(image, on, 3500.0), 100.0, 0.1)
    planned = result.setpoints_w[result.controllable]
    assert np.isin(planned, [1750.0, 3500.0]).all(), planned
    assert result.sleep is None or not result.sleep.any()


def test_an_unresponsive_device_is_out_of_control_and_out_of_the_capability() -> None:
    image = miners(3)
    ctl = controller_for(image)
    on = [DeviceState.ON] * 3
    base = ctl.step(snapshot(image, on, 2000.0), 6000.0, 0.1)
    cap_all = ctl.capability()
    stuck = [DeviceState.ON, DeviceState.UNRESPONSIVE, DeviceState.ON]
    result = ctl.step(snapshot(image, stuck, 2000.0), 6000.0, 0.1)
    assert result.controllable.tolist() == [True, False, True]
    assert base.controllable.all()
    cap = ctl.capability()
    assert cap.up_w[-1] < cap_all.up_w[-1] and cap.down_w[-1] < cap_all.down_w[-1]


def test_a_reloaded_image_keeps_what_is_known_of_the_devices_it_keeps() -> None:
    old = miners(3)
    port = old.port("antminer")
    port.reading(1, 3000.0, DeviceState.ON)
    port.acknowledged(1, 3000.0, Intent.RUN)
    port.adopted(1, Capabilities.presets((2625.0, 3500.0), reports_power=False))
    shaper = CommandShaper(old.p_idle_w, old.deadband_w)
    shaper.last_sent_w[:] = [1.0, 2.0, 3.0]
    # m0 removed, m1 kept, m2 changed (another address), m3 added.
    specs = [old.specs[1], device_spec(**{**_fields(old.specs[2]), "host": "10.9.9.9"})]
    specs.append(device_spec(**{**_fields(old.specs[2]), "name": "m3"}))
    new = ProcessImage(specs)
    kept = new.carry_over(old)
    assert kept.tolist() == [0]
    assert new.measured_w[0] == 3000.0 and new.state[0] == DeviceState.ON
    assert new.acked_w[0] == 3000.0 and new.step_w[0] == 875.0
    assert new.capabilities[0] is old.capabilities[1] and not new.reports_power[0]
    assert np.isnan(new.measured_at[1:]).all() and (new.state[1:] == DeviceState.UNKNOWN).all()
    new_shaper = CommandShaper(new.p_idle_w, new.deadband_w)
    new_shaper.carry_over(shaper, *new.same_devices(old))
    assert new_shaper.last_sent_w[0] == 2.0 and np.isnan(new_shaper.last_sent_w[1:]).all()


def _fields(spec: object) -> dict[str, object]:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}  # type: ignore[attr-defined]
