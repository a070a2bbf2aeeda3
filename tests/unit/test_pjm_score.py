"""PJM performance score on hand-computed cases, and the RegA CSV loader on the real file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from controller.tools.pjm_score import (
    BlockScore,
    load_pjm_csv,
    normalize,
    pjm_score,
    resample,
)

REGA = Path(__file__).resolve().parents[2] / "bench" / "data" / "pjm_rega_2017-08_2s.csv"

# One default block (30 samples of 10 s): +1 for 100 s, -1 for 100 s, +1 for 100 s.
# mean|s| = 1.
SQUARE = np.array([1.0] * 10 + [-1.0] * 10 + [1.0] * 10)
NAN_AT_7 = np.where(np.arange(30) == 7, np.nan, SQUARE)


def test_perfect_response_scores_one_and_ties_go_to_the_shortest_delay() -> None:
    # Period of 10 samples; the response runs the full 5 min past the block, so it
    # correlates perfectly at d = 0, 100, 200 and 300 s. d* must be 0: delay = |(0-300)/300| = 1.
    # r == s: precision = 1 - 0/mean|s| = 1. Score = (1 + 1 + 1)/3 = 1.
    period = [1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -0.5, 0.0, 0.5, 1.0]
    s = np.tile(period, 3)
    res = pjm_score(s, np.tile(period, 6))
    assert res.accuracy == pytest.approx(1.0)
    assert res.delay == 1.0
    assert res.precision == 1.0
    assert res.score == pytest.approx(1.0)
    assert res.blocks == (BlockScore(res.accuracy, 1.0, 1.0, res.score, 0.0),)


def test_float_noise_does_not_move_the_best_delay_to_a_later_period() -> None:
    # s = sin(2 pi k / 8), r = 0.7 s for 60 samples: every 80 s the correlation is 1 again.
    # In floating point the one at 80 s comes out a hair above the one at 0 s; within 1e-9
    # they tie and the shortest delay wins: d* = 0, delay 1.
    # Precision = 1 - 0.3 mean|s| / mean|s| = 0.7. Score = (1 + 1 + 0.7)/3 = 0.9.
    s = np.sin(2 * np.pi * np.arange(60) / 8)
    b = pjm_score(s[:30], 0.7 * s).blocks[0]
    assert (b.best_delay_s, b.delay) == (0.0, 1.0)
    assert b.accuracy == pytest.approx(1.0)
    assert b.precision == pytest.approx(0.7)
    assert b.score == pytest.approx(0.9)


def test_response_two_samples_late() -> None:
    # r[j] = s[j-2], with r = 0 (at base) for the first 20 s; 32 samples, 2 past the block.
    # At d = 20 s the pairs (s[k], r[k+2]) are identical: accuracy 1, best delay 20 s,
    # delay = |(20 - 300)/300| = 280/300 = 0.9333...
    # Precision (no shift): |r - s| = 1 at k = 0, 1 (0 vs +1); 2 at k = 10, 11 (+1 vs -1)
    # and at k = 20, 21 (-1 vs +1); 0 elsewhere. Sum 10, mean 1/3; precision = 1 - 1/3 = 2/3.
    # Score = (1 + 14/15 + 2/3)/3 = 2.6/3 = 0.8666...
    r = np.concatenate(([0.0, 0.0], SQUARE))
    res = pjm_score(SQUARE, r)
    (b,) = res.blocks
    assert b.best_delay_s == 20.0
    assert b.accuracy == pytest.approx(1.0)
    assert b.delay == pytest.approx(280 / 300)
    assert b.precision == pytest.approx(2 / 3)
    assert b.score == pytest.approx(2.6 / 3)
    assert res.score == b.score
    # Without the 2 samples past the block, d = 20 s pairs only 28 samples: still correlation 1.
    assert pjm_score(SQUARE, r[:30]).blocks[0].best_delay_s == 20.0


def test_half_amplitude_response() -> None:
    # r = 0.5 s: correlation is scale-free, accuracy 1 at d = 0, delay = 1.
    # |r - s| = 0.5 |s|, so precision = 1 - 0.5 mean|s| / mean|s| = 0.5.
    # Score = (1 + 1 + 0.5)/3 = 0.8333...
    res = pjm_score(SQUARE, 0.5 * SQUARE)
    assert res.accuracy == pytest.approx(1.0)
    assert res.delay == 1.0
    assert res.precision == pytest.approx(0.5)
    assert res.score == pytest.approx(2.5 / 3)


def test_constant_response_to_a_varying_signal() -> None:
    # Flat response: correlation undefined at every delay -> 0; nothing correlates positively,
    # so d* = 300 s and delay = |(300-300)/300| = 0 (no free delay points for doing nothing).
    # At base (r = 0): precision = 1 - mean|s|/mean|s| = 0; score 0.
    at_base = pjm_score(SQUARE, np.zeros(30)).blocks[0]
    assert at_base == BlockScore(0.0, 0.0, 0.0, 0.0, 300.0)
    # Held at r = 0.5: |0.5 - 1| = 0.5 on 20 samples, |0.5 + 1| = 1.5 on 10; sum 25, mean 5/6.
    # Precision = 1 - 5/6 = 1/6; score = (0 + 0 + 1/6)/3 = 1/18.
    held = pjm_score(SQUARE, np.full(30, 0.5)).blocks[0]
    assert (held.accuracy, held.delay) == (0.0, 0.0)
    assert held.precision == pytest.approx(1 / 6)
    assert held.score == pytest.approx(1 / 18)


def test_constant_signal() -> None:
    # 1 s samples, 4-sample blocks, delays 0..2 s. Signal pegged at +1 (RegA does saturate).
    # Response [0, 1, 1, 1 | 1, 1]: d = 0 window [0, 1, 1, 1] moves while the signal is flat -> 0;
    # d = 1 window [1, 1, 1, 1] is flat like the signal -> 1. Accuracy 1, d* = 1 s,
    # delay = |(1 - 2)/2| = 0.5. Precision: |r - s| = [1, 0, 0, 0], mean 1/4, mean|s| = 1 -> 0.75.
    # Score = (1 + 0.5 + 0.75)/3 = 0.75.
    kw = {"sample_s": 1.0, "block_s": 4.0, "max_delay_s": 2.0}
    b = pjm_score(np.ones(4), [0.0, 1, 1, 1, 1, 1], **kw).blocks[0]
    assert b == BlockScore(1.0, 0.5, 0.75, 0.75, 1.0)
    # A response that matches a flat signal exactly scores 1 throughout.
    assert pjm_score(np.full(4, -1.0), np.full(4, -1.0), **kw).score == 1.0


def test_zero_signal_precision_is_the_limit_of_the_formula() -> None:
    # mean|s| = 0: precision 1 if the response is 0 too, else 0 (1 - e/m -> -inf, clipped).
    # Both flat -> accuracy 1 at d = 0, delay 1.
    kw = {"sample_s": 1.0, "block_s": 4.0, "max_delay_s": 2.0}
    assert pjm_score(np.zeros(4), np.zeros(4), **kw).blocks[0].precision == 1.0
    b = pjm_score(np.zeros(4), np.full(4, 0.01), **kw).blocks[0]
    assert (b.accuracy, b.delay, b.precision) == (1.0, 1.0, 0.0)


def test_two_blocks_score_is_the_mean_of_the_blocks() -> None:
    # 1 s samples, 4-sample blocks, delays 0..2 s; the response runs 2 samples past the signal.
    s = [1.0, 1, -1, -1, -1, 1, 1, -1]
    r = [1.0, 1, -1, -1, -1, -1, 1, 1, -1, -1]
    # Block 1, s = [1, 1, -1, -1]:
    #   d=0: r[0:4] = s -> 1.  d=1: r[1:5] = [1, -1, -1, -1]: dx = [1, 1, -1, -1],
    #   dy = [1.5, -.5, -.5, -.5], sxy = 2, sxx = 4, syy = 3 -> 2/sqrt(12) = 0.577.
    #   d=2: r[2:6] flat -> 0. Accuracy 1, d* = 0, delay 1, precision 1: block score 1.
    # Block 2, s = [-1, 1, 1, -1]:
    #   d=0: r[4:8] = [-1, -1, 1, 1], sxy = 1 - 1 + 1 - 1 = 0 -> 0.  d=1: r[5:9] = s -> 1.
    #   d=2: r[6:10] = [1, 1, -1, -1], sxy = 0 -> 0. Accuracy 1, d* = 1 s, delay |(1-2)/2| = 0.5.
    #   Precision: |r[4:8] - s| = [0, 2, 0, 2], mean 1, mean|s| = 1 -> 0. Score (1 + .5 + 0)/3 = .5.
    # Overall: accuracy 1, delay 0.75, precision 0.5, score (1 + 0.5)/2 = 0.75.
    res = pjm_score(s, r, sample_s=1.0, block_s=4.0, max_delay_s=2.0)
    b1, b2 = res.blocks
    assert b1.accuracy == pytest.approx(1.0)
    assert (b1.delay, b1.precision, b1.best_delay_s) == (1.0, 1.0, 0.0)
    assert b2.accuracy == pytest.approx(1.0)
    assert (b2.delay, b2.precision, b2.best_delay_s) == (0.5, 0.0, 1.0)
    assert b2.score == pytest.approx(0.5)
    assert res.accuracy == pytest.approx(1.0)
    assert res.delay == 0.75
    assert res.precision == 0.5
    assert res.score == pytest.approx(0.75)


def test_delays_that_overlap_less_than_half_a_block_are_not_tried() -> None:
    # s = [1, -1, 1, -1], r = [0, 0, 1, -1], nothing past the block, delays 0..3 s.
    # d=2 would pair only (1, 1), (-1, -1): a spurious correlation of 1, so it is skipped (2 < 3).
    # d=0: means 0 and 0, sxy = 1 + 1 = 2, sxx = 4, syy = 2 -> 2/sqrt(8) = 1/sqrt(2).
    # d=1: x = [1, -1, 1], y = [0, 1, -1]: dx = [2/3, -4/3, 2/3], dy = y, sxy = -2 < 0.
    # Accuracy 1/sqrt(2) at d* = 0, delay 1.
    b = pjm_score([1.0, -1, 1, -1], [0.0, 0, 1, -1], sample_s=1, block_s=4, max_delay_s=3)
    (blk,) = b.blocks
    assert blk.accuracy == pytest.approx(2**-0.5)
    assert (blk.best_delay_s, blk.delay) == (0.0, 1.0)


def test_anticorrelated_response_earns_no_accuracy_or_delay() -> None:
    # r = -s: correlation -1 at d = 0; at d = 1..2 s it is below 0 too (dx = [1, 1, -1, -1]
    # against r[1:5] = [-1, 1, 1, 1]: sxy = -1 + 1 - 1 - 1 = -2; r[2:6] = [1, 1, 1, 1] flat -> 0).
    # Best is 0, not positive: accuracy 0, delay 0. Precision 1 - 2/1 -> clipped to 0.
    s = [1.0, 1, -1, -1]
    r = [-1.0, -1, 1, 1, 1, 1]
    b = pjm_score(s, r, sample_s=1, block_s=4, max_delay_s=2).blocks[0]
    assert b == BlockScore(0.0, 0.0, 0.0, 0.0, 2.0)


@pytest.mark.parametrize(
    ("signal", "response", "kw", "message"),
    [
        (SQUARE, SQUARE[:29], {}, "response has 29 samples"),
        (SQUARE, np.zeros(61), {}, "at most 30 more"),
        (SQUARE[:29], SQUARE[:29], {}, "not a positive whole number of 30-sample blocks"),
        (np.zeros(0), np.zeros(0), {}, "not a positive whole number"),
        (SQUARE, NAN_AT_7, {}, "response has NaN or inf at sample 7"),
        (np.full(30, np.inf), SQUARE, {}, "signal has NaN or inf at sample 0"),
        (SQUARE, SQUARE, {"block_s": 305.0}, "block_s=305.0 is not a whole number"),
        (SQUARE, SQUARE, {"sample_s": 0.0}, "sample_s must be above 0"),
        (SQUARE, SQUARE, {"max_delay_s": 0.0}, "max_delay_s at least one sample"),
        (SQUARE.reshape(3, 10), SQUARE.reshape(3, 10), {}, "must be 1-D"),
    ],
)
def test_bad_inputs_raise(
    signal: np.ndarray, response: np.ndarray, kw: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pjm_score(signal, response, **kw)


def test_normalize() -> None:
    # base 7000 kW, band 2000 kW: 9000 -> +1, 5000 -> -1, 7500 -> 0.25.
    assert normalize([9000.0, 5000.0, 7500.0], 7000.0, 2000.0).tolist() == [1.0, -1.0, 0.25]
    with pytest.raises(ValueError, match="band_kw must be above 0"):
        normalize([1.0], 0.0, 0.0)


def test_resample_hold_takes_the_value_in_force() -> None:
    # Samples at 0, 1, 2 s of a series set at 0 s (10), 1 s (20), 2.5 s (30): 10, 20, 20.
    out = resample([0.0, 1.0, 2.5], [10.0, 20.0, 30.0], 0.0, 1.0, 3)
    assert out.tolist() == [10.0, 20.0, 20.0]


def test_resample_mean_is_the_interval_mean_of_the_held_series() -> None:
    # Held 0 on [0, .5), 1 on [.5, 1), 2 on [1, 2): means 0.5 on [0, 1) and 2 on [1, 2).
    out = resample([0.0, 0.5, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0], 0.0, 1.0, 2, mode="mean")
    assert out.tolist() == pytest.approx([0.5, 2.0])
    # A 50 Hz ramp v = t, averaged over [0, 10): the mean of the 500 held samples,
    # (0 + 9.98)/2 = 4.99; over [10, 20): 14.99.
    t = np.arange(0, 1001) * 0.02
    assert resample(t, t, 0.0, 10.0, 2, mode="mean").tolist() == pytest.approx([4.99, 14.99])


@pytest.mark.parametrize(
    ("t", "v", "t0", "n", "mode", "message"),
    [
        ([0.0, 1.0], [1.0, 2.0], -1.0, 1, "hold", "reach outside the data"),
        ([0.0, 1.0], [1.0, 2.0], 0.0, 3, "hold", "reach outside the data"),
        ([0.0, 1.0], [1.0, 2.0], 0.0, 2, "mean", "reach outside the data"),
        ([0.0, 2.0, 1.0], [1.0, 2.0, 3.0], 0.0, 1, "hold", "must not decrease"),
        ([0.0, 1.0], [1.0, np.nan], 0.0, 1, "hold", "finite"),
        ([0.0, 1.0], [1.0], 0.0, 1, "hold", "equal length"),
        ([], [], 0.0, 1, "hold", "at least one sample"),
    ],
)
def test_resample_rejects_bad_input(
    t: list[float],
    v: list[float],
    t0: float,
    n: int,
    mode: Literal["hold", "mean"],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        resample(t, v, t0, 1.0, n, mode=mode)


@pytest.mark.parametrize("day", ["8/1/2017", "8/2/2017"])
def test_real_rega_csv_loads(day: str) -> None:
    # 16:00:00 to 24:00:00 every 2 s: 8 h * 1800 + 1 = 14401 rows; t_s runs 0..28800.
    t, s = load_pjm_csv(REGA, day)
    assert t.size == s.size == 14401
    assert t[0] == 0.0 and t[-1] == 28_800.0
    assert np.all(np.diff(t) == 2.0)
    assert s.min() >= -1.0 and s.max() <= 1.0
    assert s.std() > 0.1  # a real, moving signal


def test_real_rega_signal_followed_perfectly_scores_one() -> None:
    # First hour at 10 s samples (held): 360 samples, 12 blocks; some blocks sit at -1 (flat),
    # which a perfect response also matches (both flat -> accuracy 1).
    t, s = load_pjm_csv(REGA, "8/1/2017")
    sig = resample(t, s, 0.0, 10.0, 360)
    res = pjm_score(sig, sig)
    assert len(res.blocks) == 12
    assert res.score == pytest.approx(1.0)
    assert all(b.best_delay_s == 0.0 for b in res.blocks)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rega.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (",8/1/2017\n16:00:00,0.5\n16:00:02,abc\n", r"rega\.csv, line 3: could not convert"),
        (",8/1/2017\n16:00:00,0.5\n16:00:02\n", r"rega\.csv, line 3: 1 fields"),
        (",8/1/2017\n16:00:00,0.5\n16:0x:02,0.1\n", r"rega\.csv, line 3: time '16:0x:02'"),
        (",8/1/2017\n16:00:00,0.5\n16:00:02,1.5\n", r"rega\.csv, line 3: signal '1.5' outside"),
        (",8/1/2017\n16:00:02,0.5\n16:00:00,0.1\n", r"rega\.csv, line 3: time '16:00:00' does"),
        (",8/1/2017\n", r"rega\.csv: no data rows"),
        (",8/3/2017\n16:00:00,0.5\n", r"rega\.csv: no column '8/1/2017'"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_pjm_csv(_write(tmp_path, text), "8/1/2017")


def test_csv_time_passes_midnight(tmp_path: Path) -> None:
    # 23:59:58 -> 0:00:00 is a 2 s step, not -86398 s.
    p = _write(tmp_path, ",d\n23:59:56,0\n23:59:58,0.5\n0:00:00,-1\n")
    t, s = load_pjm_csv(p, "d")
    assert t.tolist() == [0.0, 2.0, 4.0]
    assert s.tolist() == [0.0, 0.5, -1.0]
