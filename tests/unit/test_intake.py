"""Dispatches coming into force: every one acked, journalled as received, the tracker moved
only by good ones, and a restart refusing what was accepted before it. A real tracker, a real
journal file, the real metrics registry."""

from __future__ import annotations

import json
import time
from pathlib import Path

from controller.config import FailsafeConfig, SiteLimits
from controller.intake import DispatchIntake, initial_target_w, resumable
from controller.journal import Journal
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire import Ack, Dispatch, rfc3339

LIMITS = SiteLimits(min_kw=0.0, max_kw=3000.0)


def payload(seq: int, target_kw: float, **fields: object) -> bytes:
    body = {
        "id": f"d{seq}", "seq": seq, "issued_at": rfc3339(time.time()), "mode": "setpoint",
        "target_kw": target_kw, "ramp_s": 0, **fields,
    }  # fmt: skip
    return json.dumps(body).encode()


class Rig:
    def __init__(self, journal: Journal) -> None:
        self.tracker = TargetTracker(LIMITS, FailsafeConfig(), initial_w=3e6)
        self.metrics = Metrics("test")
        self.acks: list[Ack] = []
        self.accepted: list[Dispatch] = []
        self.intake = DispatchIntake(
            tracker=self.tracker,
            limits=LIMITS,
            hmac_key=None,
            journal=journal,
            metrics=self.metrics,
            publish_ack=lambda body: self.acks.append(Ack.decode(body)),
            on_accepted=lambda d, _t: self.accepted.append(d),
        )

    def count(self, result: str, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "rampd_dispatches_total", {"result": result, "reason": reason}
        )
        return value or 0.0


def test_each_dispatch_is_acked_and_journalled_and_only_good_ones_move_the_target(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.sqlite"
    t0 = time.time()
    with Journal(db) as journal:
        rig = Rig(journal)
        rig.intake.on_dispatch(payload(5, 1200.0))
        rig.intake.on_dispatch(payload(4, 100.0))  # an older seq
        rig.intake.on_dispatch(b"{not json")
        rig.intake.on_dispatch(payload(6, 99_999.0))  # above the site's max
        assert journal.flush()
        rows = journal.dispatches_between(t0 - 1, time.time() + 1)
        acks = journal.acks_between(t0 - 1, time.time() + 1)

    assert [(a.seq, a.accepted) for a in rig.acks] == [(5, True), (4, False), (None, False),
                                                     (6, False)]  # fmt: skip
    assert all(a.reason for a in rig.acks[1:])
    assert [d.seq for d in rig.accepted] == [5]
    assert rig.tracker.target_w(time.monotonic()) == 1.2e6
    assert len(rows) == 4 and [r.decision for r in rows] == ["accepted"] + ["rejected"] * 3
    assert [a.accepted for a in acks] == [True, False, False, False]
    assert rig.count("accepted", "") == 1
    rejected = sum(
        s.value
        for m in rig.metrics.registry.collect()
        if m.name == "rampd_dispatches"
        for s in m.samples
        if s.name == "rampd_dispatches_total" and s.labels.get("result") == "rejected"
    )
    assert rejected == 3


def test_after_a_restart_the_dispatch_in_force_resumes_and_its_seq_stays_refused(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.sqlite"
    with Journal(db) as journal:
        Rig(journal).intake.on_dispatch(payload(7, 800.0))

    with Journal(db) as journal:
        now = time.time()
        back = resumable(journal, LIMITS, None, now)
        assert [d.seq for d in back] == [7]
        # No telemetry was journalled, so nothing says where the target stood: the default.
        assert initial_target_w(journal, back, 3e6, now) == 3e6
        rig = Rig(journal)
        rig.intake.resume(back, now)
        assert rig.tracker.target_w(time.monotonic()) == 8e5
        rig.intake.on_dispatch(payload(7, 500.0))  # the same seq again
        assert not rig.acks[-1].accepted and rig.acks[-1].seq == 7
        assert rig.tracker.target_w(time.monotonic()) == 8e5
