"""ClockWatch: wall-clock steps against the monotonic clock, on clocks the test moves."""

from __future__ import annotations

import logging

import pytest

from controller.clock import ClockWatch
from controller.metrics import Metrics


class Clocks:
    """A wall clock and a monotonic clock that move together unless the wall one is stepped."""

    def __init__(self) -> None:
        self.wall = 1_714_564_800.0
        self.mono = 12.0

    def advance(self, dt: float) -> None:
        self.wall += dt
        self.mono += dt

    def step(self, by: float) -> None:
        self.wall += by


def watch(c: Clocks) -> tuple[ClockWatch, list[tuple[float, float]]]:
    seen: list[tuple[float, float]] = []
    w = ClockWatch(
        wall=lambda: c.wall, mono=lambda: c.mono, on_step=lambda s, t: seen.append((s, t))
    )
    return w, seen


def value(m: Metrics, name: str) -> float | None:
    return m.registry.get_sample_value(name)


@pytest.mark.parametrize("by", [30.0, -30.0])
def test_a_step_is_logged_once_with_its_size_and_counted(
    by: float, caplog: pytest.LogCaptureFixture
) -> None:
    c = Clocks()
    w, seen = watch(c)
    caplog.set_level(logging.WARNING, logger="rampd")
    for _ in range(5):
        c.advance(1.0)
        assert w.check() is None
    c.advance(0.4)
    c.step(by)
    c.advance(0.6)
    assert w.check() == pytest.approx(by)
    for _ in range(5):  # the new wall clock runs on: nothing more to say
        c.advance(1.0)
        assert w.check() is None
    assert w.steps == 1 and w.last_step_s == pytest.approx(by)
    assert seen == [(pytest.approx(by), c.wall - 5.0)]
    lines = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(lines) == 1 and f"{by:+.3f} s" in lines[0]


def test_slewing_and_a_late_check_are_not_steps() -> None:
    c = Clocks()
    w, seen = watch(c)
    for _ in range(100):  # NTP slews at most 0.5 ms/s
        c.advance(1.0)
        c.step(0.0005)
        assert w.check() is None
    c.advance(300.0)  # a loop that stalled: both clocks moved alike
    assert w.check() is None
    c.step(0.9)
    c.advance(1.0)
    assert w.check() is None  # under the threshold
    assert seen == [] and w.steps == 0


def test_it_compares_at_most_once_a_second() -> None:
    c = Clocks()
    w, seen = watch(c)
    c.step(5.0)
    c.advance(0.5)
    assert w.check() is None  # not yet a second: not compared, not forgotten
    c.advance(0.5)
    assert w.check() == pytest.approx(5.0) and len(seen) == 1


def test_the_metrics_count_steps_and_keep_the_last_size() -> None:
    m = Metrics("test")
    c = Clocks()
    w = ClockWatch(
        wall=lambda: c.wall, mono=lambda: c.mono, on_step=lambda s, t: m.clock_stepped(s)
    )
    assert value(m, "rampd_clock_steps_total") == 0.0
    assert value(m, "rampd_clock_last_step_seconds") == 0.0
    for by in (30.0, -30.0):
        c.advance(1.0)
        c.step(by)
        w.check()
    assert value(m, "rampd_clock_steps_total") == 2.0
    assert value(m, "rampd_clock_last_step_seconds") == -30.0
