"""The simulated grid's frequency: what the site meter serves as SunSpec `Hz`.

Three modes, one scalar stepped with the physics:

- noise (the default): nominal plus an Ornstein-Uhlenbeck wander (stationary sigma
  `sigma_hz`, time constant `tau_s`: load-generation imbalance that governors and AGC pull
  back over tens of seconds) plus white measurement-scale noise (`fast_sigma_hz`);
- hold: a fixed value, exactly (a test asks for 59.8 Hz and reads 59.8 Hz);
- trace: a recording replayed from now, its per-unit deviation mapped onto this grid's
  nominal, f = nominal * (1 + (f_trace - trace_nominal) / trace_nominal), interpolated
  linearly at the physics rate. At the trace's end the grid returns to noise around nominal
  (the wander restarts at zero: the end of a trace is where its event was declared over).

Hold and trace are noise-free so that tests can expect exact values.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

SIGMA_HZ = 0.015
"""Stationary standard deviation of the slow wander (a large interconnection's normal
frequency spread is of this order: ~10-20 mHz)."""
TAU_S = 30.0
"""Time constant of the wander: deviations decay over tens of seconds."""
FAST_SIGMA_HZ = 0.002
"""White noise on every sample (~2 mHz: measurement and fast load noise)."""
PLAUSIBLE_PU = 0.1
"""A frequency further than this from nominal (per unit) is refused as not a grid's (load
shedding starts within 3 %, generators trip within 5 %)."""

FREQUENCY_COLUMNS = ("hz", "frequency", "frequency_hz", "freq", "f_hz", "f")
"""Column names a trace's frequency may have (case-insensitive), first match wins."""
TIME_COLUMNS = ("t_s", "t", "time_s", "seconds")
"""Columns of seconds from the trace's start; else a timestamp column, else 1 s samples."""
TIMESTAMP_COLUMNS = ("timestamp_utc", "timestamp", "time", "datetime")
F64Array = npt.NDArray[np.float64]


class TraceError(ValueError):
    """A trace that cannot be replayed; the message says why (for a 400 answer)."""


class GridMode(StrEnum):
    NOISE = "noise"
    HOLD = "hold"
    TRACE = "trace"


@dataclass(frozen=True, slots=True)
class FrequencyTrace:
    """A recording: seconds from its first sample (ascending, from 0) and frequencies in Hz
    on a grid of `nominal_hz`."""

    name: str
    t_s: F64Array
    hz: F64Array
    nominal_hz: float

    def __post_init__(self) -> None:
        if len(self.t_s) != len(self.hz) or len(self.t_s) < 2:
            raise TraceError(f"{self.name}: a trace needs at least two samples")
        if not (np.isfinite(self.t_s).all() and np.isfinite(self.hz).all()):
            raise TraceError(f"{self.name}: times and frequencies must be finite numbers")
        if not (np.diff(self.t_s) > 0).all():
            raise TraceError(f"{self.name}: sample times must increase")
        if not (math.isfinite(self.nominal_hz) and self.nominal_hz > 0):
            raise TraceError(f"{self.name}: trace_nominal_hz must be a positive number")
        worst = float(np.max(np.abs(self.hz / self.nominal_hz - 1.0)))
        if worst > PLAUSIBLE_PU:
            raise TraceError(
                f"{self.name}: frequencies {self.hz.min():g}..{self.hz.max():g} Hz are not "
                f"a {self.nominal_hz:g} Hz grid's (trace_nominal_hz wrong?)"
            )

    @property
    def duration_s(self) -> float:
        return float(self.t_s[-1])

    def at(self, t_s: float, nominal_hz: float) -> float:
        """The trace at `t_s` from its start, mapped per unit onto `nominal_hz`."""
        f = float(np.interp(t_s, self.t_s, self.hz))
        return nominal_hz * (1.0 + (f - self.nominal_hz) / self.nominal_hz)

    @classmethod
    def load(cls, path: str | Path, nominal_hz: float | None = None) -> FrequencyTrace:
        """Read a CSV with a header: a frequency column (`FREQUENCY_COLUMNS`) and a time
        column (`TIME_COLUMNS` in seconds, or an ISO timestamp; none: 1 s samples).
        `nominal_hz` None: 50 or 60, whichever the median is nearer. Raises TraceError."""
        p = Path(path)
        if not p.is_file():
            raise TraceError(f"trace file not found: {path}")
        try:
            with p.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError) as exc:
            raise TraceError(f"cannot read trace {path}: {exc}") from None
        if len(rows) < 3:
            raise TraceError(f"{p.name}: needs a header and at least two samples")
        header = [h.strip().lower() for h in rows[0]]
        body = [r for r in rows[1:] if any(c.strip() for c in r)]
        col = _column(header, FREQUENCY_COLUMNS)
        if col is None:
            raise TraceError(
                f"{p.name}: no frequency column (one of {', '.join(FREQUENCY_COLUMNS)}); "
                f"columns: {', '.join(header)}"
            )
        hz = _floats(p.name, body, col, header[col])
        t = _times(p.name, header, body)
        if nominal_hz is None:
            nominal_hz = 50.0 if abs(float(np.median(hz)) - 50.0) < 5.0 else 60.0
        return cls(p.name, t - t[0], hz, float(nominal_hz))


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _floats(name: str, body: list[list[str]], col: int, label: str) -> F64Array:
    try:
        return np.array([float(r[col]) for r in body], dtype=np.float64)
    except (ValueError, IndexError):
        raise TraceError(f"{name}: column {label!r} holds a value that is not a number") from None


