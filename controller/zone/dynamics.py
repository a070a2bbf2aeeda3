"""A zone's capability as its parent's model of it: bounds and ramp rates. Pure, no I/O.

A zone is a child rampd; its messages are read with `controller.wire`'s decoders. Here is what
only a parent needs: telemetry it can use (`zone_telemetry`), and `derive_dynamics`, which
turns a zone's capability into the row's bounds and ramp rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controller.wire.codec import WireError
from controller.wire.telemetry import Telemetry

ROOM_FOR_RATES: Final = 0.25
REST_HEADROOM: Final = 0.9
"""A reach at least this fraction of the headroom in its direction is cut short by the bound:
it says the zone is at least that fast, not how fast."""


@dataclass(frozen=True, slots=True)
class ZoneDynamics:
    """A zone row's bounds and ramp rates as its capability says (None: no news)."""

    p_min_w: float
    p_max_w: float
    ramp_up_w_s: float | None
    ramp_down_w_s: float | None


def zone_telemetry(payload: bytes) -> Telemetry:
    """A zone's telemetry, with the measurement its parent writes through the zone's port.

    ValueError when it does not decode, or carries no power yet (a zone before its first
    cycle): the parent has nothing to take from it.
    """
    tel = Telemetry.decode(payload)
    if tel.measured_w is None:
        raise WireError("measured_kw missing", code="missing")
    return tel


def _reach(tel: Telemetry, up: bool) -> tuple[float | None, float | None]:
    """What the zone reaches within 1 s and 5 s in one direction (None: not reported)."""
    if tel.capability is None:
        return None, None
    (u1, d1), (u5, d5) = tel.capability.within(1.0), tel.capability.within(5.0)
    return (u1, u5) if up else (d1, d5)


def _rate(reach: tuple[float | None, float | None], headroom_w: float) -> float | None:
    """The rate a zone sustains in one direction, from what it reaches within 1 s and 5 s.

    The 5 s figure when the bound does not cut it short: it counts the slow devices, so the
    parent's model of the zone does not run ahead of it (a model ahead of its device makes
    the allocator push the others for what is only late). Else the 1 s figure, which
    includes the zone's own dead time (slightly slow, on the safe side). None when both are
    cut short by a small headroom or not reported.
    """
    r1, r5 = reach
    if r5 is not None and 0 < r5 < REST_HEADROOM * headroom_w:
        return r5 / 5.0
    if r1 is not None and r1 > 0:
        return r1 / 1.0
    return None


def derive_dynamics(tel: Telemetry, lo_w: float, hi_w: float) -> ZoneDynamics | None:
    """Bounds from the zone's steady-state range, clipped to the configured ``[lo_w, hi_w]``;
    ramp rates only while the zone is at its target, or held at a bound by one out of its
    reach (its capability mid-move describes the move, not the zone), and only in a
    direction with room (a quarter of its range: near a
    bound, what is left to move is a few devices' worth, not the zone's pace). None while the
    range does not hold the zone's own measurement (a zone starting up, before its devices
    have reported, offers next to nothing)."""
    if tel.min_w is None or tel.max_w is None or tel.measured_w is None:
        return None
    slack = 0.1 * (hi_w - lo_w)
    if not tel.min_w - slack <= tel.measured_w <= tel.max_w + slack:
        return None
    p_min = min(max(tel.min_w, lo_w), hi_w)
    p_max = min(max(tel.max_w, p_min), hi_w)
    up = down = None
    if not tel.physical_min_s:  # 0: at its target; None: at a bound, the target beyond it
        room = ROOM_FOR_RATES * (p_max - p_min)
        m = min(max(tel.measured_w, p_min), p_max)
        if p_max - m > room:
            up = _rate(_reach(tel, up=True), p_max - m)
        if m - p_min > room:
            down = _rate(_reach(tel, up=False), m - p_min)
    return ZoneDynamics(p_min, p_max, up, down)
