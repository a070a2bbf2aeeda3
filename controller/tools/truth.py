"""Readers of the simulator's ground-truth log (`{"t": unix s, "site_kw": kW, "hz": grid
frequency}` per line; `hz` NaN where a log has none).

The log is the simulator's word on what the site drew, independent of the daemon's: the
benches, the demo, `rampd report` and the end-to-end tests judge ramps on it (with
`controller.ramp_score`, in W: multiply by 1e3). The readers return the file's kW.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from controller.ramp_score import tolerance_w
from drivers.core.state import F64


def tolerance_kw(target_kw: float, site_max_kw: float) -> float:
    """`ramp_score.tolerance_w` in the truth log's unit."""
    return tolerance_w(target_kw * 1e3, site_max_kw * 1e3) / 1e3


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
    rec = _parse_hz(line)
    return None if rec is None else (rec[0], rec[1])


def _parse_hz(line: bytes) -> tuple[float, float, float] | None:
    try:
        rec = json.loads(line)
        hz = rec.get("hz")
        return float(rec["t"]), float(rec["site_kw"]), float("nan") if hz is None else float(hz)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class TruthTail:
    """Follows a growing truth log without rereading it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.t: list[float] = []
        self.kw: list[float] = []
        self.hz: list[float] = []

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
        for rec in filter(None, map(_parse_hz, lines)):
            self.t.append(rec[0])
            self.kw.append(rec[1])
            self.hz.append(rec[2])
            n += 1
        return n

    def arrays(self) -> tuple[F64, F64]:
        return np.asarray(self.t), np.asarray(self.kw)

    def latest(self) -> float | None:
        return self.kw[-1] if self.kw else None
