"""Dispatches coming into force: from the broker while running, and from the journal at start;
and which heartbeats count (signed ones only, when the site has `dispatch.keys`).

Every dispatch from the broker is decoded against the site's limits and the last accepted seq
and answered with one ack, accepted or with the reason; each is journalled as received. A
restart puts the journal's last valid dispatches back, decoded by the same rules (less the
`issued_at` freshness a journalled dispatch cannot have).

A flood cannot take the daemon's time: beyond `dispatch.max_per_s` (a token bucket of
`dispatch.burst`) a dispatch is refused `rate_limited` before anything costly (no signature
check, no decode; its id and seq are only peeked at for the ack). Those refusals are acked in
groups (one ack names up to a thousand, `more`), published every ACK_EVERY_S (`run`) or when
a group is full, and journalled as one summary event a second: neither the out-queue nor the
journal grows with the flood. Dispatches within the rate go through every check as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from controller.config import SiteLimits
from controller.journal import Journal
from controller.metrics import Metrics
from controller.target import TargetTracker, resume_from_w, resumed
from controller.wire import Ack, Dispatch, DispatchRejected, rfc3339
from controller.wire.ack import MAX_MORE, Name
from controller.wire.dispatch import peek_name
from controller.wire.heartbeat import Heartbeat, HeartbeatRejected
from controller.wire.jws import KeyRing, is_compact

log = logging.getLogger("rampd")

RATE_LIMITED: Final = "rate_limited"
ACK_GROUP_MAX_BYTES: Final = 32 * 1024
"""A group of rate_limited refusals is acked at once when its names reach about this size:
well under the 64 KiB any of rampd's decoders reads, even with 128-character ids."""
ACK_EVERY_S: Final = 0.1
"""Dispatches refused for rate are acked this often, in groups (at once when one is full)."""
SUMMARY_EVERY_S: Final = 1.0
"""Refusals for rate are journalled as one summary event this often (not a row each)."""


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` held; each dispatch takes one.
    `clock`: monotonic seconds (injected in tests)."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)) or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._t = clock()

    def take(self) -> bool:
        """One token if there is one (True); False: over the rate, nothing taken."""
        now = self._clock()
        elapsed = max(0.0, now - self._t)  # a clock that went back adds nothing
        tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        self._t = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


@dataclass(slots=True)
class _Flood:
    """Dispatches refused for rate, from the first refusal until a second passes without."""

    since: float  # unix time of the first refusal
    summary_at: float  # unix time of the last summary (the first refusal before any)
    first: Name  # the first and last refused since the last summary
    last: Name
    count: int = 0  # refused since the last summary
    total: int = 0  # refused since `since`


def _max_seq(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def resumable(
    journal: Journal | None, limits: SiteLimits, hmac_key: KeyRing | None, now_unix: float
) -> list[Dispatch]:
    """The journal's last valid dispatch(es) that still decode: the first is the one in
    force, or the pending one if none is. One that no longer decodes (a rotated key, changed
    limits) is journalled as not resumed."""
    if journal is None:
        return []
    out: list[Dispatch] = []
    for raw in journal.last_valid_dispatch(now_unix) or ():
        try:
            d = Dispatch.decode(
                raw,
                now_unix=now_unix,
                last_seq=out[-1].seq if out else None,
                limits=limits,
                replay=True,
                hmac_key=hmac_key,
            )
        except DispatchRejected as exc:
            text = f"not resumed: {exc.id} seq {exc.seq}: {exc.reason}"
            log.warning("journal: %s", text)
            journal.record_event("resume", text, at=now_unix)
            continue
        out.append(d)
    return out


def initial_target_w(
    journal: Journal | None, dispatches: list[Dispatch], default_w: float, now_unix: float
) -> float:
    """Where the target starts: devices kept their setpoints through a restart, so a resumed
    ramp goes on from where it stood, not from where it began."""
    last = journal.last_target() if dispatches and journal is not None else None
    return default_w if last is None else resume_from_w(dispatches[0], *last, now_unix)


class DispatchIntake:
    def __init__(
        self,
        *,
        tracker: TargetTracker,
        limits: SiteLimits,
        hmac_key: KeyRing | None,
        journal: Journal | None,
        metrics: Metrics,
        publish_ack: Callable[[bytes], None],
        on_accepted: Callable[[Dispatch, float], None],
        bucket: TokenBucket | None = None,
    ) -> None:
        """`hmac_key`: the site's dispatch keys (`LoadedConfig.dispatch_key`; None: unsigned).
        `on_accepted(dispatch, now_unix)`: after the tracker took it and it is journalled,
        before its ack goes out. `bucket`: the dispatch rate limit (None: none); then run
        `run` (or call `flush` now and then), which acks the refused ones."""
        if hmac_key is not None and hmac_key.kids and hmac_key.legacy_accepted:
            log.warning(
                "dispatch.accept_legacy_sig: legacy sig dispatches and unsigned heartbeats "
                "still accepted; turn it off once every dispatcher sends JWS"
            )
        self._tracker = tracker
        self._limits = limits
        self._key = hmac_key
        self._journal = journal
        self._metrics = metrics
        self._publish_ack = publish_ack
        self._on_accepted = on_accepted
        # Seqs accepted before a restart stay refused even if nothing is resumed.
        self._seq_floor = journal.last_seq() if journal is not None else None
        self._bucket = bucket
        self._limit = (
            ""
            if bucket is None
            else f"over dispatch.max_per_s {bucket.rate_per_s:g}/s (burst {bucket.burst})"
        )
        # Refused for rate and not yet acked: their names, the group's size, the latest time.
        self._refused: list[Name] = []
        self._refused_bytes = 0
        self._refused_at = 0.0
        self._flood: _Flood | None = None
        self.rate_limited = 0
        """Dispatches refused for rate since start."""

    def resume(self, dispatches: list[Dispatch], now_unix: float) -> None:
        """Put the dispatches from `resumable` back in force."""
        now = time.monotonic()
        for d in dispatches:
            self._tracker.accept(resumed(d, now_unix), now, now_unix)
            text = f"resumed {d.id} seq {d.seq}: {d.mode} {d.target_w / 1e3:.1f} kW"
            log.info("journal: %s", text)
            if self._journal is not None:
                self._journal.record_event("resume", text, at=now_unix)

    def on_dispatch(self, payload: bytes) -> bool:
        """`admit`, then `decide`: one dispatch from the broker, as it comes. False: refused
        for rate (acked at the next `flush`); True: decoded and acked."""
        if not self.admit(payload):
            return False
        self.decide(payload)
        return True

    def admit(self, payload: bytes) -> bool:
        """As a dispatch is read, before it waits its turn (`MqttLink(admit_dispatch=...)`):
        within the rate (True: `decide` on it), or refused here and now, cheaply (False: acked
        at the next `flush`). The limit counts arrivals: were it checked as dispatches are
        handled, a flood would pass it whenever handling falls behind the rate."""
        if self._bucket is None or self._bucket.take():
            return True
        self._refuse(payload)
        return False

    def decide(self, payload: bytes) -> None:
        """Decode one admitted dispatch, act on it, journal it and ack it."""
        now_unix, now = time.time(), time.monotonic()
        journal = self._journal
        # Acks go out in the order dispatches came: refused ones waiting for a flush first.
        self._ack_refused()
        try:
            d = Dispatch.decode(
                payload,
                now_unix=now_unix,
                last_seq=_max_seq(self._tracker.last_seq, self._seq_floor),
                limits=self._limits,
                hmac_key=self._key,
            )
        except DispatchRejected as exc:
            log.warning("dispatch rejected: id=%s seq=%s: %s", exc.id, exc.seq, exc.reason)
            self._metrics.count_dispatch(False, exc.code)
            self._publish_ack(Ack(exc.id, exc.seq, False, exc.reason, now_unix).encode())
            if journal is not None:
                journal.record_dispatch(now_unix, payload, exc)
                journal.record_ack(now_unix, exc.id, exc.seq, False, exc.reason)
            return
        self._tracker.accept(d, now, now_unix)
        if journal is not None:
            journal.record_dispatch(now_unix, payload, d)
            journal.record_ack(now_unix, d.id, d.seq, True, "")
        self._on_accepted(d, now_unix)
        log.info(
            "dispatch accepted: id=%s seq=%d mode=%s target=%.1f kW ramp=%.1fs",
            d.id,
            d.seq,
            d.mode,
            d.target_w / 1e3,
            d.ramp_s,
        )
        self._metrics.count_dispatch(True, "")
        # Slowed by a ramp limit: still accepted; the ack names the limit and the arrival.
        # (A dispatch scheduled for later is judged at its start: telemetry says it then.)
        started = self._tracker.in_force is d
        limited_by, reach_mono = self._tracker.limit_state() if started else (None, None)
        reach_at = None if reach_mono is None else now_unix + (reach_mono - now)
        ack = Ack(d.id, d.seq, True, "", now_unix, limited_by=limited_by, reach_at=reach_at)
        self._publish_ack(ack.encode())

    # -- the rate limit ------------------------------------------------------------------

    def _refuse(self, payload: bytes) -> None:
        """Over the rate: remember the dispatch's name for its ack; nothing else. This runs
        for every message of a flood, so it does as little as it can."""
        name = peek_name(payload)
        now_unix = time.time()
        self._refused.append(name)
        self._refused_bytes += len(name[0] or "") + 48  # {"id":"","seq":<19 digits>},
        self._refused_at = now_unix
        self.rate_limited += 1
        f = self._flood
        if f is None:
            assert self._bucket is not None
            f = self._flood = _Flood(since=now_unix, summary_at=now_unix, first=name, last=name)
            log.warning(
                "dispatches %s: the excess is refused (%s), acked in groups, journalled "
                "once a second",
                self._limit,
                RATE_LIMITED,
            )
        elif f.count == 0:
            f.first = name
        f.count += 1
        f.total += 1
        f.last = name
        if self._refused_bytes >= ACK_GROUP_MAX_BYTES or len(self._refused) > MAX_MORE:
            self._ack_refused()

    def _ack_refused(self) -> None:
        """One grouped ack for the dispatches refused since the last one."""
        refused = self._refused
        if not refused:
            return
        self._refused, self._refused_bytes = [], 0
        (first_id, first_seq), *more = refused
        reason = f"{RATE_LIMITED}: {self._limit}; not decoded, nothing changed"
        ack = Ack(first_id, first_seq, False, reason, self._refused_at, more=tuple(more))
        self._publish_ack(ack.encode())
        self._metrics.dispatches.labels(result="rejected", reason=RATE_LIMITED).inc(len(refused))

    async def run(self) -> None:
        """The daemon's task: `flush` every ACK_EVERY_S, outside the control cycle's time."""
        while True:
            await asyncio.sleep(ACK_EVERY_S)
            self.flush()

    def flush(self, now_unix: float | None = None, *, final: bool = False) -> None:
        """Every ACK_EVERY_S (and at the stop, `final`): ack what was refused for rate
        since the last call; once a second, journal how many were refused; a second without
        any ends the flood (logged with its total)."""
        self._ack_refused()
        f = self._flood
        if f is None:
            return
        now = time.time() if now_unix is None else now_unix
        if now - f.summary_at < SUMMARY_EVERY_S and not final:
            return
        if f.count and self._journal is not None:
            self._journal.record_event(
                RATE_LIMITED,
                f"{f.count} dispatches refused in {now - f.summary_at:.1f} s, {self._limit}: "
                f"first {f.first[0]} seq {f.first[1]}, last {f.last[0]} seq {f.last[1]}",
                at=now,
            )
        if f.count and not final:
            f.summary_at, f.count = now, 0
            return
        log.info(
            "dispatch rate back within dispatch.max_per_s: %d refused (%s) over %.1f s",
            f.total,
            RATE_LIMITED,
            self._refused_at - f.since,
        )
        self._flood = None


HEARTBEAT_LOG_EVERY_S = 60.0
"""Ignored heartbeats are logged at most this often (each is counted in the metric)."""


class HeartbeatGate:
    """Which heartbeats restart the failsafe's silence timer.

    Without JWS keys, all of them (any payload, as before). With `dispatch.keys`, only a
    JWS from a configured kid whose `at` is fresh (`site.max_issued_age_s`) and later than
    the last one accepted from that kid: a client that can publish on the broker, but holds
    no key, cannot keep the failsafe off, not even by replaying a recorded heartbeat. Under
    `dispatch.accept_legacy_sig`, a heartbeat that is not a JWS still counts (legacy
    dispatchers never signed theirs). `accepted` and `ignored` count them since start.
    """

    def __init__(self, keys: KeyRing | None, limits: SiteLimits, metrics: Metrics) -> None:
        self._keys = keys if keys is not None and keys.kids else None
        self._max_age_s = limits.max_issued_age_s
        self._metrics = metrics
        self._last_at: dict[str, float] = {}
        self._logged_at = -math.inf
        self._unlogged = 0
        self.accepted = 0
        self.ignored = 0

    def accept(self, payload: bytes, now_unix: float | None = None) -> bool:
        """True when this heartbeat counts; an ignored one is counted and logged (rarely)."""
        keys = self._keys
        if keys is None or (keys.legacy_accepted and not is_compact(payload)):
            self.accepted += 1
            return True
        now = time.time() if now_unix is None else now_unix
        try:
            hb, kid = Heartbeat.verify(payload, keys, now_unix=now, max_age_s=self._max_age_s)
            assert hb.at is not None  # verify requires it
            last = self._last_at.get(kid)
            if last is not None and hb.at <= last:
                raise HeartbeatRejected(
                    f"heartbeat at {rfc3339(hb.at)} not after the last from kid {kid!r} "
                    f"({rfc3339(last)}): replayed?"
                )
        except HeartbeatRejected as exc:
            self._ignored(str(exc))
            return False
        self._last_at[kid] = hb.at
        self.accepted += 1
        return True

    def _ignored(self, reason: str) -> None:
        self.ignored += 1
        self._metrics.heartbeats_rejected.inc()
        now = time.monotonic()
        if now - self._logged_at < HEARTBEAT_LOG_EVERY_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more ignored since the last line)" if self._unlogged else ""
        log.warning("heartbeat ignored: %s%s", reason, more)
        self._logged_at, self._unlogged = now, 0
