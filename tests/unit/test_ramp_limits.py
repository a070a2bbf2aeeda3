"""Ramp-rate limits on the site's target: the per-minute rates and the rolling 5 s window on
every trajectory a dispatch sets (setpoints, ramps, regulation, release, expiry, restoration),
the failsafe and the exempt offset outside them; what the ack, the telemetry, capability and
the physical minimum say about them. A real tracker on a fake clock."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from controller.config import FailsafeConfig, RampLimitsConfig, ReserveConfig, SiteLimits
from controller.control.types import Capability, Snapshot, StepResult
from controller.cycle import CycleOutput
from controller.intake import DispatchIntake
from controller.metrics import Metrics
from controller.target import (
    TICK_S,
    TargetTracker,
    allowance_w,
    limited_min_s,
)
from controller.telemetry import build_telemetry, ramp_limit_report
from controller.wire import Ack, Dispatch, Telemetry, WireError, rfc3339
from controller.wire.telemetry import CapabilityReport, RampLimitReport

SITE = SiteLimits(min_kw=0.0, max_kw=100_000.0)
MW = 1e6
T0 = 1000.0  # monotonic
U0 = 1_714_564_800.0  # unix at T0
NPRR = RampLimitsConfig(up_kw_per_min=8000.0, down_kw_per_min=20000.0)
WINDOW = RampLimitsConfig(max_change_kw_per_5s=10000.0)
BOTH = RampLimitsConfig(up_kw_per_min=8000.0, down_kw_per_min=20000.0, max_change_kw_per_5s=10000.0)


def fs(**kw: Any) -> FailsafeConfig:
    return FailsafeConfig(**{"dispatch_timeout_s": 1e6, "policy": "hold", "ramp_s": 30.0, **kw})


def disp(
    seq: int,
    target_mw: float = 50.0,
    *,
    mode: str = "setpoint",
    ramp_s: float = 0.0,
    signal: float | None = None,
    band_mw: float | None = None,
    expires_in: float | None = None,
) -> Dispatch:
    return Dispatch(
        id=f"d{seq}",
        seq=seq,
        issued_at=U0,
        mode=mode,  # type: ignore[arg-type]
        target_w=SITE.max_kw * 1e3 if mode == "release" else target_mw * MW,
        ramp_s=ramp_s,
        expires_at=None if expires_in is None else U0 + expires_in,
        signal=signal,
        band_w=None if band_mw is None else band_mw * MW,
    )


def tracker(limits: RampLimitsConfig | None, initial_mw: float = 100.0, **f: Any) -> TargetTracker:
    return TargetTracker(SITE, fs(**f), initial_w=initial_mw * MW, now_mono=T0, ramp_limits=limits)


def accept(tr: TargetTracker, d: Dispatch, at: float) -> None:
    tr.accept(d, at, U0 + (at - T0))


def sample(tr: TargetTracker, t0: float, t1: float, dt: float = 0.05) -> tuple[Any, Any]:
    ts = np.arange(t0, t1, dt)
    return ts, np.array([tr.target_w(float(t)) for t in ts])


def max_window_change(ts: Any, ws: Any, window_s: float = 5.0) -> float:
    """The largest change between any two samples at most `window_s` apart."""
    worst = 0.0
    for i in range(len(ts)):
        j = np.searchsorted(ts, ts[i] + window_s, side="right")
        seg = ws[i:j]
        worst = max(worst, float(seg.max() - seg.min()))
    return worst


def within_rates(ts: Any, ws: Any, up_w_s: float, down_w_s: float) -> bool:
    """No rise faster than `up_w_s` nor fall faster than `down_w_s` between samples at several
    lags; the target holds between ticks, so a change may lead its time by one tick."""
    for lag in (1, 2, 20, 200):
        if lag >= len(ts):
            break
        dw, dt = ws[lag:] - ws[:-lag], ts[lag:] - ts[:-lag] + TICK_S
        if (dw > up_w_s * dt + 1e-3).any() or (-dw > down_w_s * dt + 1e-3).any():
            return False
    return True


# -- the per-minute rates ---------------------------------------------------------------------


def test_a_step_down_ramps_at_the_down_rate_and_the_reach_time_is_known_at_acceptance() -> None:
    tr = tracker(NPRR)
    accept(tr, disp(1, 50.0), T0 + 0.03)
    by, reach = tr.limit_state()
    assert by == "down_kw_per_min" and reach is not None
    assert reach == pytest.approx(T0 + 0.03 + 150.0, abs=2 * TICK_S)  # 50 MW at 20 MW/min
    ts, ws = sample(tr, T0 + 0.03, T0 + 200.0)
    assert within_rates(ts, ws, math.inf, 20e6 / 60)
    assert ws[ts < reach - TICK_S].min() > 50 * MW
    assert ws[ts >= reach].max() == pytest.approx(50 * MW)
    assert tr.limit_state() == (None, None)  # arrived: nothing slows it any more


def test_a_step_up_ramps_at_the_up_rate() -> None:
    tr = tracker(NPRR, initial_mw=10.0)
    accept(tr, disp(1, 34.0), T0)
    assert tr.limit_state()[0] == "up_kw_per_min"
    ts, ws = sample(tr, T0, T0 + 200.0)
    assert within_rates(ts, ws, 8e6 / 60, 0.0)
    reached = ts[np.argmax(ws >= 34 * MW - 1)]
    assert reached == pytest.approx(T0 + 180.0, abs=2 * TICK_S)  # 24 MW at 8 MW/min


def test_a_ramp_slower_than_the_limits_is_followed_as_asked() -> None:
    limited, free = tracker(NPRR), tracker(None)
    for tr in (limited, free):
        accept(tr, disp(1, 90.0, ramp_s=60.0), T0)  # 10 MW/min down, within 20
    assert limited.limit_state() == (None, None)
    for t in np.arange(T0, T0 + 70.0, 0.5):
        # Held on the tick grid, so within one tick of the free ramp.
        assert abs(limited.target_w(t) - free.target_w(t)) <= 10e6 / 60 * TICK_S + 1e-3


def test_a_ramp_faster_than_the_limits_is_slowed_to_them() -> None:
    tr = tracker(NPRR)
    accept(tr, disp(1, 50.0, ramp_s=30.0), T0)  # 100 MW/min asked
    by, reach = tr.limit_state()
    assert by == "down_kw_per_min" and reach == pytest.approx(T0 + 150.0, abs=2 * TICK_S)
    ts, ws = sample(tr, T0, T0 + 160.0)
    assert within_rates(ts, ws, 0.0, 20e6 / 60)


# -- the rolling 5 s window -------------------------------------------------------------------


def test_a_step_larger_than_the_window_is_spread_so_no_5s_window_exceeds_it() -> None:
    tr = tracker(WINDOW)
    accept(tr, disp(1, 20.0), T0)  # 80 MW asked at once, 10 MW per 5 s allowed
    by, reach = tr.limit_state()
    assert by == "max_change_kw_per_5s"
    assert reach == pytest.approx(T0 + 35.0, abs=2 * TICK_S)  # 8 windows' worth of steps
    ts, ws = sample(tr, T0 - 1.0, T0 + 45.0, dt=0.02)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert ws[-1] == pytest.approx(20 * MW)
    # Back up: the same, the other way.
    accept(tr, disp(2, 100.0), T0 + 45.0)
    assert tr.limit_state()[0] == "max_change_kw_per_5s"
    ts, ws = sample(tr, T0 + 40.0, T0 + 90.0, dt=0.02)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert ws[-1] == pytest.approx(100 * MW)


def test_with_a_rate_and_a_window_the_slower_pace_governs_and_both_hold() -> None:
    # 30 MW/min (0.5 MW/s) alone would move 2.5 MW per 5 s: the 2 MW window governs.
    limits = RampLimitsConfig(down_kw_per_min=30000.0, max_change_kw_per_5s=2000.0)
    tr = tracker(limits)
    accept(tr, disp(1, 90.0), T0)
    assert tr.limit_state()[0] == "max_change_kw_per_5s"
    ts, ws = sample(tr, T0, T0 + 40.0, dt=0.02)
    assert max_window_change(ts, ws) <= 2 * MW + 1e-3
    assert within_rates(ts, ws, 0.0, 0.5 * MW)
    # A move within one window's allowance: the rate governs.
    tr2 = tracker(limits)
    accept(tr2, disp(1, 99.0), T0)
    assert tr2.limit_state()[0] == "down_kw_per_min"


def test_a_new_dispatch_mid_move_counts_what_the_window_already_saw() -> None:
    tr = tracker(WINDOW)
    accept(tr, disp(1, 95.0), T0)  # 5 MW at once
    tr.target_w(T0 + 1.0)
    accept(tr, disp(2, 80.0), T0 + 1.0)  # 15 MW more: only 5 MW until the first leaves
    ts, ws = sample(tr, T0 - 0.5, T0 + 15.0, dt=0.02)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert tr.target_w(T0 + 15.0) == pytest.approx(80 * MW)


def test_regulation_faster_than_the_limits_is_limited_too() -> None:
    tr = tracker(BOTH, initial_mw=50.0)
    rng = np.random.default_rng(7)
    ts_all: list[float] = []
    ws_all: list[float] = []
    limited = 0
    t = T0
    for seq in range(1, 60):  # a new signal every 2 s, full band swings
        accept(tr, disp(seq, 50.0, mode="regulation", signal=float(rng.uniform(-1, 1)),
                        band_mw=20.0), t)  # fmt: skip
        limited += tr.limit_state()[0] is not None
        for s in np.arange(t, t + 2.0, 0.05):
            ts_all.append(float(s))
            ws_all.append(tr.target_w(float(s)))
        t += 2.0
    ts, ws = np.array(ts_all), np.array(ws_all)
    assert limited > 30  # most signals asked for more than the limits allow
    assert within_rates(ts, ws, 8e6 / 60, 20e6 / 60)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3


def test_release_and_expiry_keep_to_the_limits() -> None:
    tr = tracker(WINDOW, initial_mw=100.0)
    accept(tr, disp(1, 60.0, expires_in=30.0), T0)
    ts, ws = sample(tr, T0, T0 + 61.0, dt=0.02)
    assert tr.mode == "released"
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert ws.min() == pytest.approx(60 * MW) and ws[-1] == pytest.approx(100 * MW)
    accept(tr, disp(2, 70.0), T0 + 60.0)
    tr.target_w(T0 + 80.0)
    accept(tr, disp(3, mode="release"), T0 + 80.0)
    assert tr.limit_state()[0] == "max_change_kw_per_5s"
    ts, ws = sample(tr, T0 + 60.0, T0 + 110.0, dt=0.02)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert ws[-1] == pytest.approx(100 * MW)


# -- outside the limits: the failsafe and the exempt offset ------------------------------------


@pytest.mark.parametrize("ramp_s", [0.0, 10.0])
def test_the_failsafe_goes_as_it_would_without_limits(ramp_s: float) -> None:
    kw: dict[str, Any] = {"policy": "min", "dispatch_timeout_s": 20.0, "ramp_s": ramp_s}
    limited, free = tracker(BOTH, **kw), tracker(None, **kw)
    for t in np.arange(T0, T0 + 40.0, 0.05):
        assert limited.target_w(float(t)) == pytest.approx(free.target_w(float(t)), abs=1e-3)
    assert limited.mode == "failsafe" and limited.target_w(T0 + 40.0) == 0.0
    assert limited.limit_state() == (None, None)


def test_restoration_after_a_failsafe_keeps_to_the_limits_and_the_drop_is_not_counted() -> None:
    tr = tracker(WINDOW, policy="min", ramp_s=0.0)
    tr.start_failsafe(T0 + 10.0)  # as if the dispatcher had fallen silent then
    assert tr.target_w(T0 + 10.5) == 0.0  # dropped 100 MW at once
    accept(tr, disp(1, 60.0), T0 + 11.0)  # restoration, 1 s after the drop
    assert tr.mode == "normal" and tr.limit_state()[0] == "max_change_kw_per_5s"
    # The drop is not counted: the first 10 MW go at once, then 10 MW per 5 s.
    assert tr.target_w(T0 + 11.0) == 0.0
    ts, ws = sample(tr, T0 + 11.02, T0 + 50.0, dt=0.02)
    assert ws[ts >= T0 + 11.1][0] == pytest.approx(10 * MW)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    reached = ts[np.argmax(ws >= 60 * MW - 1)]
    assert reached == pytest.approx(T0 + 11.1 + 25.0, abs=2 * TICK_S)


def test_the_exempt_offset_goes_at_once_and_is_not_counted_against_the_window() -> None:
    tr = tracker(WINDOW)
    tr.target_w(T0)
    tr.set_exempt_offset(-30 * MW)  # a frequency deployment sheds 30 MW
    assert tr.exempt_offset_w == -30 * MW
    assert tr.target_w(T0 + 0.01) == pytest.approx(70 * MW)
    # A dispatch right after still has its whole window: 10 MW at once.
    accept(tr, disp(1, 80.0), T0 + 0.5)
    assert tr.target_w(T0 + 0.6) == pytest.approx(90 * MW - 30 * MW)
    tr.set_exempt_offset(0.0)  # withdrawn: at once too
    assert tr.target_w(T0 + 0.7) == pytest.approx(90 * MW)
    ts, ws = sample(tr, T0 + 0.7, T0 + 12.0, dt=0.02)
    assert max_window_change(ts, ws) <= 10 * MW + 1e-3
    assert ws[-1] == pytest.approx(80 * MW)
    tr.set_exempt_offset(-200 * MW)  # the sum stays within the site's bounds
    assert tr.target_w(T0 + 13.0) == 0.0


# -- bounded and cheap ---------------------------------------------------------------------------


def test_the_history_is_bounded_and_a_quiet_stretch_costs_nothing() -> None:
    tr = tracker(BOTH)
    accept(tr, disp(1, 20.0), T0)
    sample(tr, T0, T0 + 400.0, dt=0.1)
    lim = tr._lim
    assert lim is not None and len(lim.hist) <= 5.0 / TICK_S + 1
    started = time.perf_counter()
    assert tr.target_w(T0 + 86_400.0) == pytest.approx(20 * MW)  # a day later, one jump
    assert time.perf_counter() - started < 0.05
    assert len(lim.hist) == 1


def test_the_limited_trajectory_is_a_function_of_time_not_of_sampling() -> None:
    a, b = tracker(BOTH), tracker(BOTH)
    for tr in (a, b):
        accept(tr, disp(1, 30.0), T0)
    coarse = {round(float(t), 6): a.target_w(float(t)) for t in np.arange(T0, T0 + 60.0, 1.7)}
    fine = {round(float(t), 6): b.target_w(float(t)) for t in np.arange(T0, T0 + 60.0, 0.01)}
    for t, w in coarse.items():
        near = min(fine, key=lambda s: abs(s - t))
        if abs(near - t) < 1e-6:
            assert w == pytest.approx(fine[near])


def test_without_limits_nothing_changes() -> None:
    tr = tracker(RampLimitsConfig())
    assert tr.ramp_limits is None
    accept(tr, disp(1, 20.0), T0)
    assert tr.target_w(T0) == 20 * MW and tr.limit_state() == (None, None)
    assert tr.limited_min_s(0.0) == 0.0


# -- the pure figures: least time, allowance -----------------------------------------------------


def test_least_time_and_allowance_from_rest() -> None:
    assert limited_min_s(NPRR, -50 * MW) == pytest.approx(150.0)
    assert limited_min_s(NPRR, 24 * MW) == pytest.approx(180.0)
    assert limited_min_s(WINDOW, -80 * MW) == pytest.approx(35.0)
    assert limited_min_s(WINDOW, 10 * MW) == 0.0
    assert limited_min_s(RampLimitsConfig(), 1e9) == 0.0
    both = RampLimitsConfig(up_kw_per_min=600_000.0, max_change_kw_per_5s=10_000.0)
    assert limited_min_s(both, 25 * MW) == pytest.approx(10.0 + 0.5)  # 10 MW/s ramps
    assert allowance_w(NPRR, 60.0, up=False) == pytest.approx(20 * MW)
    assert allowance_w(NPRR, 1.0, up=True) == pytest.approx(8 * MW / 60)
    assert allowance_w(WINDOW, 1.0, up=True) == 10 * MW
    assert allowance_w(WINDOW, 60.0, up=False) == 120 * MW
    assert math.isinf(allowance_w(RampLimitsConfig(), 5.0, up=True))


def test_the_least_time_to_where_the_target_heads_is_its_reach_time() -> None:
    tr = tracker(NPRR)
    accept(tr, disp(1, 50.0), T0)
    tr.target_w(T0 + 50.0)
    assert tr.limited_min_s(50 * MW) == pytest.approx(100.0, abs=2 * TICK_S)
    assert tr.limited_min_s(tr.target_w(T0 + 50.0)) == 0.0  # where it stands


# -- the ack ------------------------------------------------------------------------------------


def test_the_ack_carries_the_limit_and_reach_at_and_round_trips() -> None:
    ack = Ack("d-1", 3, True, "", U0, limited_by="max_change_kw_per_5s", reach_at=U0 + 35.0)
    body = json.loads(ack.encode())
    assert body["limited_by"] == "max_change_kw_per_5s"
    assert body["reach_at"] == rfc3339(U0 + 35.0)
    assert Ack.decode(ack.encode()) == ack
    plain = Ack("d-2", 4, True, "", U0)
    assert "limited_by" not in json.loads(plain.encode())  # unchanged when not limited
    assert Ack.decode(plain.encode()) == plain
    with pytest.raises(WireError):
        Ack.decode(json.dumps({**body, "limited_by": "fast"}).encode())


class _Rig:
    def __init__(self, limits: RampLimitsConfig) -> None:
        self.tracker = TargetTracker(SITE, fs(), initial_w=100 * MW, ramp_limits=limits)
        self.acks: list[Ack] = []
        self.intake = DispatchIntake(
            tracker=self.tracker,
            limits=SITE,
            hmac_key=None,
            journal=None,
            metrics=Metrics("test"),
            publish_ack=lambda body: self.acks.append(Ack.decode(body)),
            on_accepted=lambda _d, _t: None,
        )

    def send(self, seq: int, target_kw: float, **fields: Any) -> Ack:
        body = {
            "id": f"d{seq}", "seq": seq, "issued_at": rfc3339(time.time()), "mode": "setpoint",
            "target_kw": target_kw, "ramp_s": 0, **fields,
        }  # fmt: skip
        self.intake.on_dispatch(json.dumps(body).encode())
        return self.acks[-1]


def test_the_intake_acks_a_slowed_dispatch_with_its_limit_and_reach_at() -> None:
    rig = _Rig(NPRR)
    before = time.time()
    ack = rig.send(1, 50_000.0)
    assert ack.accepted and ack.limited_by == "down_kw_per_min"
    assert ack.reach_at is not None
    assert before + 150.0 - 1.0 <= ack.reach_at <= time.time() + 150.0 + 1.0
    first = ack.reach_at
    ack = rig.send(2, 50_000.0)  # where it already heads: the same move, the same arrival
    assert ack.limited_by == "down_kw_per_min" and ack.reach_at is not None
    assert ack.reach_at == pytest.approx(first, abs=0.5)
    ack = rig.send(3, 51_000.0, ramp_s=600)  # slower than the limits
    assert ack.accepted and ack.limited_by is None and ack.reach_at is None


def test_a_scheduled_dispatch_is_acked_without_a_limit_it_does_not_yet_have() -> None:
    rig = _Rig(NPRR)
    rig.send(1, 50_000.0)
    ack = rig.send(2, 10_000.0, start_at=rfc3339(time.time() + 60.0))
    assert ack.accepted and ack.limited_by is None


# -- telemetry ------------------------------------------------------------------------------------


def _cycle_output(target_w: float) -> CycleOutput:
    one = np.ones(1)
    horizons = (1.0, 5.0, 60.0)
    return CycleOutput(
        t=T0,
        target_w=target_w,
        meter_w=target_w,
        meter_fresh=True,
        result=StepResult(one * target_w, target_w, target_w, 0.0, 0, one.astype(bool)),
        capability=Capability(horizons, (50 * MW,) * 3, (80 * MW,) * 3, 0.0, 100 * MW),
        snapshot=Snapshot(T0, target_w, one, one.astype(bool), np.zeros(1, dtype=np.int8)),
    )


def test_telemetry_reports_the_limits_and_caps_capability_by_them() -> None:
    tr = tracker(BOTH)
    accept(tr, disp(1, 20.0), T0)
    tr.target_w(T0 + 1.0)
    ramp = ramp_limit_report(tr, T0 + 1.0, U0 + 1.0)
    by, reach = tr.limit_state()
    assert ramp == RampLimitReport(8000.0, 20000.0, 10000.0, by, U0 + (reach or 0.0) - T0)
    assert ramp.limited_by == "down_kw_per_min"
    tel = build_telemetry(
        _cycle_output(tr.target_w(T0 + 1.0)),
        at=U0 + 1.0,
        mode=tr.mode,
        devices={"on": 1},
        cycles=10,
        overruns=0,
        reserve=ReserveConfig(up_kw_5s=1000.0),
        physical_min_s=0.0,
        ramp_limit=ramp,
    )
    assert tel.capability is not None and tel.reserve is not None
    up_rate, down_rate = 8e6 / 60, 20e6 / 60
    assert tel.capability.up_w == pytest.approx((up_rate, 5 * up_rate, 8 * MW))
    assert tel.capability.down_w == pytest.approx((down_rate, 5 * down_rate, 20 * MW))
    assert tel.reserve.up_held_w == pytest.approx(5 * up_rate)
    body = json.loads(tel.encode())["ramp_limit"]
    assert body == {
        "up_kw_per_min": 8000.0,
        "down_kw_per_min": 20000.0,
        "max_change_kw_per_5s": 10000.0,
        "limited_by": "down_kw_per_min",
        "reach_at": rfc3339(ramp.reach_at or 0.0),
    }
    assert Telemetry.decode(tel.encode()).ramp_limit == replace(
        ramp, reach_at=round(ramp.reach_at or 0.0, 3)
    )
    # Arrived: configured limits still reported, nothing governs.
    tr.target_w(T0 + 400.0)
    quiet = ramp_limit_report(tr, T0 + 400.0, U0 + 400.0)
    assert quiet.limited_by is None and quiet.reach_at is None and quiet.up_kw_per_min == 8000.0


def test_a_window_alone_caps_each_horizon_by_its_windows() -> None:
    tr = tracker(WINDOW)
    tel = build_telemetry(
        _cycle_output(100 * MW),
        at=U0,
        mode="normal",
        devices={"on": 1},
        cycles=1,
        overruns=0,
        reserve=ReserveConfig(),
        physical_min_s=0.0,
        ramp_limit=ramp_limit_report(tr, T0, U0),
    )
    assert tel.capability is not None
    assert tel.capability.up_w == (10 * MW, 10 * MW, 50 * MW)  # the fleet's 50 MW at 60 s
    assert tel.capability.down_w == (10 * MW, 10 * MW, 80 * MW)


def test_bad_ramp_limit_sections_are_wire_errors() -> None:
    good = json.loads(
        Telemetry(
            at=U0,
            mode="normal",
            capability=CapabilityReport((1.0,), (1.0,), (1.0,)),
            ramp_limit=RampLimitReport(1.0, None, None, None, None),
        ).encode()
    )
    for bad in ({"up_kw_per_min": -1.0}, {"limited_by": "sometimes"}, {"reach_at": 5}):
        with pytest.raises(WireError):
            Telemetry.decode(
                json.dumps({**good, "ramp_limit": {**good["ramp_limit"], **bad}}).encode()
            )
