"""Ramp-rate limits on a running site: mosquitto + `rampd sim` + `rampd run` as processes, a
small Modbus-load site with `[ramp_limits]`. Big steps down and up are accepted, each ack names
the limit that governs and when the target will be reached; on the simulator's ground truth
no rolling 5 s window changes by more than the limit (plus the measurement tolerance), and the
site arrives around the ack's `reach_at`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from controller.tools.truth import TruthTail, tolerance_kw
from controller.wire import Ack, Telemetry
from tests.e2e.harness import Site, SiteDispatcher, run_site, truth_until, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N = 8  # 250 kW Modbus loads
NONFLEX_KW = 200.0
SITE_MAX_KW = N * 250.0 + NONFLEX_KW
WINDOW_KW = 300.0  # max_change_kw_per_5s: governs up (no up rate given)
DOWN_KW_PER_MIN = 3000.0  # 50 kW/s, 250 kW per 5 s: governs down

CONFIG = f"""
site_id = "ramplim"
cycle_s = 0.1
noncontrollable_kw = {NONFLEX_KW}
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = 0.0
max_kw = {SITE_MAX_KW}
deadband_kw = 10.0
telemetry_max_age_s = 5.0
[failsafe]
dispatch_timeout_s = 600
[ramp_limits]
down_kw_per_min = {DOWN_KW_PER_MIN}
max_change_kw_per_5s = {WINDOW_KW}
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.75.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N}
address = "127.75.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("ramplim")
    with run_site(module_mosquitto, workdir, CONFIG, site_id="ramplim", n_devices=N) as s:
        yield s


def max_window_change_kw(t: np.ndarray, kw: np.ndarray, window_s: float = 5.0) -> float:
    """The largest change between two truth samples at most `window_s` apart."""
    worst = 0.0
    for i in range(len(t)):
        j = int(np.searchsorted(t, t[i] + window_s, side="right"))
        seg = kw[i:j]
        worst = max(worst, float(seg.max() - seg.min()))
    return worst


async def settled_at(d: SiteDispatcher, target_kw: float, tol_kw: float, within: float) -> None:
    """The daemon's measured power holds within `tol_kw` of `target_kw`."""

    def near(tel: Telemetry | None) -> bool:
        m = None if tel is None else wire_kw(tel.measured_w)
        return m is not None and abs(m - target_kw) <= tol_kw

    await until(lambda: near(d.latest()), within, what=f"the site near {target_kw} kW")


async def move(
    d: SiteDispatcher,
    tail: TruthTail,
    from_kw: float,
    target_kw: float,
    limit: str,
    per_5s_kw: float,
) -> Ack:
    """Step from `from_kw` to `target_kw`; check the ack, then the move on the ground truth
    (the measurement tolerance of the move's larger end)."""
    ack, sent_at = await d.send_acked(target_kw=target_kw)
    assert ack.accepted, ack.reason
    assert ack.limited_by == limit
    assert ack.reach_at is not None and ack.reach_at > sent_at + 5.0  # slowed, and says so
    tol = tolerance_kw(max(from_kw, target_kw), SITE_MAX_KW)
    # While it moves, telemetry says which limit governs and when it arrives.
    tel = await d.fresh_telemetry()
    assert tel.ramp_limit is not None and tel.ramp_limit.limited_by == limit
    assert tel.ramp_limit.reach_at == pytest.approx(ack.reach_at, abs=0.5)
    assert tel.ramp_limit.max_change_kw_per_5s == WINDOW_KW
    await truth_until(tail, ack.reach_at + 8.0, within=ack.reach_at - sent_at + 30.0)
    t, kw = tail.arrays()
    sel = (t >= sent_at - 1.0) & (t <= ack.reach_at + 8.0)
    t, kw = t[sel], kw[sel]
    assert max_window_change_kw(t, kw) <= per_5s_kw + tol
    # It arrives around reach_at: not long before (it was held back), not long after.
    inside = np.abs(kw - target_kw) <= tolerance_kw(target_kw, SITE_MAX_KW)
    stays = np.flatnonzero(~inside)
    first_in = t[stays[-1] + 1] if stays.size and stays[-1] + 1 < len(t) else t[0]
    assert inside[-1], f"not at {target_kw} kW by reach_at + 8 s: {kw[-1]:.1f} kW"
    assert ack.reach_at - 2.0 <= first_in <= ack.reach_at + 4.0, first_in - ack.reach_at
    return ack


async def test_big_steps_keep_to_the_ramp_limits_on_the_ground_truth(site: Site) -> None:
    tail = TruthTail(site.truth)
    d = SiteDispatcher(site)
    async with d:
        tel = await d.all_devices_on()
        assert tel.ramp_limit is not None
        assert tel.ramp_limit.down_kw_per_min == DOWN_KW_PER_MIN
        assert tel.ramp_limit.up_kw_per_min is None
        # Capability within 1 s and 5 s: no more than one window's change.
        tel = await d.fresh_telemetry()
        assert tel.capability is not None
        up_5s, down_5s = tel.capability.within(5.0)
        assert up_5s is not None and up_5s <= WINDOW_KW * 1e3 + 1e-3
        assert down_5s is not None and down_5s <= DOWN_KW_PER_MIN / 60 * 5 * 1e3 + 1e-3
        # A calm start: wherever the site is, take it to a middle target and let it settle.
        start_kw = 1800.0
        await d.send_acked(target_kw=start_kw)
        await settled_at(d, start_kw, tolerance_kw(start_kw, SITE_MAX_KW), 60.0)

        # Down 1200 kW: 24 s at 50 kW/s; the rate governs (250 kW per 5 s, under the window).
        await move(d, tail, start_kw, 600.0, "down_kw_per_min", DOWN_KW_PER_MIN / 60 * 5)
        # Up 1200 kW: the window governs: 300 kW, then 300 more each time one leaves it.
        await move(d, tail, 600.0, 1800.0, "max_change_kw_per_5s", WINDOW_KW)
        assert site.daemon.poll() is None
