"""PJM regulation performance score of a replayed regulation test (DESIGN.md section 5).

Why: a site that sells regulation must follow a normalized signal s(t) in -1..+1 by running at
P(t) = base + s(t) * band, and PJM qualifies and pays it on a performance score. The benches replay
a real RegA signal against the fleet and must judge the result the way PJM would, so that
"qualifies" (>= 0.75) means something.

What: the score as PJM Manual 12 describes it, in our words. Signal and response are compared on
10-second samples in 5-minute blocks; the response is the average of the telemetered power over
each 10-second interval, normalized like the signal. Per block:

- accuracy: the largest Pearson correlation between the block's signal and the response shifted
  later by a delay d, tried from 0 to 5 minutes in sample steps (the response may therefore run up
  to 5 minutes past the block);
- delay: |(d* - 5 min) / 5 min| at the delay d* that gave that correlation;
- precision: 1 - mean|response - signal| / mean|signal|, response not shifted;
- score: the mean of the three, each weighted equally.

The overall figures are the means over the blocks. Block length, sample period and the largest
delay are parameters, so a time-compressed replay can score e.g. 30 s blocks of 1 s samples.

Choices where the definition is silent (each is also stated where it is made):

- A delay is only tried while at least half the block (and at least 3 samples) has a response
  sample at that delay; near the end of the data the pairs that would fall past it are dropped.
  Two points always correlate +-1, so a short overlap would otherwise win spuriously.
- Correlation with a flat series (standard deviation at most 1e-9, in units of the band): 1 if
  both signal and response are flat (nothing to follow and nothing moved), 0 if only one is.
- Accuracy is clipped at 0. If no delay gives a positive correlation the response is taken not
  to follow at all: d* = the largest delay, so the delay score is 0, not a free 1.
- Ties (within 1e-9) go to the shortest delay, so float noise cannot pick a later period of a
  periodic signal.
- Precision is clipped at 0. If mean|signal| is 0 it is the limit of the formula: 1 when the
  response is 0 too (mean|response| <= 1e-9), else 0.
- NaN or infinite samples raise ValueError: a hole in the data is the bench's bug to fix, and
  dropping blocks silently would flatter the score.

Only `load_pjm_csv` reads a file; everything else is pure numpy.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from drivers.core.state import F64

_FLAT = 1e-9
"""Standard deviation (normalized units) at or below which a series counts as constant."""
_TIE = 1e-9
"""Correlations this close to the best count as equal; the shortest delay wins."""
_MIN_PAIRS = 3


@dataclass(frozen=True, slots=True)
class BlockScore:
    accuracy: float
    delay: float
    precision: float
    score: float
    best_delay_s: float
    """Delay d* of the best correlation; the largest delay when nothing correlated positively."""


@dataclass(frozen=True, slots=True)
class PjmScore:
    accuracy: float
    delay: float
    precision: float
    score: float
    """Means over the blocks."""
    blocks: tuple[BlockScore, ...]


def normalize(measured_kw: npt.ArrayLike, base_kw: float, band_kw: float) -> F64:
    """Response in signal units: (measured - base) / band; +1 is base + band."""
    if not band_kw > 0:
        raise ValueError(f"band_kw must be above 0, got {band_kw}")
    return (np.asarray(measured_kw, dtype=np.float64) - base_kw) / band_kw


def resample(
    t_s: npt.ArrayLike,
    values: npt.ArrayLike,
    t0: float,
    period_s: float,
    n: int,
    *,
    mode: Literal["hold", "mean"] = "hold",
) -> F64:
    """Regular samples at t0 + k * period_s (k = 0..n-1) of an irregular series.

    The series is read as sample-and-hold: each value holds until the next sample, which is
    what a setpoint or a polled meter does. mode="hold" takes the value in force at each sample
    time (use it for the signal). mode="mean" takes the time-weighted mean over
    [t0 + k*period, t0 + (k+1)*period), PJM's convention for the response (use it to turn a
    20-50 Hz truth log into 10 s samples).

    The samples must lie inside the data: t0 >= first time, and the last sample time
    (hold) or the end of the last interval (mean) <= last time. Times must not decrease.
    """
    t = np.asarray(t_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or t.shape != v.shape:
        raise ValueError(f"t_s and values must be 1-D of equal length, got {t.shape}, {v.shape}")
    if t.size == 0:
        raise ValueError("resample needs at least one sample")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(v))):
        raise ValueError("t_s and values must be finite (no NaN or inf)")
    if np.any(np.diff(t) < 0):
        raise ValueError("t_s must not decrease")
    if mode not in ("hold", "mean"):
        raise ValueError(f"mode must be 'hold' or 'mean', got {mode!r}")
    if not period_s > 0 or n < 0:
        raise ValueError(f"need period_s > 0 and n >= 0, got {period_s}, {n}")
    last = t0 + (n - 1 if mode == "hold" else n) * period_s
    slack = 1e-9 * period_s
    if n and (t0 < t[0] - slack or last > t[-1] + slack):
        raise ValueError(
            f"samples from {t0} to {last} s ({mode}) reach outside the data [{t[0]}, {t[-1]}] s"
        )
    edges = t0 + period_s * np.arange(n + (mode == "mean"), dtype=np.float64)
    # Index of the sample in force at each edge (clipped for edges within slack of the ends).
    idx = np.clip(np.searchsorted(t, edges, side="right") - 1, 0, t.size - 1)
    if mode == "hold":
        return v[idx]
    # Integral of the held series from t[0]: exact at the samples, linear in between.
    cum = np.concatenate(([0.0], np.cumsum(v[:-1] * np.diff(t))))
    area = cum[idx] + v[idx] * (edges - t[idx])
    return np.diff(area) / period_s


def pjm_score(
    signal: npt.ArrayLike,
    response: npt.ArrayLike,
    *,
    sample_s: float = 10.0,
    block_s: float = 300.0,
    max_delay_s: float = 300.0,
) -> PjmScore:
    """Score a normalized response against a normalized signal, both sampled every sample_s.

    signal must hold a whole number of blocks. response starts at the same time and may run
    up to max_delay_s past the signal's end, so the last blocks can be correlated at long
    delays; it may not be shorter than the signal.
    """
    s = np.asarray(signal, dtype=np.float64)
    r = np.asarray(response, dtype=np.float64)
    n = _steps(block_s, sample_s, "block_s")
    max_d = _steps(max_delay_s, sample_s, "max_delay_s")
    if n < _MIN_PAIRS or max_d < 1:
        raise ValueError(
            f"a block needs at least {_MIN_PAIRS} samples and max_delay_s at least one sample"
        )
    if s.ndim != 1 or r.ndim != 1:
        raise ValueError(f"signal and response must be 1-D, got shapes {s.shape}, {r.shape}")
    if s.size == 0 or s.size % n:
        raise ValueError(
            f"signal has {s.size} samples, not a positive whole number of {n}-sample blocks"
        )
    if not s.size <= r.size <= s.size + max_d:
        raise ValueError(
            f"response has {r.size} samples; it must have as many as the signal ({s.size}) "
            f"and at most {max_d} more (max_delay_s / sample_s)"
        )
    for name, x in (("signal", s), ("response", r)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"{name} has NaN or inf at sample {bad[0]} ({bad.size} in all)")

    # Pad the response with NaN so every block sees a window at every delay; NaN marks
    # pairs that fall past the data and are left out.
    padded = np.concatenate((r, np.full(s.size + max_d - r.size, np.nan)))
    blocks = tuple(
        _block(s[i : i + n], padded[i : i + n + max_d], r[i : i + n], max_d, sample_s)
        for i in range(0, s.size, n)
    )
    return PjmScore(
        accuracy=float(np.mean([b.accuracy for b in blocks])),
        delay=float(np.mean([b.delay for b in blocks])),
        precision=float(np.mean([b.precision for b in blocks])),
        score=float(np.mean([b.score for b in blocks])),
        blocks=blocks,
    )


def _steps(duration_s: float, sample_s: float, name: str) -> int:
    if not sample_s > 0:
        raise ValueError(f"sample_s must be above 0, got {sample_s}")
    k = round(duration_s / sample_s)
    if not math.isclose(k * sample_s, duration_s, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"{name}={duration_s} is not a whole number of {sample_s} s samples")
    return k


def _block(x: F64, r_ahead: F64, r_aligned: F64, max_d: int, sample_s: float) -> BlockScore:
    n = x.size
    # Row d holds the response d samples later than the signal it is paired with.
    y = sliding_window_view(r_ahead, n)[: max_d + 1]
    ok = np.isfinite(y)
    cnt = ok.sum(axis=1)
    usable = cnt >= max(_MIN_PAIRS, (n + 1) // 2)
    cnt_safe = np.maximum(cnt, 1)
    xm = np.where(ok, x, 0.0)
    ym = np.where(ok, y, 0.0)
    dx = np.where(ok, x - (xm.sum(axis=1) / cnt_safe)[:, None], 0.0)
    dy = np.where(ok, y - (ym.sum(axis=1) / cnt_safe)[:, None], 0.0)
    sxx = (dx * dx).sum(axis=1)
    syy = (dy * dy).sum(axis=1)
    sxy = (dx * dy).sum(axis=1)
    flat_x = np.sqrt(sxx / cnt_safe) <= _FLAT
    flat_y = np.sqrt(syy / cnt_safe) <= _FLAT
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    # Flat series: nothing to correlate; both flat follows, one flat does not.
    corr = np.where(flat_x | flat_y, np.where(flat_x & flat_y, 1.0, 0.0), corr)
    corr = np.where(usable, corr, -np.inf)

    best = float(corr.max())
    if best > 0:
        d_star = int(np.flatnonzero(corr >= best - _TIE)[0])
        accuracy = min(best, 1.0)
    else:
        d_star, accuracy = max_d, 0.0
    delay = abs((d_star - max_d) / max_d)

    err = float(np.mean(np.abs(r_aligned - x)))
    mean_abs_s = float(np.mean(np.abs(x)))
    # With a zero signal, the limit of the formula: full marks only for a zero response.
    precision = max(0.0, 1.0 - err / mean_abs_s) if mean_abs_s > 0 else float(err <= _FLAT)
    score = (accuracy + delay + precision) / 3.0
    return BlockScore(accuracy, delay, precision, score, d_star * sample_s)


def load_pjm_csv(path: str | Path, column: str) -> tuple[F64, F64]:
    """Read one day of a PJM regulation signal CSV (e.g. data/pjm_rega_2017-08_2s.csv).

    The file has a header row naming one column per day ("8/1/2017", ...) after the time
    column, then one row per sample: time of day HH:MM:SS, then the signal of each day in
    -1..+1. Returns (t_s, s) with t_s in seconds from the first row; a step back in the time
    of day by 12 h or more is read as passing midnight (the last row, 0:00:00, is 24:00:00).
    Malformed rows raise ValueError naming the file and the line.
    """
    p = Path(path)
    ts: list[float] = []
    vals: list[float] = []
    with p.open(newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{p}: empty file")
        names = [h.strip() for h in header]
        if column not in names[1:]:
            raise ValueError(f"{p}: no column {column!r}; columns are {names[1:]}")
        col = names.index(column)
        prev_tod: float | None = None
        t = 0.0
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(names):
                raise ValueError(f"{p}, line {line}: {len(row)} fields, header has {len(names)}")
            try:
                tod = _time_of_day(row[0])
                value = float(row[col])
            except ValueError as e:
                raise ValueError(f"{p}, line {line}: {e}") from None
            if not -1.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{p}, line {line}: signal {row[col]!r} outside -1..+1")
            if prev_tod is not None:
                step = tod - prev_tod
                if step <= -43_200:
                    step += 86_400
                if step <= 0:
                    raise ValueError(f"{p}, line {line}: time {row[0]!r} does not advance")
                t += step
            prev_tod = tod
            ts.append(t)
            vals.append(value)
    if not ts:
        raise ValueError(f"{p}: no data rows")
    return np.asarray(ts, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def _time_of_day(text: str) -> float:
    parts = text.strip().split(":")
    if len(parts) != 3 or not all(q.isdigit() for q in parts):
        raise ValueError(f"time {text!r} is not HH:MM:SS")
    h, m, sec = (int(q) for q in parts)
    if h > 24 or m > 59 or sec > 59:
        raise ValueError(f"time {text!r} is out of range")
    return float(h * 3600 + m * 60 + sec)
