"""The dispatch rate limit: a token bucket ahead of every other check, refusals acked in
groups (`Ack.more`) and journalled as one summary a second. A real tracker, a real journal
file, the real metrics registry; the bucket's clock is passed in."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controller.config import DispatchConfig, FailsafeConfig, SiteLimits
from controller.intake import ACK_GROUP_MAX_BYTES, SUMMARY_EVERY_S, DispatchIntake, TokenBucket
from controller.journal import Journal
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire import MAX_PAYLOAD_BYTES, Ack, WireError, rfc3339
from controller.wire.ack import MAX_MORE
from controller.wire.dispatch import PEEK_MAX_BYTES, REJECT_CODES, peek_name
from controller.wire.jws import Signer

LIMITS = SiteLimits(min_kw=0.0, max_kw=3000.0)
KEY = b"rate-test-key-0123456789abcdef"


def payload(seq: int, target_kw: float = 100.0, **fields: Any) -> bytes:
    body = {
        "id": f"d{seq}", "seq": seq, "issued_at": rfc3339(time.time()), "mode": "setpoint",
        "target_kw": target_kw, "ramp_s": 0, **fields,
    }  # fmt: skip
    return json.dumps(body).encode()


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """An intake whose bucket (1 dispatch a second, `burst` at once) runs on `clock`: the
    burst goes through, then nothing until the test moves the clock."""

    def __init__(self, journal: Journal | None, burst: int = 3) -> None:
        self.clock = Clock()
        self.tracker = TargetTracker(LIMITS, FailsafeConfig(), initial_w=3e6)
        self.metrics = Metrics("test")
        self.acks: list[Ack] = []
        self.raw_acks: list[bytes] = []
        self.intake = DispatchIntake(
            tracker=self.tracker,
            limits=LIMITS,
            hmac_key=None,
            journal=journal,
            metrics=self.metrics,
            publish_ack=self._ack,
            on_accepted=lambda _d, _t: None,
            bucket=TokenBucket(1.0, burst, clock=self.clock),
        )

    def _ack(self, body: bytes) -> None:
        self.raw_acks.append(body)
        self.acks.append(Ack.decode(body))

    def named(self) -> list[tuple[str | None, int | None]]:
        return [name for ack in self.acks for name in ack.names()]

    def refused(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "rampd_dispatches_total", {"result": "rejected", "reason": "rate_limited"}
        )
        return value or 0.0


def test_the_bucket_gives_its_burst_at_once_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(4.0, 3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.t += 0.125
    assert not bucket.take()  # half a token
    clock.t += 0.125
    assert bucket.take() and not bucket.take()
    clock.t += 10.0
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # capped at burst
    clock.t -= 5.0
    assert not bucket.take()  # a clock going back adds nothing
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 0)


def test_over_the_rate_a_dispatch_is_refused_unread_and_acked_in_one_group(
    tmp_path: Path,
) -> None:
    t0 = time.time()
    with Journal(tmp_path / "journal.sqlite") as journal:
        rig = Rig(journal, burst=2)
        handled = [rig.intake.on_dispatch(payload(seq, 100.0 * seq)) for seq in range(1, 8)]
        assert handled == [True, True] + [False] * 5
        # The two within the burst are decided and acked at once; the others wait for a flush.
        assert [(a.seq, a.accepted) for a in rig.acks] == [(1, True), (2, True)]
        assert rig.tracker.target_w(time.monotonic()) == 2e5
        rig.intake.flush()
        assert rig.intake.rate_limited == 5
        assert journal.flush()
        rows = journal.dispatches_between(t0 - 1, time.time() + 1)
        ack_rows = journal.acks_between(t0 - 1, time.time() + 1)

    [group] = rig.acks[2:]
    assert not group.accepted and group.reason.startswith("rate_limited: ")
    assert "dispatch.max_per_s 1/s (burst 2)" in group.reason
    assert group.names() == tuple((f"d{s}", s) for s in range(3, 8))
    assert rig.refused() == 5
    # The journal holds the decided ones only; the refused ones come as a summary (below).
    assert [r.seq for r in rows] == [1, 2] and [a.seq for a in ack_rows] == [1, 2]
    # Nothing refused moved the target.
    assert rig.tracker.target_w(time.monotonic()) == 2e5


def test_acks_keep_the_order_the_dispatches_came_in() -> None:
    rig = Rig(None, burst=1)
    rig.intake.on_dispatch(payload(1))
    rig.intake.on_dispatch(payload(2))  # refused: waits for a flush
    rig.intake.on_dispatch(b"{not json")  # refused too: not even read
    rig.clock.t += 1.0
    rig.intake.on_dispatch(payload(3))  # decided: the group goes out first
    assert [ack.names() for ack in rig.acks] == [(("d1", 1),), (("d2", 2), (None, None)),
                                                  (("d3", 3),)]  # fmt: skip
    assert [ack.accepted for ack in rig.acks] == [True, False, True]


def test_a_flood_is_acked_in_messages_of_bounded_size_naming_every_dispatch() -> None:
    rig = Rig(None, burst=1)
    n = 3 * MAX_MORE + 17
    long_id = "x" * 120
    rig.intake.on_dispatch(payload(0))
    for seq in range(1, n + 1):
        rig.intake.on_dispatch(payload(seq, id=f"{long_id}{seq}"))
    rig.intake.flush()
    assert rig.named()[1:] == [(f"{long_id}{s}", s) for s in range(1, n + 1)]
    groups = rig.raw_acks[1:]
    assert len(groups) > 3
    assert all(len(body) <= ACK_GROUP_MAX_BYTES + 1024 < MAX_PAYLOAD_BYTES for body in groups)
    assert all(len(ack.more) <= MAX_MORE for ack in rig.acks)
    assert rig.refused() == n


def test_a_flood_is_journalled_as_one_summary_a_second_and_its_end_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rampd")
    with Journal(tmp_path / "journal.sqlite") as journal:
        rig = Rig(journal, burst=1)
        rig.intake.on_dispatch(payload(0))
        rig.intake.on_dispatch(payload(1))  # the flood begins (its first refusal: now)
        t = time.time()  # flushes are timed from here, in whole seconds
        seq = 2
        for k in range(3):  # three seconds of flood, a flush every 0.1 s
            for j in range(10):
                for _ in range(25):
                    rig.intake.on_dispatch(payload(seq))
                    seq += 1
                rig.intake.flush(t + k + (j + 1) * 0.1)
        rig.intake.flush(t + 3.5)  # quiet: no summary yet (under a second since the last)
        rig.intake.flush(t + 4.1)  # a second without refusals: the flood is over
        assert journal.flush()
        events = [e for e in journal.events_between(t - 1, t + 10) if e.kind == "rate_limited"]

    assert 3 <= len(events) <= 4
    counts = [int(re.findall(r"^(\d+) dispatches refused", e.text)[0]) for e in events]
    assert sum(counts) == seq - 1 == rig.intake.rate_limited == 751
    assert "first d1 seq 1" in events[0].text
    assert f"last d{seq - 1} seq {seq - 1}" in events[-1].text
    assert all(b.at - a.at >= SUMMARY_EVERY_S - 1e-9 for a, b in itertools.pairwise(events))
    warnings = [r for r in caplog.records if "the excess is refused" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    ends = [r for r in caplog.records if "back within dispatch.max_per_s" in r.getMessage()]
    assert len(ends) == 1 and "751 refused" in ends[0].getMessage()
    # A later flood is a new one: said again.
    rig.intake.on_dispatch(payload(seq))
    assert len([r for r in caplog.records if "the excess is refused" in r.getMessage()]) == 2


def test_without_a_bucket_nothing_is_refused() -> None:
    rig = Rig(None)
    rig.intake = DispatchIntake(
        tracker=rig.tracker, limits=LIMITS, hmac_key=None, journal=None, metrics=rig.metrics,
        publish_ack=rig._ack, on_accepted=lambda _d, _t: None,
    )  # fmt: skip
    assert all(rig.intake.on_dispatch(payload(seq)) for seq in range(1, 200))
    assert all(a.accepted for a in rig.acks) and len(rig.acks) == 199


def test_peek_names_a_dispatch_cheaply_and_never_raises() -> None:
    assert peek_name(payload(7)) == ("d7", 7)
    signed = Signer.hs256("k1", KEY).sign(payload(8))
    assert peek_name(signed) == ("d8", 8)  # unverified: only to name it
    assert peek_name(b"{not json") == (None, None)
    assert peek_name(b"[1, 2]") == (None, None)
    assert peek_name(json.dumps({"id": 5, "seq": "7"}).encode()) == (None, None)
    assert peek_name(json.dumps({"id": " ", "seq": -1}).encode()) == (None, None)
    assert peek_name(json.dumps({"id": "a" * 129, "seq": True}).encode()) == (None, None)
    assert peek_name(b"\xff\xfe") == (None, None)
    big = payload(9, note="x" * PEEK_MAX_BYTES)
    assert peek_name(big) == (None, None)  # not read at all
    assert "rate_limited" in REJECT_CODES


def test_a_grouped_ack_round_trips_and_a_single_one_reads_as_before() -> None:
    at = 1_714_564_800.25
    group = Ack("a", 1, False, "rate_limited: over", at, more=(("b", 2), (None, None)))
    assert Ack.decode(group.encode()) == group
    assert group.answers("b") and group.answers("a") and not group.answers("c")
    single = Ack("a", 1, False, "rate_limited: over", at)
    assert "more" not in json.loads(single.encode())
    assert Ack.decode(single.encode()).names() == (("a", 1),)
    bads: list[object] = [[1], {"id": "b"}, [{"id": 3}], [{"seq": "x"}], [{}] * (MAX_MORE + 1)]
    for bad in bads:
        body = {**json.loads(single.encode()), "more": bad}
        with pytest.raises(WireError):
            Ack.decode(json.dumps(body).encode())


def test_the_limit_is_configured_under_dispatch() -> None:
    cfg = DispatchConfig()
    assert (cfg.max_per_s, cfg.burst) == (20.0, 40)
    assert DispatchConfig(max_per_s=0.5, burst=1).max_per_s == 0.5
    for bad in ({"max_per_s": 0}, {"max_per_s": float("inf")}, {"burst": 0}):
        with pytest.raises(ValidationError):
            DispatchConfig(**bad)
