"""The chaos bench's pure parts: the seeded fault schedule, the dispatch tally, what telemetry
announced, the capability promise per block, and the journal's coverage (on a real SQLite
file). The bench itself runs end to end in tests/e2e/test_chaos_short.py."""

from __future__ import annotations

import argparse
import itertools
import random
import sqlite3
from pathlib import Path

import pytest

from controller.tools.bench import CHAOS_KINDS, add_chaos_arguments
from controller.tools.bench.chaos_faults import (
    DEVICE_FRACTION,
    DEVICE_MODES,
    DURATION_S,
    FAULT_KINDS,
    FaultRecord,
    PlannedFault,
    plan_faults,
    usable_kinds,
)
from controller.tools.bench.chaos_judge import (
    announcements,
    block_views,
    dispatch_tally,
    journal_figures,
    outage_windows,
)
from controller.tools.bench.chaos_link import ACK_WAIT_S, Attempt
from controller.tools.pjm_score import BlockScore, PjmScore
from controller.wire import Status, Telemetry
from controller.wire.telemetry import CapabilityReport

PROTOCOLS = ["luxos", "modbus", "braiins"]


def _plan(seed: int, **kw: object) -> list[PlannedFault]:
    args: dict[str, object] = {
        "run_s": 1800.0,
        "first_s": 60.0,
        "every_s": (60.0, 180.0),
        "kinds": FAULT_KINDS,
        "protocols": PROTOCOLS,
    }
    args.update(kw)
    return plan_faults(random.Random(seed), **args)  # type: ignore[arg-type]


def test_the_cli_names_the_same_kinds_as_the_bench() -> None:
    assert CHAOS_KINDS == FAULT_KINDS


def test_the_schedule_is_the_seeds_and_every_kind_comes_before_any_repeats() -> None:
    plan = _plan(7)
    assert plan == _plan(7)
    assert plan != _plan(8)
    assert plan[0].at_s == 60.0
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(plan)]
    assert all(59.9 <= g <= 180.1 for g in gaps), gaps
    assert plan[-1].at_s < 1800.0 and len(plan) >= 9
    assert sorted(p.kind for p in plan[:5]) == sorted(FAULT_KINDS)
    second = [p.kind for p in plan[5:10]]
    assert len(set(second)) == len(second)
    for p in plan:
        lo, hi = DURATION_S[p.kind]
        assert lo <= p.duration_s <= hi, p
        if p.kind == "device":
            assert p.protocol in PROTOCOLS and p.mode in DEVICE_MODES
            assert p.fraction is not None and DEVICE_FRACTION[0] <= p.fraction <= DEVICE_FRACTION[1]


def test_a_compressed_schedule_fits_a_short_run() -> None:
    plan = _plan(3, run_s=120.0, first_s=15.0, every_s=(25.0, 35.0), kinds=("daemon", "broker"))
    assert plan[0].at_s == 15.0 and all(p.at_s < 120.0 for p in plan)
    assert {p.kind for p in plan[:2]} == {"daemon", "broker"}
    assert 3 <= len(plan) <= 5


def test_kinds_the_site_cannot_have_are_dropped_with_a_reason() -> None:
    kinds, dropped = usable_kinds(list(FAULT_KINDS), [], 0)
    assert kinds == ["meter", "broker", "daemon"]
    assert len(dropped) == 2 and "device" in dropped[0] and "rack" in dropped[1]


