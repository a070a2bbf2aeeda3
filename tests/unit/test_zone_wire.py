"""A zone's messages as its parent reads them, the dynamics derived from its capability, and
the fleet columns a driver may change at run time."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import numpy as np
import pytest

from controller.config import SiteLimits
from controller.wire import Ack, Dispatch, Status
from controller.wire.signing import canonical_bytes
from controller.zone.dynamics import derive_dynamics, zone_telemetry
from drivers.core.image import Limits, ProcessImage
from tests.helpers import device_spec


def _tel(**over: Any) -> bytes:
    body: dict[str, Any] = {
        "at": "2024-05-01T12:00:00.000Z",
        "mode": "normal",
        "devices": {"on": 1},
        "measured_kw": 500.0,
        "target_kw": 500.0,
        "min_kw": 100.0,
        "max_kw": 800.0,
        "capability": {
            "up_kw": {"1s": 120.0, "5s": 300.0, "60s": 300.0},
            "down_kw": {"1s": 240.0, "5s": 400.0, "60s": 400.0},
        },
        "physical_min_s": 0.0,
    }
    body.update(over)
    return json.dumps(body).encode()


def test_telemetry_in_si_units() -> None:
    tel = zone_telemetry(_tel())
    assert tel.measured_w == 500e3 and tel.min_w == 100e3 and tel.max_w == 800e3
    assert tel.capability is not None
    assert tel.capability.within(1.0) == (120e3, 240e3)
    assert tel.capability.within(5.0) == (300e3, 400e3)
    assert tel.physical_min_s == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"[1]",
        b'{"measured_kw": NaN}',
        _tel(measured_kw=None),
        _tel(measured_kw="500"),
        _tel(measured_kw=True),
        _tel(min_kw=900.0),
        _tel(physical_min_s=-1),
        _tel(capability={"up_kw": {"1s": -5.0}}),
        b'{"measured_kw": 1e400}',
        b"[" * 100_000,
    ],
)
def test_bad_telemetry_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        zone_telemetry(payload)


def test_status_and_ack() -> None:
    status = Status.decode(b'{"state": "offline", "mode": null, "detail": "connection lost"}')
    assert (status.online, status.detail) == (False, "connection lost")
    ack = Ack.decode(b'{"id": "z-1", "seq": 1, "accepted": false, "reason": "stale"}')
    assert (ack.id, ack.accepted, ack.reason) == ("z-1", False, "stale")
    for bad in (b'{"state": "up"}', b"{}"):
        with pytest.raises(ValueError):
            Status.decode(bad)
    with pytest.raises(ValueError):
        Ack.decode(b'{"id": 1, "accepted": true}')


def test_a_signed_dispatch_is_what_the_zone_accepts() -> None:
    key = b"k" * 32
    payload = Dispatch("p-7", 7, 1_800_000_000.0, "setpoint", 412_345.0).encode(key)
    obj = json.loads(payload)
    assert obj["target_kw"] == 412.345 and obj["mode"] == "setpoint" and obj["ramp_s"] == 0
    expected = hmac.new(key, canonical_bytes(obj), hashlib.sha256).hexdigest()
    assert obj["sig"] == expected
    d = Dispatch.decode(
        payload,
        now_unix=1_800_000_000.5,
        last_seq=6,
        limits=SiteLimits(max_kw=1000.0),
        hmac_key=key,
    )
    assert d.target_w == pytest.approx(412_345.0) and d.seq == 7


def test_dynamics_from_capability_at_rest() -> None:
    dyn = derive_dynamics(zone_telemetry(_tel()), 0.0, 1e6)
    assert dyn is not None
    assert (dyn.p_min_w, dyn.p_max_w) == (100e3, 800e3)
    # Up: the 5 s reach (300) is the whole headroom (300): cut short, so the 1 s figure.
    assert dyn.ramp_up_w_s == pytest.approx(120e3)
    # Down: 400 of 400 in 5 s is cut short too; 240 within 1 s.
    assert dyn.ramp_down_w_s == pytest.approx(240e3)
    # A 5 s reach well inside the headroom counts the slow devices: its average.
    slow = derive_dynamics(
        zone_telemetry(_tel(capability={"up_kw": {"1s": 100.0, "5s": 150.0}})), 0.0, 1e6
    )
    assert slow is not None and slow.ramp_up_w_s == pytest.approx(30e3)


def test_dynamics_are_clipped_and_withheld_when_they_say_nothing() -> None:
    clipped = derive_dynamics(zone_telemetry(_tel()), 200e3, 700e3)
    assert clipped is not None and (clipped.p_min_w, clipped.p_max_w) == (200e3, 700e3)
    moving = derive_dynamics(zone_telemetry(_tel(physical_min_s=1.5)), 0.0, 1e6)
    assert moving is not None and moving.ramp_up_w_s is None and moving.ramp_down_w_s is None
    near_top = derive_dynamics(zone_telemetry(_tel(measured_kw=780.0)), 0.0, 1e6)
    assert near_top is not None and near_top.ramp_up_w_s is None
    assert near_top.ramp_down_w_s is not None
    # A zone starting up (its range does not hold its own power) teaches nothing.
    assert derive_dynamics(zone_telemetry(_tel(max_kw=0.2, min_kw=0.0)), 0.0, 1e6) is None


def test_learned_limits_change_in_place_or_not_at_all() -> None:
    image = ProcessImage([device_spec(), device_spec(name="e")])
    port = image.port(device_spec().protocol)
    p_max = image.p_max_w  # the control model is rebuilt from this array
    v0 = image.limits_version
    assert port.learned_limits(1, Limits(2e3, 8e3, 500.0, 900.0))
    assert p_max is image.p_max_w and p_max[1] == 8e3 and image.p_min_w[1] == 2e3
    assert image.limits_version == v0 + 1
    assert not port.learned_limits(1, Limits(2e3, 8e3, 500.0, 900.0))
    before = [c.copy() for c in (image.p_min_w, image.p_max_w, image.ramp_up_w_s)]
    for bad in (
        Limits(9e3, 8e3, 1.0, 1.0),
        Limits(1e3, np.nan, 1.0, 1.0),
        Limits(1e3, 8e3, 0.0, 1.0),
    ):
        with pytest.raises(ValueError):
            port.learned_limits(0, bad)
    after = (image.p_min_w, image.p_max_w, image.ramp_up_w_s)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert image.limits_version == v0 + 1
