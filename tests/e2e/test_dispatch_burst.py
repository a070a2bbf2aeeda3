"""Nothing lost: 10,000 dispatches, valid and invalid mixed, published at full speed.

mosquitto + `rampd sim` + `rampd run` as real processes, with a signing key and a journal. The
burst mixes valid setpoints with undecodable payloads, bad fields, stale and replayed seqs and
bad signatures, all published at QoS 1 as fast as the client can. Every one must get exactly
one ack, in publication order, with the decision its content calls for; the journal must hold
one dispatch row and one ack row for each, in the same order; and the daemon must end on the
last valid target.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.journal import JournalReader
from controller.wire import Ack, rfc3339
from controller.wire.signing import sign
from tests.e2e.harness import Site, SiteDispatcher, run_site, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N = 10_000
SITE_MAX_KW = 2000.0
KEY = b"burst-test-key-0123456789abcdef"
PROBE = "probe-"
WINDOW = 200

CONFIG = f"""
site_id = "burst"
cycle_s = 0.1
noncontrollable_kw = 100.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
max_kw = {SITE_MAX_KW}
max_issued_age_s = 60.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[dispatch]
hmac_key_file = "{{key_file}}"
# A dispatcher allowed this rate: every one decoded and journalled (the rate limit's own test
# is test_dispatch_flood.py).
max_per_s = 1e6
burst = 1000000
[journal]
path = "{{journal}}"
[meter]
host = "127.92.201.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 4
address = "127.92.200.1"
overrides = {{{{ port = 1502 }}}}
"""


@dataclass(frozen=True, slots=True)
class Planned:
    """One dispatch of the burst: its bytes and what the daemon must decide."""

    payload: bytes
    id: str | None  # None: the payload is not even JSON, the ack cannot name it
    accepted: bool
    code: str  # the journal's reject code ("" when accepted)
    target_kw: float | None = None


def _signed(body: dict[str, Any], key: bytes = KEY) -> bytes:
    return json.dumps({**body, "sig": sign(body, key)}).encode()


def plan_burst(n: int, seed: int, first_seq: int) -> list[Planned]:
    """`n` dispatches, about half valid; each valid one has the highest seq so far."""
    rnd = random.Random(seed)
    now = rfc3339(time.time())
    old = rfc3339(time.time() - 600.0)
    accepted_seqs: list[int] = []
    out: list[Planned] = []
    for i in range(n):
        seq = first_seq + i
        ident = f"b-{i}"
        base: dict[str, Any] = {"id": ident, "seq": seq, "issued_at": now, "mode": "setpoint"}
        kind = rnd.choices(
            ["valid", "not_json", "bad_field", "stale", "replay", "bad_sig"],
            weights=[50, 10, 10, 10, 10, 10],
        )[0]
        if kind == "replay" and not accepted_seqs:
            kind = "valid"
        if kind == "valid":
            target = round(rnd.uniform(0.0, SITE_MAX_KW), 1)
            payload = _signed({**base, "target_kw": target, "ramp_s": 0})
            out.append(Planned(payload, ident, True, "", target))
            accepted_seqs.append(seq)
        elif kind == "not_json":
            cut = json.dumps({**base, "target_kw": 1.0}).encode()[: rnd.randint(1, 30)]
            out.append(Planned(cut, None, False, "not_json"))
        elif kind == "bad_field":
            field, value, code = rnd.choice(
                [
                    ("target_kw", -5.0, "out_of_range"),
                    ("target_kw", SITE_MAX_KW + 1, "out_of_range"),
                    ("target_kw", "lots", "bad_type"),
                    ("mode", "turbo", "bad_mode"),
                ]
            )
            body = {**base, "target_kw": 100.0, field: value}
            out.append(Planned(_signed(body), ident, False, code))
        elif kind == "stale":
            body = {**base, "issued_at": old, "target_kw": 100.0}
            out.append(Planned(_signed(body), ident, False, "stale"))
        elif kind == "replay":
            body = {**base, "seq": rnd.choice(accepted_seqs[-50:]), "target_kw": 100.0}
            out.append(Planned(_signed(body), ident, False, "replay"))
        else:  # bad_sig: unsigned, or signed with another key
            body = {**base, "target_kw": 100.0}
            payload = json.dumps(body).encode() if rnd.random() < 0.5 else _signed(body, KEY[::-1])
            out.append(Planned(payload, ident, False, "bad_signature"))
    return out


@pytest.fixture
def site(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Site]:
    key_file = tmp_path / "dispatch.key"
    key_file.write_bytes(KEY)
    config = CONFIG.replace("{key_file}", str(key_file)).replace(
        "{journal}", str(tmp_path / "journal.sqlite")
    )
    with run_site(mosquitto, tmp_path, config, site_id="burst", n_devices=4) as s:
        yield s


async def _subscribed(d: SiteDispatcher, first_seq: int) -> int:
    """Send signed probes until one is acked (the daemon has subscribed); return the next seq."""
    seq = first_seq
    deadline = time.monotonic() + 30.0
    while not any(str(a.id).startswith(PROBE) for a in d.acks):
        assert d.site.daemon.poll() is None, d.site.daemon_log[-3000:]
        assert time.monotonic() < deadline, "the daemon never acked a probe dispatch"
        body = {"id": f"{PROBE}{seq}", "seq": seq, "issued_at": rfc3339(time.time())}
        await d.publish_raw(_signed({**body, "mode": "setpoint", "target_kw": 50.0}))
        seq += 1
        await asyncio.sleep(0.5)
    return seq


async def test_a_burst_of_10000_dispatches_loses_nothing(site: Site, tmp_path: Path) -> None:
    async with SiteDispatcher(site) as d:
        first_seq = await _subscribed(d, time.time_ns() // 1000)
        plan = plan_burst(N, seed=6, first_seq=first_seq)
        last_valid = next(p for p in reversed(plan) if p.accepted)

        topic = f"{site.root}/dispatch"
        d.client.pending_calls_threshold = WINDOW  # aiomqtt warns on each publish above it
        t0 = time.monotonic()
        # One task per message, created in order: each hands its message to paho on its first
        # step, so paho sends them in this order; the tasks then only wait for their PUBACKs.
        # A window of them at a time: aiomqtt's bookkeeping grows with pending publishes.
        sends: deque[asyncio.Task[None]] = deque()
        for p in plan:
            if len(sends) >= WINDOW:
                await sends.popleft()
            sends.append(asyncio.create_task(d.client.publish(topic, p.payload, qos=1)))
        await asyncio.gather(*sends)
        published_s = time.monotonic() - t0

        def burst_acks() -> list[Ack]:
            return [a for a in d.acks if not str(a.id).startswith(PROBE)]

        # Acked as fast as this host decodes and journals them (a slow or shared machine
        # takes minutes); what must not happen is the acks stopping short of N.
        async def every_ack() -> None:
            seen, moved = 0, time.monotonic()
            while (n := len(burst_acks())) < N:
                if n > seen:
                    seen, moved = n, time.monotonic()
                assert time.monotonic() - moved < 30.0, f"acks stopped at {n} of {N}"
                await asyncio.sleep(0.1)

        await asyncio.wait_for(every_ack(), 900.0)
        acked_s = time.monotonic() - t0
        print(f"\n{N} dispatches published in {published_s:.1f} s, all acked in {acked_s:.1f} s")

        tel = await until(
            lambda: d.telemetry and wire_kw(d.telemetry[-1].target_w) == last_valid.target_kw,
            120.0,  # telemetry queued behind the acks drains at the host's pace
            what=f"telemetry target {last_valid.target_kw} kW",
        )
        assert tel

        acks = burst_acks()
        # Exactly one ack each, in publication order, with the expected decision.
        assert [(a.id, a.accepted) for a in acks] == [(p.id, p.accepted) for p in plan]
        assert all(a.reason for a in acks if not a.accepted)

    site.daemon.send_signal(signal.SIGTERM)  # the journal flushes on a clean stop
    assert await asyncio.to_thread(site.daemon.wait, 60) == 0
    with JournalReader(tmp_path / "journal.sqlite") as journal:
        rows = [r for r in journal.dispatches_between(0, math.inf) if not _probe(r.id)]
        ack_rows = [r for r in journal.acks_between(0, math.inf) if not _probe(r.id)]
        resumed = journal.last_valid_dispatch(time.time())
        last_seq = journal.last_seq()
    assert [r.payload for r in rows] == [p.payload for p in plan]
    assert [(r.id, r.decision == "accepted", r.code) for r in rows] == [
        (p.id, p.accepted, p.code) for p in plan
    ]
    assert [(r.id, r.accepted) for r in ack_rows] == [(p.id, p.accepted) for p in plan]
    # A restart would resume the last valid dispatch and refuse every seq up to it.
    assert resumed == (last_valid.payload,)
    assert last_seq == json.loads(last_valid.payload)["seq"]
    log = site.daemon_log
    # Nothing dropped on the way either: no out-queue overflow, no journal row lost.
    assert "out-queue full" not in log and "journal queue full" not in log
    assert "Discarding message" not in log  # aiomqtt's incoming queue never overflowed
    assert re.search(r"journal closed: \d+ rows written, 0 dropped", log), log[-2000:]


def _probe(ident: str | None) -> bool:
    return ident is not None and ident.startswith(PROBE)