def _times(name: str, header: list[str], body: list[list[str]]) -> F64Array:
    col = _column(header, TIME_COLUMNS)
    if col is not None:
        return _floats(name, body, col, header[col])
    col = _column(header, TIMESTAMP_COLUMNS)
    if col is None:
        return np.arange(len(body), dtype=np.float64)
    try:
        stamps = [datetime.fromisoformat(r[col].strip()) for r in body]
    except (ValueError, IndexError):
        raise TraceError(f"{name}: column {header[col]!r} holds a bad timestamp") from None
    return np.array([(s - stamps[0]).total_seconds() for s in stamps], dtype=np.float64)


class GridFrequency:
    """The grid frequency at the site, stepped with the physics (`step(dt)`); `hz` is the
    value now, and changes of mode take effect at once (the next meter read sees them)."""

    def __init__(
        self,
        nominal_hz: float = 60.0,
        *,
        seed: int | list[int] = 0,
        sigma_hz: float = SIGMA_HZ,
        tau_s: float = TAU_S,
        fast_sigma_hz: float = FAST_SIGMA_HZ,
    ) -> None:
        if not (math.isfinite(nominal_hz) and nominal_hz > 0):
            raise ValueError(f"nominal_hz must be positive, got {nominal_hz!r}")
        if not tau_s > 0 or sigma_hz < 0 or fast_sigma_hz < 0:
            raise ValueError("need tau_s > 0, sigma_hz >= 0 and fast_sigma_hz >= 0")
        self.nominal_hz = float(nominal_hz)
        self.sigma_hz = float(sigma_hz)
        self.tau_s = float(tau_s)
        self.fast_sigma_hz = float(fast_sigma_hz)
        self._rng = np.random.default_rng(seed)
        self.mode = GridMode.NOISE
        self._wander = 0.0  # the OU state: deviation from nominal, Hz
        self._held = self.nominal_hz
        self.trace: FrequencyTrace | None = None
        self.trace_s = 0.0  # position in the trace
        self.hz = self.nominal_hz

    # --- modes ---

    def hold(self, hz: float) -> None:
        if not (math.isfinite(hz) and abs(hz / self.nominal_hz - 1.0) <= PLAUSIBLE_PU):
            raise ValueError(
                f"hz must be within {PLAUSIBLE_PU:.0%} of the nominal {self.nominal_hz:g} Hz"
            )
        self.mode = GridMode.HOLD
        self.trace = None
        self._held = float(hz)
        self.hz = self._held

    def noise(self) -> None:
        """Back to noise around nominal, the wander restarting from zero."""
        self.mode = GridMode.NOISE
        self.trace = None
        self._wander = 0.0
        self.hz = self.nominal_hz

    def replay(self, trace: FrequencyTrace) -> None:
        """Replay `trace` from its start, now."""
        self.mode = GridMode.TRACE
        self.trace = trace
        self.trace_s = 0.0
        self.hz = trace.at(0.0, self.nominal_hz)

    # --- stepping ---

    def step(self, dt: float) -> float:
        if self.mode is GridMode.TRACE and self.trace is not None:
            self.trace_s += dt
            if self.trace_s <= self.trace.duration_s + 1e-9:  # summed steps round
                self.hz = self.trace.at(self.trace_s, self.nominal_hz)
                return self.hz
            self.noise()
        if self.mode is GridMode.HOLD:
            self.hz = self._held
            return self.hz
        # Exact discretization of the OU process: stationary sigma whatever dt is.
        rho = math.exp(-dt / self.tau_s)
        z_slow, z_fast = self._rng.standard_normal(2)
        self._wander = rho * self._wander + self.sigma_hz * math.sqrt(1 - rho * rho) * z_slow
        self.hz = self.nominal_hz + self._wander + self.fast_sigma_hz * float(z_fast)
        return self.hz

    def status(self) -> dict[str, object]:
        """What GET /grid answers."""
        trace = self.trace
        out: dict[str, object] = {
            "mode": self.mode.value,
            "hz": round(self.hz, 5),
            "nominal_hz": self.nominal_hz,
            "trace": None,
            "position_s": None,
            "remaining_s": None,
        }
        if self.mode is GridMode.TRACE and trace is not None:
            out["trace"] = trace.name
            out["trace_nominal_hz"] = trace.nominal_hz
            out["position_s"] = round(self.trace_s, 3)
            out["remaining_s"] = round(max(trace.duration_s - self.trace_s, 0.0), 3)
        return out
