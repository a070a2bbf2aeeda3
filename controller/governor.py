"""The daemon's side of the rails: price, peak and economics inputs, price sources, the
once-a-second decision of which rail governs, and its measurement and verification.

The decision itself is `controller.market.rails` (pure); this module feeds it, hands its
level to the target tracker (`TargetTracker.set_base`, under the ramp limits), says which
rail governs (the failsafe, frequency deployments and the grid dispatch above the lower
rails), logs and journals every change of governing rail with its reason, and measures each
curtailment event (`controller.market.mv`). Input messages that are bad or stale are
rejected with a log line and a metric and change nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from controller.config import ConfigError, LoadedConfig, SiteLimits
from controller.journal import Journal
from controller.market.economics import Economics
from controller.market.mv import (
    METHOD_HIGH_2_OF_3,
    METHOD_HIGH_4_OF_5,
    METHOD_RECENT_FALLBACK,
    EventMeter,
    high_k_of_n_baseline,
)
from controller.market.peaks import Peaks, parse_alert
from controller.market.price_rule import PriceRule, RuleEvent
from controller.market.prices import PriceQuote, parse_quote, parse_quotes, read_price_csv
from controller.market.rails import RAILS, Decision, RailName, Rails, SteadyFull
from controller.metrics import Metrics
from controller.ramp_score import tolerance_w
from controller.target import TargetTracker
from controller.wire.codec import WireError, decode_object, optional_number
from controller.wire.dispatch import Dispatch, DispatchRejected
from controller.wire.jws import KeyRing
from controller.wire.telemetry import RailsReport

log = logging.getLogger("rampd.rails")

TICK_S = 1.0
"""How often the rails decide: their levels move over seconds to minutes."""
EVENT_BASELINE = "commitment_baseline"
"""Journal event: a `reduce_by` commitment's baseline was fixed ("<id> <W>")."""
RESUME_LOOKBACK_S = 7 * 86400.0
BASELINE_WINDOW_S = 3600.0
"""A like-day baseline averages the hour an event starts in (its end is not known yet)."""
LOOKUP_TIMEOUT_S = 30.0
"""Commitments accepted this long before a restart are looked at again."""


def parse_economics(payload: bytes) -> Economics:
    """`{"hashprice_usd_per_ph_day": X, "pool_fee": F}` (pool_fee optional: 0)."""
    try:
        obj: dict[str, Any] = decode_object(payload)
        hashprice = optional_number(obj, "hashprice_usd_per_ph_day")
        fee = optional_number(obj, "pool_fee")
    except WireError as exc:
        raise ValueError(exc.reason) from None
    if hashprice is None:
        raise ValueError("hashprice_usd_per_ph_day missing")
    return Economics(hashprice, 0.0 if fee is None else fee)


def price_csv(cfg: LoadedConfig) -> list[PriceQuote]:
    """The configured CSV price schedule, read at start (a bad file fails the start)."""
    src = cfg.site.prices
    if src.csv is None:
        return []
    path = src.csv if src.csv.is_absolute() else cfg.path.parent / src.csv
    try:
        return read_price_csv(path, src.interval_s)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg.path}: prices.csv: {exc}") from None


