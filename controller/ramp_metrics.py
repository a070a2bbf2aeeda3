"""Figures of one ramp, computed from a ground-truth time series (simulator or meter log).

Used by the demo, the benches and the end-to-end tests, so all three judge a ramp alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RampFigures:
    t0: float
    target_kw: float
    start_kw: float
    tolerance_kw: float
    settle_s: float | None
    """Seconds from t0 until the power enters the band and stays until the window ends."""
    overshoot_kw: float
    """Largest excursion beyond the target, away from where the ramp started (>= 0)."""
    iae_kwh: float
    """Integral of |power - target| over the window, in kWh."""


def tolerance_kw(target_kw: float, site_max_kw: float) -> float:
    """+-2% of the target or +-0.5% of the site maximum, whichever is larger."""
    return max(0.02 * abs(target_kw), 0.005 * site_max_kw)


def ramp_figures(
    t: F64, kw: F64, *, t0: float, t_end: float, target_kw: float, tol_kw: float
) -> RampFigures:
    """Figures of the response in [t0, t_end] to a step to target_kw issued at t0."""
    sel = (t >= t0) & (t <= t_end)
    ts, ps = t[sel], kw[sel]
    before = kw[t < t0]
    start = float(before[-1]) if before.size else (float(ps[0]) if ps.size else float("nan"))
    if ts.size == 0:
        return RampFigures(t0, target_kw, start, tol_kw, None, 0.0, 0.0)
    err = ps - target_kw
    outside = np.abs(err) > tol_kw
    if outside[-1]:
        settle = None
    else:
        idx = np.flatnonzero(outside)
        # Settled at the sample after the last one outside the band (or at once).
        settle = float(ts[idx[-1] + 1] - t0) if idx.size else float(ts[0] - t0)
    direction = np.sign(target_kw - start) if start == start else 0.0
    overshoot = float(max(0.0, np.max(err * direction))) if direction else 0.0
    iae = float(np.trapezoid(np.abs(err), ts) / 3600.0) if ts.size > 1 else 0.0
    return RampFigures(t0, target_kw, start, tol_kw, settle, overshoot, iae)


def read_truth(path: Path, since_t: float = 0.0) -> tuple[F64, F64]:
    """Read a simulator truth log ({"t", "site_kw"} per line); a torn last line is skipped."""
    ts: list[float] = []
    ps: list[float] = []
    with path.open("rb") as fh:
        for line in fh:
            rec = _parse(line)
            if rec is not None and rec[0] >= since_t:
                ts.append(rec[0])
                ps.append(rec[1])
    return np.asarray(ts), np.asarray(ps)


def _parse(line: bytes) -> tuple[float, float] | None:
    try:
        rec = json.loads(line)
        return float(rec["t"]), float(rec["site_kw"])
    except (ValueError, KeyError, TypeError):
        return None


class TruthTail:
    """Follows a growing truth log without rereading it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.t: list[float] = []
        self.kw: list[float] = []

    def poll(self) -> int:
        """Read what was appended; returns the number of new samples."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return 0
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        n = 0
        for rec in filter(None, map(_parse, lines)):
            self.t.append(rec[0])
            self.kw.append(rec[1])
            n += 1
        return n

    def arrays(self) -> tuple[F64, F64]:
        return np.asarray(self.t), np.asarray(self.kw)

    def latest(self) -> float | None:
        return self.kw[-1] if self.kw else None


def format_table(rows: Iterable[tuple[str, RampFigures]]) -> str:
    out = [f"{'step':<28} {'target kW':>10} {'settle s':>9} {'overshoot kW':>13} {'IAE kWh':>9}"]
    for name, f in rows:
        settle = f"{f.settle_s:.2f}" if f.settle_s is not None else "never"
        out.append(
            f"{name:<28} {f.target_kw:>10.1f} {settle:>9} {f.overshoot_kw:>13.1f} {f.iae_kwh:>9.3f}"
        )
    return "\n".join(out)