def test_bad_schedule_arguments_are_refused() -> None:
    p = argparse.ArgumentParser()
    add_chaos_arguments(p)
    args = p.parse_args(["--fault-every-s", "20,40", "--kinds", "daemon,broker,daemon"])
    assert args.fault_every_s == (20.0, 40.0) and args.kinds == ["daemon", "broker"]
    for bad in (["--fault-every-s", "40,20"], ["--fault-every-s", "x"], ["--kinds", "router"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def _attempt(n: int, t: float, ack_at: float | None, *, failed: bool = False) -> Attempt:
    return Attempt(n, n, 0.1, False, t, f"d-{n}", failed, ack_at, None if ack_at is None else True)


def _outage(kind: str, start: float, end: float) -> FaultRecord:
    return FaultRecord(PlannedFault(1, kind, 0.0, 0.0), start=start, end=end)  # type: ignore[arg-type]


def test_unanswered_dispatches_count_only_inside_an_outage() -> None:
    attempts = [
        _attempt(0, 100.0, 100.1),
        _attempt(1, 102.0, None),  # published just before the kill at 104: its ack was lost
        _attempt(2, 106.0, None),
        _attempt(3, 108.0, None, failed=True),
        _attempt(4, 112.0, 112.2),  # the re-send after the restart
        _attempt(5, 114.0, 114.1),
    ]
    windows = outage_windows([_outage("daemon", 104.0, 105.0)], attempts)
    assert windows == [(104.0, 112.2)]
    tally = dispatch_tally(attempts, windows)
    assert tally["lost"] == 0 and tally["unacked_in_outages"] == 2
    assert tally["publish_failed"] == 1 and tally["acked"] == 3 and tally["last_acked"]
    # Outside any outage the same silence is a lost dispatch.
    assert dispatch_tally(attempts, [])["lost"] == 2
    assert 104.0 - ACK_WAIT_S <= 102.0  # why attempt 1 is inside the window


def test_a_late_ack_of_an_earlier_dispatch_does_not_end_the_outage() -> None:
    attempts = [_attempt(0, 99.0, 104.5), _attempt(1, 105.0, None), _attempt(2, 110.0, 110.2)]
    assert outage_windows([_outage("broker", 104.0, 106.0)], attempts) == [(104.0, 110.2)]
    assert outage_windows([_outage("meter", 104.0, 106.0)], attempts) == []


def _tel(at: float, up_kw: float, down_kw: float, measured_kw: float = 5000.0) -> Telemetry:
    cap = CapabilityReport((1.0, 5.0, 60.0), (0.0, up_kw * 1e3, 0.0), (0.0, down_kw * 1e3, 0.0))
    return Telemetry(at=at, mode="normal", measured_w=measured_kw * 1e3, capability=cap)


def _score(*blocks: float) -> PjmScore:
    bs = tuple(BlockScore(s, s, s, s, 0.0) for s in blocks)
    return PjmScore(0.0, 0.0, 0.0, sum(blocks) / len(blocks), bs)


def test_reduced_capability_is_what_the_dispatcher_heard() -> None:
    # Offer: base 5000 kW, band +-1000 kW.
    tels = [_tel(t, 1500.0, 1500.0) for t in range(0, 30)]
    tels[11] = _tel(11.0, 1500.0, 910.0)  # 90 kW short: within the settle band (100 kW)
    tels[12] = _tel(12.0, 1500.0, 890.0)  # 890 kW down is short of the band's 1000
    tels[13] = _tel(13.0, 1500.0, 600.0, 4500.0)  # at 4500 kW the band's bottom is 500 away
    tels[14] = _tel(14.0, 400.0, 1500.0, 5700.0)  # at 5700 kW its top is 300 kW away
    tels[15] = _tel(15.0, 1500.0, 390.0, 4500.0)  # short of those 500
    tels += [_tel(t, 1500.0, 1500.0) for t in range(40, 60)]  # 11 s without telemetry
    status = [
        (50.0, Status("offline", None, "will", None)),
        (51.0, Status("online", "normal", "", 51.0)),
    ]
    said = announcements(tels, status, base_kw=5000.0, band_kw=1000.0, site_max_kw=10000.0)
    assert [t for t, _ in said] == [12.0, 15.0, 34.0, 50.0]
    assert "890" in said[0][1] and "short of 1000/1000" in said[0][1]
    assert "short of 1000/500 at 4500" in said[1][1]
    assert "11 s" in said[2][1] and "offline" in said[3][1]


def test_a_block_that_misses_keeps_its_promise_only_when_announced() -> None:
    said = [(75.0, "5 s capability 1500/900 kW < band 1000")]
    faults = [_outage("daemon", 70.0, 71.0)]
    views = block_views(_score(0.95, 0.60, 0.50), 0.0, 60.0, faults, said)
    assert [v.promise for v in views] == ["-", "kept", "BROKEN"]
    assert views[1].faults == (1,) and views[1].announcements == 1 and views[2].faults == ()
    # An announcement up to 10 s before a block counts for it.
    early = block_views(_score(0.5, 0.5), 0.0, 60.0, [], [(52.0, "x")])
    assert [v.promise for v in early] == ["kept", "kept"]


def test_journal_coverage_leaves_the_daemons_down_time_out(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE telemetry (at REAL NOT NULL)")
        conn.execute("CREATE TABLE acks (at REAL NOT NULL)")
        # Rows each second of [1000, 1100) but 1040..1049 (down) and 1080..1084 (lost).
        rows = [(1000.2 + s,) for s in range(100) if not 40 <= s < 50 and not 80 <= s < 85]
        conn.executemany("INSERT INTO telemetry VALUES (?)", rows)
        conn.execute("INSERT INTO acks VALUES (1.0)")
    fig = journal_figures(path, 1000.0, 1100.0, [(1040.0, 1049.5)])
    assert fig["rows"] == {"telemetry": 85, "acks": 1}
    assert fig["seconds_expected"] == 90 and fig["seconds_with_telemetry"] == 85
    assert fig["coverage"] == pytest.approx(85 / 90, abs=1e-4)
    missing = journal_figures(tmp_path / "none.sqlite", 0.0, 10.0, [])
    assert missing["coverage"] == 0.0 and "error" in missing
