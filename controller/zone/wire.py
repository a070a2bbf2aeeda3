"""A zone's side of the dispatch protocol, seen from its parent: pure, no I/O.

A zone is a child rampd: it publishes a retained `status`, `telemetry` every second (measured
power, target, capability) and one `ack` per dispatch, and takes `dispatch` and `heartbeat`
exactly as from a grid dispatcher (README "Dispatch protocol"). Anything it sends that is not
what the protocol says raises `ValueError` with a short reason, never anything else.

`derive_dynamics` turns a zone's capability into the row's bounds and ramp rates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from controller.dispatch import MAX_PAYLOAD_BYTES, rfc3339, sign_dispatch

ROOM_FOR_RATES: Final = 0.25
REST_HEADROOM: Final = 0.9
"""A reach at least this fraction of the headroom in its direction is cut short by the bound:
it says the zone is at least that fast, not how fast."""


@dataclass(frozen=True, slots=True)
class ZoneTelemetry:
    """The parts of a zone's telemetry its parent uses, SI units."""

    measured_w: float
    target_w: float | None
    min_w: float | None
    max_w: float | None
    up_w: tuple[float | None, float | None]
    """Power the zone can add within 1 s and 5 s (None: not reported)."""
    down_w: tuple[float | None, float | None]
    physical_min_s: float | None
    """Least time to the zone's current target (0: there; None: out of reach or unknown)."""


@dataclass(frozen=True, slots=True)
class ZoneDynamics:
    """A zone row's bounds and ramp rates as its capability says (None: no news)."""

    p_min_w: float
    p_max_w: float
    ramp_up_w_s: float | None
    ramp_down_w_s: float | None


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload too large ({len(payload)} bytes)")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("payload not UTF-8 JSON") from None
    except ValueError as exc:
        raise ValueError(f"payload not JSON: {str(exc).splitlines()[0][:60]}") from None
    if not isinstance(obj, dict):
        raise ValueError("payload not a JSON object")
    return obj


def _kw(obj: Any, key: str, *, required: bool = False) -> float | None:
    """``obj[key]`` in kW as finite W; None when absent or null (ValueError if required)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        if required:
            raise ValueError(f"{key} missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    w = float(value) * 1e3
    if not math.isfinite(w):
        raise ValueError(f"{key} must be finite")
    return w


def _reach(obj: Any, key: str) -> tuple[float | None, float | None]:
    cap = obj.get("capability")
    side = cap.get(key) if isinstance(cap, dict) else None
    r1, r5 = _kw(side, "1s"), _kw(side, "5s")
    if (r1 is not None and r1 < 0) or (r5 is not None and r5 < 0):
        raise ValueError(f"capability {key} negative")
    return r1, r5


def parse_telemetry(payload: bytes) -> ZoneTelemetry:
    obj = _object(payload)
    measured = _kw(obj, "measured_kw", required=True)
    assert measured is not None  # required
    pm = obj.get("physical_min_s")
    if pm is not None and (
        isinstance(pm, bool) or not isinstance(pm, int | float) or not 0 <= pm < math.inf
    ):
        raise ValueError("physical_min_s must be a number >= 0 or null")
    lo, hi = _kw(obj, "min_kw"), _kw(obj, "max_kw")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError("min_kw above max_kw")
    return ZoneTelemetry(
        measured_w=measured,
        target_w=_kw(obj, "target_kw"),
        min_w=lo,
        max_w=hi,
        up_w=_reach(obj, "up_kw"),
        down_w=_reach(obj, "down_kw"),
        physical_min_s=None if pm is None else float(pm),
    )


def parse_status(payload: bytes) -> tuple[bool, str]:
    """(online, detail) from a zone's retained status."""
    obj = _object(payload)
    state = obj.get("state")
    if state not in ("online", "offline"):
        raise ValueError("status state must be online or offline")
    detail = obj.get("detail")
    return state == "online", detail[:200] if isinstance(detail, str) else ""


def parse_ack(payload: bytes) -> tuple[str, bool, str]:
    """(dispatch id, accepted, reason) from a zone's ack."""
    obj = _object(payload)
    ack_id, accepted, reason = obj.get("id"), obj.get("accepted"), obj.get("reason")
    if not isinstance(ack_id, str) or not isinstance(accepted, bool):
        raise ValueError("ack needs a string id and a boolean accepted")
    return ack_id, accepted, reason[:200] if isinstance(reason, str) else ""


def dispatch_payload(
    dispatch_id: str, seq: int, target_w: float, now_unix: float, key: bytes | None
) -> bytes:
    """A setpoint dispatch to a zone (at once: the zone ramps as fast as it can), signed
    with ``key`` when the zone wants signed dispatches."""
    body: dict[str, Any] = {
        "id": dispatch_id,
        "seq": seq,
        "issued_at": rfc3339(now_unix),
        "mode": "setpoint",
        "target_kw": round(target_w / 1e3, 3),
        "ramp_s": 0,
    }
    if key is not None:
        body["sig"] = sign_dispatch(body, key)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


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


def derive_dynamics(tel: ZoneTelemetry, lo_w: float, hi_w: float) -> ZoneDynamics | None:
    """Bounds from the zone's steady-state range, clipped to the configured ``[lo_w, hi_w]``;
    ramp rates only while the zone is at its target, or held at a bound by one out of its
    reach (its capability mid-move describes the move, not the zone), and only in a
    direction with room (a quarter of its range: near a
    bound, what is left to move is a few devices' worth, not the zone's pace). None while the
    range does not hold the zone's own measurement (a zone starting up, before its devices
    have reported, offers next to nothing)."""
    if tel.min_w is None or tel.max_w is None:
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
            up = _rate(tel.up_w, p_max - m)
        if m - p_min > room:
            down = _rate(tel.down_w, m - p_min)
    return ZoneDynamics(p_min, p_max, up, down)
