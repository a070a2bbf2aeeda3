"""The DSX Flex agent (factory side): load targets in, power state and breaches out.

In: `grid/v1/isv/+/loadtarget/set` (QoS 1; the configured ISVs' topics if the broker denies
the wildcard), `grid/v1/infra/<id or +>/powerbreach/enforcement` (QoS 2). Out:
`grid/v1/<role>/<agent_id>/powerstate/status` (QoS 1) and `.../powerbreach` (QoS 2).

A load target is applied only when everything holds: a configured ISV (its topic and its
`source` agree), the envelope as dsx-flex.yaml says, fresh (`max_event_age_s`), the JWS
verified with a configured key (or a plain object where signatures are not required), the
payload valid and its feeds known. Anything else is refused: logged, counted
(`rampd_dsx_flex_targets_total{result=...}`), journalled, never applied. A redelivered event
(same source and id) is ignored.

Every half second the agent evaluates each feed: the schedule's winner becomes the DSX Flex
rail's level (`Rails.set_ceiling`) on the site's feed, the ceiling of the zone's row in this
parent's allocation (`RowCeilings`) on a zone's feed; a change of level starts a ramp event,
an arrival ends it, the breach watch judges the feed's measured load (the site's, or the
zone's from its telemetry), and the periodic status goes out when due. No target ack exists
in DSX Flex: the status snapshot (event `target_set`, echoing the correlation id) is the
answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client import Counter
from pydantic import ValidationError

from controller.config import ConfigError
from controller.northbound.context import NorthboundContext
from controller.northbound.dsx_flex import envelope, schema
from controller.northbound.dsx_flex.breach import (
    Alert,
    BreachWatch,
    infrastructure_actions,
    shed_hints,
)
from controller.northbound.dsx_flex.config import DsxFlexConfig, zone_of
from controller.northbound.dsx_flex.enforcement import decode_enforcement
from controller.northbound.dsx_flex.envelope import Envelope, EnvelopeError, Trace
from controller.northbound.dsx_flex.link import DsxLink, Subscription
from controller.northbound.dsx_flex.loadtarget import TargetError, decode_targets
from controller.northbound.dsx_flex.metrics import DsxMetrics
from controller.northbound.dsx_flex.schedule import Schedule, Target, decode_record, encode_record
from controller.northbound.dsx_flex.signing import SignatureError, Verifier
from controller.northbound.dsx_flex.status import (
    Bounds,
    Event,
    FeedPower,
    FeedState,
    RampTracker,
    site_power,
    status_data,
    tolerance_w,
    zone_power,
)
from controller.wire.codec import WireError, decode_object, encode_object
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import rfc3339

log = logging.getLogger("rampd.dsx_flex")

TICK_S: Final = 0.5
SEEN_MAX: Final = 4096
"""Recent (source, id) pairs remembered to ignore redeliveries."""
LOG_REPEAT_S: Final = 60.0
"""A refusal of the same kind from the same sender is logged again after this long."""
COMPLIANT_EPS_W: Final = 0.5
OUT_QUEUE_MAX: Final = 100


class Refusal(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class DsxFlexAgent:
    name = "dsx_flex"

    def __init__(self, ctx: NorthboundContext) -> None:
        cfg = ctx.cfg.site.dsx_flex
        if cfg is None:
            raise ValueError("the site file has no [dsx_flex]")
        self.ctx = ctx
        self.cfg: DsxFlexConfig = cfg
        try:  # the official document, read at start: without it nothing is validated
            for names in schema.EVENT_SCHEMAS.values():
                for name in names:
                    schema.validator(name)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{ctx.cfg.path}: dsx_flex: {schema.SPEC}: {exc}") from None
        site = ctx.cfg.site
        self.feeds = cfg.feed_map(site.site_id)
        self.zones = {t: z for t, place in self.feeds.items() if (z := zone_of(place)) is not None}
        """Feed tag -> the zone device it feeds (the other feed, if any, is the site's)."""
        self._site_min_w = site.site.min_kw * 1e3
        self._site_max_w = site.site.max_kw * 1e3
        self._has_breakers = any(d.protocol == "breaker" for d in ctx.cfg.devices)
        self.verifier = Verifier(cfg.public_keys)
        self.schedule = Schedule(self.feeds)
        self.ramps = {f: RampTracker() for f in self.feeds}
        self.breaches = {f: BreachWatch(cfg.breach, f) for f in self.feeds}
        self.metrics = DsxMetrics(ctx.metrics.registry, list(self.zones.values()))
        base = f"grid/v1/{cfg.role}/{cfg.agent_id}"
        self.source = f"//grid/v1/{cfg.role}/{cfg.agent_id}"
        self.status_topic = f"{base}/powerstate/status"
        self.breach_topic = f"{base}/powerbreach"
        infra = cfg.infra_ids or ["+"]
        subs = [
            Subscription(
                "grid/v1/isv/+/loadtarget/set",
                1,
                tuple(f"grid/v1/isv/{i}/loadtarget/set" for i in cfg.isv_ids),
            ),
            *(Subscription(f"grid/v1/infra/{i}/powerbreach/enforcement", 2) for i in infra),
        ]
        try:
            broker = cfg.mqtt.resolve(site.mqtt)
        except ValidationError as exc:  # the merged settings, e.g. plaintext off this host
            msgs = "; ".join(e["msg"] for e in exc.errors())
            raise ConfigError(f"{ctx.cfg.path}: dsx_flex.mqtt: {msgs}") from None
        self.link = DsxLink(
            broker,
            subs,
            self.on_message,
            on_connected=self._connected,
            # Snapshots queued while the broker is away: the newest ones matter, breaches
            # (never dropped below 4x this) all do.
            queue_max=OUT_QUEUE_MAX,
        )
        self._seq = itertools.count(1)
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._logged: dict[tuple[str, str], float] = {}
        self._next_periodic = 0.0
        self._breach_ids: OrderedDict[str, None] = OrderedDict()
        self._failing = False
        self._resume(time.time())

    def _resume(self, now: float) -> None:
        """The targets accepted before a restart that can still win (from the journal)."""
        journal = self.ctx.journal
        if journal is None:
            return
        since = now - self.ctx.cfg.site.journal.retention_days * 86400.0
        n = 0
        for ev in journal.events_between(since, now):
            if ev.kind != "dsx_schedule":
                continue
            try:
                targets = decode_record(ev.text, next(self._seq))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dsx flex: journal schedule record at %s unreadable: %s", ev.at, exc)
                continue
            for _ in targets[1:]:
                next(self._seq)
            known = [t for t in targets if t.feed in self.feeds]
            self.schedule.add(known)
            n += len(known)
        self.schedule.prune(now)
        left = sum(len(self.schedule.targets(f)) for f in self.feeds)
        if left:
            text = f"resumed {left} of {n} journalled target(s) not over yet"
            log.info("dsx flex: %s", text)
            self._journal("dsx_resumed", text, now)

    # -- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="dsx-link")
            tg.create_task(self._ticks(), name="dsx-ticks")

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.metrics.connected.set(1 if self.link.connected else 0)
            self._guarded(self.evaluate, time.time())

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """A fault of ours must not stop the daemon: logged once, until it works again."""
        try:
            fn(*args)
        except Exception:
            if not self._failing:
                log.exception("dsx flex evaluation failed; retrying every tick")
            self._failing = True
        else:
            if self._failing:
                log.info("dsx flex evaluation works again")
            self._failing = False

    def _connected(self) -> None:
        self._next_periodic = 0.0  # a snapshot at once for whoever listens now

    # -- messages in ---------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) == 6 and parts[2] == "isv" and parts[4:] == ["loadtarget", "set"]:
            self.on_target(parts[3], payload, time.time())
        elif (
            len(parts) == 6
            and parts[2] == "infra"
            and parts[4:]
            == [
                "powerbreach",
                "enforcement",
            ]
        ):
            self.on_enforcement(parts[3], payload, time.time())

    def _verified_data(self, env: Envelope) -> Any:
        data = self._payload_of(env)
        wrong = schema.first_error(schema.EVENT_SCHEMAS[str(env.event["type"])][1], data)
        if wrong is not None:
            raise Refusal("payload", f"not what dsx-flex.yaml says: {wrong}")
        return data

    def _payload_of(self, env: Envelope) -> Any:
        if isinstance(env.data, str):
            try:
                _, payload = self.verifier.verify(env.data)
            except SignatureError as exc:
                raise Refusal("signature", str(exc)) from None
            try:
                return decode_object(payload)
            except WireError as exc:
                raise Refusal("payload", f"signed payload: {exc.reason}") from None
        if self.cfg.require_signature:
            raise Refusal("signature", "data is not signed (a JWS is required)")
        return env.data

    def _envelope(self, role: str, sender: str, payload: bytes, type_: str, now: float) -> Envelope:
        try:
            env = envelope.decode(payload, type_)
        except EnvelopeError as exc:
            raise Refusal("envelope", exc.reason) from None
        wrong = schema.first_error(schema.EVENT_SCHEMAS[type_][0], json.loads(payload))
        if wrong is not None:
            raise Refusal("envelope", f"not what dsx-flex.yaml says: {wrong}")
        if env.role != role or env.sender != sender:
            raise Refusal("envelope", f"source {env.source} is not the topic's {role} {sender}")
        age = now - env.time
        if abs(age) > self.cfg.max_event_age_s:
            limit = self.cfg.max_event_age_s
            raise Refusal("stale", f"event time {age:+.0f} s from now (max {limit:g})")
        return env

    def _first_time(self, env: Envelope) -> bool:
        key = (env.source, env.id)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        return True

    def on_target(self, isv: str, payload: bytes, now: float) -> None:
        try:
            if isv not in self.cfg.isv_ids:
                raise Refusal("unknown_isv", f"ISV {isv!r} is not one of isv_ids")
            env = self._envelope("isv", isv, payload, envelope.LOADTARGET_SET, now)
            data = self._verified_data(env)
            # Only once verified: a forged copy must not use up a genuine event's id.
            if not self._first_time(env):
                self.metrics.targets.labels("duplicate").inc()
                log.debug("dsx flex: event %s from %s again; ignored", env.id, env.source)
                return
            try:
                requests = decode_targets(data, self.feeds, now)
            except TargetError as exc:
                raise Refusal(exc.code, exc.reason) from None
        except Refusal as r:
            self._refused("load target", isv, r, now, self.metrics.targets)
            return
        correlation = env.correlationid or env.id
        targets = [
            Target(
                feed=feed,
                start=now if req.start is None else req.start,
                end=req.end,
                constraint=req.constraint,
                best_effort=req.best_effort,
                correlation_id=correlation,
                isv=isv,
                issued=env.time,
                seq=next(self._seq),
                start_given=req.start is not None,
            )
            for req in requests
            for feed in req.feeds
        ]
        self.schedule.add(targets)
        self.metrics.targets.labels("applied").inc()
        text = f"{isv} set {len(requests)} target(s), correlation {correlation}: " + "; ".join(
            _describe(t) for t in targets
        )
        log.info("dsx flex: %s", text)
        self._journal("dsx_target", text, now)
        self._journal("dsx_schedule", encode_record(targets), now)
        touched = {t.feed for t in targets}
        tel = self.ctx.telemetry()
        self._publish_status(now, tel, {f: "target_set" for f in touched}, env.trace, correlation)
        self._guarded(self.evaluate, now, tel)

    def on_enforcement(self, infra: str, payload: bytes, now: float) -> None:
        m = self.metrics.enforcements
        try:
            if self.cfg.infra_ids and infra not in self.cfg.infra_ids:
                raise Refusal("unknown_infra", f"infra agent {infra!r} is not one of infra_ids")
            env = self._envelope("infra", infra, payload, envelope.POWERBREACH_ENFORCEMENT, now)
            data = self._verified_data(env)
            if not self._first_time(env):
                m.labels("duplicate").inc()
                return
            try:
                enf = decode_enforcement(data)
            except WireError as exc:
                raise Refusal("payload", exc.reason) from None
        except Refusal as r:
            self._refused("enforcement", infra, r, now, m)
            return
        m.labels("journalled").inc()
        text = enf.summary(infra, enf.breach_id in self._breach_ids)
        log.info("dsx flex enforcement: %s", text)
        self._journal("dsx_enforcement", text, now)

    def _refused(self, what: str, sender: str, r: Refusal, now: float, counter: Counter) -> None:
        counter.labels(r.result).inc()
        text = f"{what} from {sender} refused ({r.result}): {r.reason}"
        self._journal("dsx_refused", text, now)
        key = (r.result, sender)
        if now - self._logged.get(key, -math.inf) >= LOG_REPEAT_S:
            self._logged[key] = now
            if len(self._logged) > SEEN_MAX:
                self._logged.clear()
            log.warning("dsx flex: %s", text)

    def _journal(self, kind: str, text: str, at: float) -> None:
        if self.ctx.journal is not None:
            self.ctx.journal.record_event(kind, text, at=at)

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, now: float, tel: Telemetry | None = None) -> None:
        """Apply the schedule now; publish the ramp events, breaches and periodic status."""
        tel = self.ctx.telemetry() if tel is None else tel
        self.schedule.prune(now)
        events: dict[str, Event] = {}
        for feed in self.feeds:
            winner = self.schedule.winner(feed, now)
            level = None if winner is None else winner.level_w
            ramp = self.ramps[feed]
            power = self._power(feed, tel, level)
            if level != ramp.level_w:
                events[feed] = ramp.change(level, now)
                self._apply(feed, level, winner, now)
            else:
                heading = power.heading_w
                end = ramp.judge(power.measured_w, heading, self._tolerance(heading))
                if end is not None:
                    events[feed] = end
            alert = self.breaches[feed].step(now, power.measured_w, winner)
            if alert is not None:
                self._publish_breach(now, alert)
        if events:
            self._publish_status(now, tel, events, Trace.new(), self._correlation(now, events))
        elif now >= self._next_periodic:
            self._publish_status(now, tel, {}, Trace.new(), self._correlation(now))

    def _tolerance(self, level_w: float) -> float:
        b = self.cfg.breach
        return tolerance_w(level_w, b.tolerance_pct, b.tolerance_kw * 1e3)

    def _power(self, feed: str, tel: Telemetry, level: float | None) -> FeedPower:
        """The feed's place now: the site (telemetry), or its zone (the zone's row)."""
        zone = self.zones.get(feed)
        if zone is None:
            return site_power(tel, level, self._site_min_w, self._site_max_w)
        v = self.ctx.device(zone)
        if v is None:  # not in the image (cannot be: a reload that drops it is refused)
            return FeedPower(None, Bounds(0.0, 0.0, 0.0), 0.0, 0.0)
        return zone_power(v.measured_w, v.planned_w, v.min_w, v.max_w, v.rated_w, level)

    def _apply(self, feed: str, level: float | None, winner: Target | None, now: float) -> None:
        zone = self.zones.get(feed)
        place = "the site" if zone is None else f"zone {zone}"
        ceiling: float | None = None
        if level is None or winner is None or winner.constraint is None:
            reason = f"DSX Flex: no constraint on {feed} ({place})"
        else:
            ceiling, c = level, winner.constraint
            reason = (
                f"DSX Flex {winner.isv} {c.value:g} {c.unit} on {feed} ({place}, "
                f"correlation {winner.correlation_id})"
            )
        gauge = math.nan if ceiling is None else ceiling
        if zone is None:
            self.ctx.rails.set_ceiling("dsx_flex", ceiling, reason)
            self.metrics.ceiling.set(gauge)
        else:
            # The zone's row in this parent's allocation, not the site's rail: the site
            # target stands, and the other rows take up what the zone may not.
            self.ctx.ceilings.set(zone, ceiling)
            self.metrics.zone_ceiling.labels(zone).set(gauge)
        log.info("dsx flex: %s", reason)
        self._journal("dsx_ceiling", reason, now)

    def _correlation(self, now: float, changed: Iterable[str] = ()) -> str | None:
        """The correlation id of the target in force (a null one too: it restored the
        default), for the status it causes: on a feed that `changed` first (with several
        feeds, the one whose ramp event the status reports)."""
        for feed in (*changed, *self.feeds):
            w = self.schedule.winner(feed, now)
            if w is not None:
                return w.correlation_id
        return None

    # -- messages out --------------------------------------------------------------------

    def feed_state(self, feed: str, tel: Telemetry, event: Event, now: float) -> FeedState:
        winner = self.schedule.winner(feed, now)
        ramp = self.ramps[feed]
        power = self._power(feed, tel, ramp.level_w)
        calc = power.calculated_w
        level = None if winner is None else winner.level_w
        # The site's calculated load is where it is heading (exact); a zone's is its
        # measured power, within the tolerance a breach is judged with.
        slack = (
            COMPLIANT_EPS_W if feed not in self.zones or level is None else self._tolerance(level)
        )
        return FeedState(
            targets=self.schedule.targets(feed),
            active=winner,
            bounds=power.bounds,
            calculated_w=calc,
            in_flight=ramp.in_flight,
            event=event,
            event_start=ramp.event_start,
            compliant=level is None or calc <= level + slack,
        )

    def _data(self, obj: dict[str, Any]) -> str | dict[str, Any]:
        signer = self.cfg.signer
        return obj if signer is None else signer.sign(encode_object(obj, compact=True))

    def _publish_status(
        self,
        now: float,
        tel: Telemetry,
        events: dict[str, Event],
        trace: Trace,
        correlation: str | None,
    ) -> None:
        states = {f: self.feed_state(f, tel, events.get(f, "periodic"), now) for f in self.feeds}
        body = envelope.encode(
            source=self.source,
            type_=envelope.POWERSTATE_STATUS,
            subject="powerstate",
            data=self._data(status_data(states, now)),
            at=now,
            trace=trace,
            correlationid=correlation,
        )
        self.link.publish(self.status_topic, body, qos=1, droppable=True)
        self.metrics.published.labels("status").inc()
        self._next_periodic = now + self.cfg.status_period_s

    def _publish_breach(self, now: float, alert: Alert) -> None:
        if alert.feed in self.zones:
            # The zone's devices are its own rampd's (its own agent's hints): none here, and
            # this parent's breakers do not feed it.
            hints: list[dict[str, Any]] = []
            actions = infrastructure_actions(alert.status, alert.severity, False)
        else:
            hints = shed_hints(self.ctx.cfg.devices, alert.excess_w)
            actions = infrastructure_actions(alert.status, alert.severity, self._has_breakers)
        body = envelope.encode(
            source=self.source,
            type_=envelope.POWERBREACH_ALERT,
            subject="powerbreach",
            data=self._data(alert.to_wire(hints, actions)),
            at=now,
            trace=Trace.new(),
            correlationid=alert.target.correlation_id,
        )
        self.link.publish(self.breach_topic, body, qos=2, droppable=False)
        self.metrics.published.labels("breach").inc()
        self.metrics.breaches.labels(alert.status).inc()
        self._breach_ids[alert.breach_id] = None
        if len(self._breach_ids) > SEEN_MAX:
            self._breach_ids.popitem(last=False)
        level = alert.target.level_w or 0.0
        text = (
            f"{alert.status} {alert.severity} breach {alert.breach_id} on {alert.feed}: "
            f"measured {alert.measured_w / 1e3:.1f} kW, target {level / 1e3:.1f} kW "
            f"(correlation {alert.target.correlation_id})"
        )
        (log.info if alert.status == "resolved" else log.warning)("dsx flex: %s", text)
        self._journal("dsx_breach", text, now)


def _describe(t: Target) -> str:
    what = "default" if t.constraint is None else f"{t.constraint.value:g} {t.constraint.unit}"
    until = "until replaced" if t.end is None else f"until {rfc3339(t.end)}"
    return f"{t.feed} {what} from {rfc3339(t.start)} {until}"