class Governor:
    def __init__(
        self,
        cfg: LoadedConfig,
        tracker: TargetTracker,
        metrics: Metrics,
        journal: Journal | None,
    ) -> None:
        site = cfg.site
        self._tracker = tracker
        self._metrics = metrics
        self._journal = journal
        self._prices_cfg = site.prices
        self.classes = cfg.device_classes()
        self.econ = cfg.economics
        self.rule = PriceRule(self.classes, site.price_rule, self.econ, grace_s=site.prices.grace_s)
        self.peaks = Peaks(site.peaks)
        self.rails = Rails(full_w=site.site.max_kw * 1e3, peaks=self.peaks, price=self.rule)
        self._full = SteadyFull()
        site_max_w = site.site.max_kw * 1e3
        self.meter = EventMeter(
            site.mv.baseline_minutes,
            tolerance_w(site_max_w, site_max_w),
            site.mv.ramp_allowance_s,
        )
        self._schedule = sorted(price_csv(cfg), key=lambda q: q.interval_start)
        self._starts = [q.interval_start for q in self._schedule]
        self._fed: float | None = None  # interval start of the schedule's last quote fed
        self._baseline_method = site.mv.baseline
        self._tz = site.peaks.timezone
        self._chain_seen: float | None = None
        self._lookups: set[asyncio.Task[None]] = set()
        self._upper_wishes: dict[RailName, float | None] = {}
        self.governing: RailName = "default"
        self.decision = Decision("default", site_max_w, {"default": site_max_w}, "full power")
        self.reason = "full power"
        self.events = 0

    # -- inputs (MQTT) ----------------------------------------------------------------------

    def on_price(self, payload: bytes) -> None:
        try:
            q = parse_quote(payload)
        except ValueError as exc:
            self._reject("price", str(exc))
            return
        self._take_quote(q, time.time())

    def on_peak(self, payload: bytes) -> None:
        try:
            alert = parse_alert(payload)
        except ValueError as exc:
            self._reject("peak", str(exc))
            return
        self.peaks.on_alert(alert, time.time())
        log.info(
            "peak alert %.0f%% for %s; acted on from %.0f%%",
            alert.probability * 100,
            _span(alert.start, alert.end),
            self.peaks.cfg.min_probability * 100,
        )

    def on_economics(self, payload: bytes) -> None:
        try:
            econ = parse_economics(payload)
        except ValueError as exc:
            self._reject("economics", str(exc))
            return
        self.econ = econ
        self.rule.set_economics(econ)
        strikes = ", ".join(f"{k} {v:.1f}" for k, v in self.rule.strikes().items())
        log.info(
            "economics: hashprice %.2f USD/PH/day, pool fee %.1f%%; strikes USD/MWh: %s",
            econ.hashprice_usd_per_ph_day,
            econ.pool_fee * 100,
            strikes,
        )

    def add_commitment(self, d: Dispatch) -> None:
        self.rails.add_commitment(d)

    def resume(self, limits: SiteLimits, hmac_key: KeyRing | None, now_unix: float) -> int:
        """Put back the journal's commitments not over yet, with the baselines fixed for
        them before the restart; returns how many."""
        j = self._journal
        if j is None:
            return 0
        since = now_unix - RESUME_LOOKBACK_S
        n = 0
        for row in j.dispatches_between(since, now_unix):
            if row.mode != "commitment" or row.decision != "accepted":
                continue
            try:
                d = Dispatch.decode(
                    row.payload, now_unix=now_unix, last_seq=None, limits=limits,
                    replay=True, hmac_key=hmac_key,
                )  # fmt: skip
            except DispatchRejected:
                continue  # over (end_at past), or no longer valid
            if d.end_at is not None and d.end_at + d.ramp_up_s > now_unix:
                self.rails.add_commitment(d)
                n += 1
                log.info("journal: resumed commitment %s (seq %d)", d.id, d.seq)
        for ev in j.events_between(since, now_unix):
            if ev.kind == EVENT_BASELINE:
                d_id, _, w = ev.text.rpartition(" ")
                self.rails.set_baseline(d_id, float(w))
        return n

    def _take_quote(self, q: PriceQuote, now: float) -> None:
        if q.is_stale(now, self._prices_cfg.grace_s):
            self._reject("price", f"stale: interval {_span(q.interval_start, q.end)} is over")
            return
        self._log_rule(self.rule.on_price(q, now))

    def _reject(self, what: str, reason: str) -> None:
        log.warning("%s message rejected: %s", what, reason)
        self._metrics.inputs_rejected.labels(input=what).inc()

    def _log_rule(self, events: list[RuleEvent]) -> None:
        for e in events:
            log.info("price rule: %s", e.reason)
            if self._journal is not None:
                self._journal.record_event("price", e.reason, at=e.at)

    # -- price sources (CSV schedule, HTTP) -------------------------------------------------

    async def run_sources(self) -> None:
        """Feed the CSV schedule's quote for the interval in force, and poll the HTTP source,
        every `prices.poll_s` (at most 1 s for the schedule: interval starts are on time)."""
        cfg = self._prices_cfg
        session = aiohttp.ClientSession() if cfg.http else None
        try:
            next_http = 0.0
            while True:
                now = time.time()
                self._feed_schedule(now)
                if session is not None and cfg.http and time.monotonic() >= next_http:
                    next_http = time.monotonic() + cfg.poll_s
                    await self._poll_http(session, cfg.http, cfg.timeout_s)
                await asyncio.sleep(min(cfg.poll_s, TICK_S))
        finally:
            if session is not None:
                await session.close()

    def _feed_schedule(self, now: float) -> None:
        i = bisect.bisect_right(self._starts, now) - 1  # the schedule is sorted by start
        if i < 0:
            return
        q = self._schedule[i]
        if now < q.end and self._fed != q.interval_start:
            self._fed = q.interval_start
            self._take_quote(q, now)

    async def _poll_http(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s), session.get(url) as resp:
                resp.raise_for_status()
                body = await resp.read()
            quotes = parse_quotes(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._reject("price", f"HTTP source {url}: {exc or type(exc).__name__}")
            return
        now = time.time()
        fresh = [q for q in quotes if not q.is_stale(now, self._prices_cfg.grace_s)]
        if quotes and not fresh:  # a source stuck on old data: said once a poll
            last = max(quotes, key=lambda x: x.interval_start)
            self._reject(
                "price", f"HTTP source {url}: stale: latest interval "
                f"{_span(last.interval_start, last.end)} is over",
            )  # fmt: skip
        for q in sorted(fresh, key=lambda x: x.interval_start):
            self._log_rule(self.rule.on_price(q, now))

    # -- the decision, once a second --------------------------------------------------------

    def tick(
        self,
        now_unix: float,
        now_mono: float,
        *,
        upper: tuple[RailName, str] | None,
        site_w: float | None,
        target_w: float,
        full_w: float | None,
        upper_wishes: Mapping[RailName, float | None] | None = None,
    ) -> None:
        """Decide the lower rails, hand their level to the tracker, and follow which rail
        governs (`upper`: the failsafe, frequency or dispatch rail in force, and why;
        `upper_wishes`: the level each of those asks, None where not active, for telemetry)."""
        self._upper_wishes = dict(upper_wishes or {})
        self._log_rule(self.rule.update(now_unix))
        ongoing = self.meter.ongoing  # a curtailed period is never a baseline
        baseline = self.meter.recent_baseline_w() if ongoing is None else ongoing.baseline_w
        full = self._full.update(now_mono, full_w)
        d = self.rails.decide(now_unix, baseline_w=baseline, full_w=full)
        # Over one tick to the new level: the tracker then moves smoothly along a rail's own
        # ramp (a commitment's ramp-down, a staggered resumption) sampled once a second.
        self._tracker.set_base(d.wish_w, TICK_S, now_mono)
        for d_id, w in self.rails.fixed:
            if self._journal is not None:
                self._journal.record_event(EVENT_BASELINE, f"{d_id} {w:.1f}", at=now_unix)
        self.rails.fixed.clear()
        self.decision = d
        governing, reason = (d.rail, d.reason) if upper is None else upper
        if governing != self.governing:
            text = f"{self.governing} -> {governing}: {reason}"
            log.info("governing rail %s", text)
            if self._journal is not None:
                self._journal.record_event("rail", text, at=now_unix)
        self.governing, self.reason = governing, reason
        price = self._price_now(now_unix)
        if site_w is not None and math.isfinite(site_w):
            ev = self.meter.sample(
                now_unix,
                site_w,
                governing,
                target_w,
                price_usd_per_mwh=price,
                revenue_usd_per_mwh=self._revenue_usd_per_mwh(),
                detail=reason,
            )
            if ev is not None:
                self.events += 1
                self._metrics.curtailments.labels(rail=ev.rail).inc()
                log.info(
                    "curtailment measured: %s for %.0f s, %.1f kWh below a baseline of %.0f kW",
                    ev.rail,
                    ev.ended_at - ev.started_at,
                    ev.energy_curtailed_kwh,
                    ev.baseline_w / 1e3,
                )
                if self._journal is not None:
                    self._journal.record_curtailment(ev)
        self._like_day_baseline()
        self._metrics.set_rails(
            governing, RAILS, self._wishes(), price, self.rule.curtailed_fraction()
        )

    def _wishes(self) -> dict[str, float | None]:
        """What every rail asks, highest precedence first."""
        asks = {**self._upper_wishes, **self.decision.wishes}
        return {str(r): asks[r] for r in RAILS if r in asks}

    def _like_day_baseline(self) -> None:
        """A new event chain under `mv.baseline = high_4_of_5`: its baseline from the journal's
        like days over the hour it starts in (the 4 highest of the last 5 weekdays; on a
        weekend the 2 highest of the last 3 weekend days), looked up in a thread (a read of up
        to two weeks of telemetry) while the event goes on with the recent one."""
        ongoing = self.meter.ongoing
        chain = None if ongoing is None else ongoing.chain_started_at
        if chain is None or chain == self._chain_seen:
            return
        self._chain_seen = chain
        if self._baseline_method != "high_4_of_5" or self._journal is None:
            return
        task = asyncio.get_running_loop().create_task(self._lookup(chain))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _lookup(self, chain: float) -> None:
        journal = self._journal
        assert journal is not None
        tz = ZoneInfo(self._tz)
        start = datetime.fromtimestamp(chain, tz)
        s0 = start.hour * 3600.0 + start.minute * 60.0 + start.second
        s1 = min(s0 + BASELINE_WINDOW_S, 86400.0)
        k, n, method = (
            (2, 3, METHOD_HIGH_2_OF_3) if start.weekday() >= 5 else (4, 5, METHOD_HIGH_4_OF_5)
        )
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                days = await asyncio.to_thread(journal.site_power_days, chain, s0, s1, self._tz, n)
            w = high_k_of_n_baseline(days, s0, s1, k=k, n=n)
        except (TimeoutError, sqlite3.Error, ValueError) as exc:
            log.warning("%s baseline not found (%s): recent one kept", method, exc)
            w = None
        if w is None:
            self.meter.set_baseline(None, METHOD_RECENT_FALLBACK, chain_started_at=chain)
        else:
            self.meter.set_baseline(w, method, chain_started_at=chain)

    def finish(self, now_unix: float) -> None:
        """At shutdown: the event in progress is measured up to now and journalled."""
        ev = self.meter.finish(now_unix)
        if ev is not None and self._journal is not None:
            self._journal.record_curtailment(ev)

    def _price_now(self, now: float) -> float | None:
        q = self.rule.last_quote
        if q is None or q.is_stale(now, self._prices_cfg.grace_s):
            return None
        return q.usd_per_mwh

    def _revenue_usd_per_mwh(self) -> float:
        """What a MWh curtailed now would have earned: the curtailed classes' while the price
        curtails, else the fleet's average over the classes with economics."""
        frac = self.rule.curtailed_fraction()
        num = den = 0.0
        for c in self.classes:
            f = frac.get(c.kind, 0.0)
            rev = c.revenue_usd_per_mwh(self.econ)
            if f > 0.0:
                num, den = num + f * c.shed_w * rev, den + f * c.shed_w
        if den > 0.0:
            return num / den
        for c in self.classes:
            rev = c.revenue_usd_per_mwh(self.econ)
            if rev > 0.0:
                num, den = num + c.full_w * rev, den + c.full_w
        return num / den if den > 0.0 else 0.0

    def report(self, now_unix: float) -> RailsReport:
        q = self.rule.last_quote
        return RailsReport(
            governing=self.governing,
            reason=self.reason,
            wishes_w=self._wishes(),
            price_usd_per_mwh=None if q is None else q.usd_per_mwh,
            price_interval_start=None if q is None else q.interval_start,
            price_stale=q is not None and q.is_stale(now_unix, self._prices_cfg.grace_s),
            breakeven_usd_per_mwh={
                k: v for k, v in self.rule.strikes().items() if math.isfinite(v)
            },
            curtailed=self.rule.curtailed_fraction(),
        )

    def inputs(self) -> dict[str, Callable[[bytes], None]]:
        """The MQTT inputs by topic suffix."""
        return {"price": self.on_price, "peak": self.on_peak, "economics": self.on_economics}


def _span(a: float, b: float) -> str:
    f = "%H:%M:%SZ"
    return f"{time.strftime(f, time.gmtime(a))}-{time.strftime(f, time.gmtime(b))}"
