"""The OpenADR 3.1 VEN: the VTN's events set the `openadr` rail, reports go back.

Five tasks, each restarted (logged, with backoff) if it ever fails, none able to stop the
daemon:
- vtn: registers the VEN (by venName, created if absent), then re-reads programs and events
  over REST every `poll_s` while no notifier is up, every `resync_s` while one is, and at
  once when asked (a notifier (re)connect or loss, a PROGRAM notification);
- notifier: `GET /notifiers` and the VEN-scoped topic names, then one MQTT session after
  the other (capped backoff); each connect asks for a REST re-read;
- apply: which event interval governs now (`schedule.decide`), handed to
  `rails.set_ceiling("openadr", ...)` when it changes and again at the next interval edge;
- sample: the site's measured power once a second, while some event wants a report;
- report: the reports the events' reportDescriptors ask for, POSTed to /reports, retried.
Events keep applying while the VTN is unreachable: an event in force is the VTN's word
until it is changed or deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import aiomqtt
from prometheus_client import Counter, Gauge

from controller.config import ConfigError
from controller.northbound.context import NorthboundContext
from controller.northbound.openadr import notifier
from controller.northbound.openadr.client import VtnClient, VtnError, ssl_context
from controller.northbound.openadr.config import OpenAdrConfig
from controller.northbound.openadr.model import (
    Event,
    ObjectError,
    Program,
    parse_event,
    parse_program,
)
from controller.northbound.openadr.reports import (
    ReportPlan,
    Samples,
    report_body,
    supported,
)
from controller.northbound.openadr.schedule import Decision, Span, decide, spans

log = logging.getLogger("rampd.openadr")

SAMPLE_S: Final = 1.0
SAMPLES_KEEP_S: Final = 26 * 3600.0
"""Measurements kept for reports: a day's event interval and some."""
OUTBOX_MAX: Final = 1000
RECHECK_S: Final = 60.0
"""The apply task looks again at least this often (a wall-clock step moves interval edges)."""
_RETRYABLE: Final = frozenset({401, 408, 409, 425, 429})


def read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"openadr.client_secret_file: cannot read {path}: {exc.strerror or exc}"
        ) from None
    if not text:
        raise ConfigError(f"openadr.client_secret_file: {path} is empty")
    return text


@dataclass
class Tracked:
    event: Event
    first_seen: float
    """Unix s: what a start of "0001-01-01" means for this event."""
    spans: list[Span]
    plans: list[ReportPlan]
    touched: float = field(default_factory=time.monotonic)


class _Metrics:
    def __init__(self, ctx: NorthboundContext) -> None:
        r = ctx.metrics.registry
        self.up = Gauge("rampd_openadr_vtn_up", "1 while the VTN's REST answers", registry=r)
        self.notifier = Gauge(
            "rampd_openadr_notifier_connected", "1 while the MQTT notifier is up", registry=r
        )
        self.events = Gauge("rampd_openadr_events", "Events the VEN holds", registry=r)
        self.level = Gauge(
            "rampd_openadr_level_watts",
            "The openadr rail's level from the event in force (NaN: none)",
            registry=r,
        )
        self.level.set(math.nan)
        self.requests = Counter(
            "rampd_openadr_requests_total",
            "REST requests to the VTN by operation and result",
            ["op", "result"],
            registry=r,
        )
        self.notifications = Counter(
            "rampd_openadr_notifications_total",
            "MQTT notifications by object type and operation",
            ["object", "operation"],
            registry=r,
        )
        self.reports = Counter(
            "rampd_openadr_reports_total", "Reports by result", ["result"], registry=r
        )


class Ven:
    name = "openadr"

    def __init__(self, ctx: NorthboundContext) -> None:
        site = ctx.cfg.site
        if site.openadr is None:
            raise ValueError("no [openadr] section")
        self.ctx = ctx
        self.cfg: OpenAdrConfig = site.openadr.resolve(ctx.cfg.path)
        self._secret = read_secret(self.cfg.client_secret_file)
        self.ven_name = self.cfg.ven_name or site.site_id
        seed = self.cfg.randomize_seed
        self._seed = secrets.token_hex(8) if seed is None else str(seed)
        self.programs: dict[str, Program] = {}
        self.events: dict[str, Tracked] = {}
        self._deleted: dict[str, float] = {}
        """Event id -> monotonic time of its DELETE notification (a slower read keeps out)."""
        self.ven_id: str | None = None
        self.client: VtnClient | None = None
        self.notifier_up = False
        self.decision: Decision | None = None
        self.samples = Samples(SAMPLES_KEEP_S, SAMPLE_S)
        self.outbox: deque[dict[str, Any]] = deque(maxlen=OUTBOX_MAX)
        self.reports_sent = 0
        self._seq = 0
        self._registered = asyncio.Event()
        self._resync = asyncio.Event()
        self._changed = asyncio.Event()
        self._applied: tuple[float | None, str] | None = None
        self._said: set[str] = set()
        self._vtn_problem: str | None = None
        self._missing_programs = True
        """Some configured program was not listed yet (or none was read yet)."""
        self.m = _Metrics(ctx)

    # -- running ----------------------------------------------------------------------------
    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self.client = VtnClient(
                http,
                self.cfg.vtn_url,
                self.cfg.client_id,
                self._secret,
                scope=self.cfg.scope,
                timeout_s=self.cfg.timeout_s,
                refresh_margin_s=self.cfg.token_refresh_margin_s,
                ssl_ctx=ssl_context(self.cfg.ca_file),
                on_request=lambda op, result: self.m.requests.labels(op, result).inc(),
            )
            log.info(
                "VEN %s for VTN %s, programs %s",
                self.ven_name,
                self.cfg.vtn_url,
                ", ".join(self.cfg.programs) or "(all)",
            )
            loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("vtn", self._vtn_loop),
                ("notifier", self._notifier_loop),
                ("apply", self._apply_loop),
                ("sample", self._sample_loop),
                ("report", self._report_loop),
            ]
            async with asyncio.TaskGroup() as tg:
                for name, fn in loops:
                    tg.create_task(self._guard(name, fn), name=f"openadr-{name}")

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            try:
                await fn()
                return
            except Exception:  # a bug here must not take the daemon's control with it
                failures += 1
                log.exception("%s task failed; restarting it", name)
                await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.cfg.backoff_max_s, 2.0 ** min(failures - 1, 16))
        return random.uniform(0.5 * ceiling, ceiling)

    def _say_once(self, key: str, level: int, msg: str, *args: object) -> None:
        """Log a problem with an object once (a re-read every poll would repeat it)."""
        if key not in self._said:
            if len(self._said) > 10_000:
                self._said.clear()
            self._said.add(key)
            log.log(level, msg, *args)

    def _journal(self, text: str) -> None:
        if self.ctx.journal is not None:
            self.ctx.journal.record_event("openadr", text)

    @property
    def _vtn(self) -> VtnClient:
        assert self.client is not None, "run() creates the client"
        return self.client

    # -- REST: registration and re-reads -------------------------------------------------------
    async def _vtn_loop(self) -> None:
        failures = 0
        while True:
            self._resync.clear()
            try:
                if self.ven_id is None:
                    await self._register()
                await self.sync()
            except (VtnError, ObjectError) as exc:
                failures += 1
                delay = self._backoff(failures)
                self._vtn_state(str(exc), delay)
            else:
                failures = 0
                self._vtn_state(None)
                delay = self.cfg.resync_s if self.notifier_up else self.cfg.poll_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._resync.wait()

    def _vtn_state(self, problem: str | None, delay: float = 0.0) -> None:
        self.m.up.set(0 if problem else 1)
        if problem is None:
            if self._vtn_problem is not None:
                log.info("VTN answers again")
            self._vtn_problem = None
            return
        if problem != self._vtn_problem:
            log.warning("VTN: %s; retrying in %.1f s", problem, delay)
        else:
            log.debug("VTN still failing: %s", problem)
        self._vtn_problem = problem

    async def _register(self) -> None:
        found = await self._find_ven()
        if found is None:
            body = {"objectType": "VEN_VEN_REQUEST", "venName": self.ven_name}
            try:
                created = await self._vtn.request(
                    "POST", "/vens", op="register", body=body, expect=(200, 201)
                )
            except VtnError as exc:
                if exc.status != 409:  # 409: another instance registered it meanwhile
                    raise
                created = None
            found = self._ven_id(created) if created is not None else await self._find_ven()
            if found is None:
                raise VtnError(f"registration of VEN {self.ven_name!r}: no id")
            what = "registered"
        else:
            what = "found"
        self.ven_id = found
        self._registered.set()
        log.info("VEN %s %s as %s", self.ven_name, what, found)
        self._journal(f"VEN {self.ven_name} {what} as {found} at {self.cfg.vtn_url}")

    async def _find_ven(self) -> str | None:
        vens = await self._vtn.request("GET", "/vens", op="vens", params={"venName": self.ven_name})
        if not isinstance(vens, list):
            raise VtnError("/vens: answer is not a list")
        for v in vens:
            if isinstance(v, dict) and v.get("venName") == self.ven_name:
                return self._ven_id(v)
        return None

    @staticmethod
    def _ven_id(obj: Any) -> str:
        vid = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(vid, str) or not vid:
            raise VtnError("ven object without an id")
        return vid

    async def sync(self) -> None:
        """Re-read the programs and their events; what the VTN no longer lists is gone."""
        started = time.monotonic()
        programs: dict[str, Program] = {}
        for raw in await self._vtn.get_all("/programs", op="programs"):
            try:
                p = parse_program(raw)
            except ObjectError as exc:
                self._say_once(f"program:{exc}", logging.WARNING, "%s; ignored", exc)
                continue
            if not self.cfg.programs or p.name in self.cfg.programs:
                programs[p.id] = p
        self.programs = programs  # before the events: notifications may come meanwhile
        missing = set(self.cfg.programs) - {p.name for p in programs.values()}
        self._missing_programs = bool(missing)
        if missing:
            self._say_once(
                f"missing:{sorted(missing)}",
                logging.WARNING,
                "VTN lists no program named %s (yet)",
                ", ".join(sorted(missing)),
            )
        raws: list[Any] = []
        if self.cfg.programs:
            for pid in programs:
                raws += await self._vtn.get_all("/events", op="events", params={"programID": pid})
        else:
            raws = await self._vtn.get_all("/events", op="events")
        listed: set[str] = set()
        for raw in raws:
            try:
                ev = parse_event(raw)
            except ObjectError as exc:
                rid = raw.get("id") if isinstance(raw, dict) else None
                self._say_once(f"event:{exc}", logging.WARNING, "%s; ignored", exc)
                if isinstance(rid, str):
                    listed.add(rid)  # a bad update must not leave the old version in force
                    self._remove(rid, "unreadable")
                continue
            if ev.program_id in programs:
                listed.add(ev.id)
                self._upsert(ev, started)
        for eid in [e for e, t in self.events.items() if e not in listed and t.touched < started]:
            self._remove(eid, "no longer listed")
        self._deleted = {k: v for k, v in self._deleted.items() if v >= started - 3600.0}
        self.m.events.set(len(self.events))
        self._changed.set()

    # -- events -----------------------------------------------------------------------------
    def _upsert(self, ev: Event, read_started: float) -> None:
        if self._deleted.get(ev.id, -math.inf) >= read_started:
            return  # deleted while this read was on its way
        old = self.events.get(ev.id)
        if old is not None and (ev.modified < old.event.modified or ev == old.event):
            return
        first_seen = old.first_seen if old is not None else time.time()
        placed, problems = spans(ev, first_seen, self._seed)
        for text in problems:
            self._say_once(
                f"{ev.id}:{ev.modified}:{text}",
                logging.WARNING,
                "event %s: %s",
                ev.label,
                text,
            )
        plans: list[ReportPlan] = []
        for i, d in enumerate(ev.report_descriptors):
            why = supported(d)
            if why is not None:
                self._say_once(f"{ev.id}:report:{i}", logging.INFO, "event %s: %s", ev.label, why)
                continue
            same = [p for p in (old.plans if old else []) if p.descriptor == d]
            plans.append(
                same[0].rebased(ev, placed)
                if same
                else ReportPlan(ev, d, placed, self.cfg.report_period_s)
            )
        self.events[ev.id] = Tracked(ev, first_seen, placed, plans)
        what = "updated" if old is not None else "received"
        first = min((s.start for s in placed), default=math.nan)
        log.info(
            "event %s %s (program %s, priority %s, %d intervals, first starts %s)",
            ev.label,
            what,
            ev.program_id,
            ev.priority,
            len(placed),
            "-" if math.isnan(first) else time.strftime("%H:%M:%S", time.gmtime(first)),
        )
        self._journal(f"event {ev.label} {what} (program {ev.program_id})")
        self.m.events.set(len(self.events))
        self._changed.set()

    def _remove(self, eid: str, why: str) -> None:
        t = self.events.pop(eid, None)
        if t is None:
            return
        self._collect(t, time.time())  # what was measured up to now is still reported
        log.info("event %s %s", t.event.label, why)
        self._journal(f"event {t.event.label} {why}")
        self.m.events.set(len(self.events))
        self._changed.set()

    # -- notifier ---------------------------------------------------------------------------
    async def _notifier_loop(self) -> None:
        if not self.cfg.notifier:
            return
        while not self._registered.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_S):
                    await self._registered.wait()
        failures = 0
        last: str | None = None
        while True:
            problem: str | None = None
            try:
                broker, topics = await self._discover()
                if broker is None:
                    self._say_once(
                        "no-mqtt",
                        logging.INFO,
                        "VTN offers no MQTT notifier: polling every %g s",
                        self.cfg.poll_s,
                    )
                    await asyncio.sleep(self.cfg.resync_s)
                    continue
                bearer = broker.method == "OAUTH2_BEARER_TOKEN"
                password = await self._vtn.token() if bearer else None
                await notifier.session(
                    broker,
                    topics,
                    password=password,
                    tls=notifier.tls_context(broker, self.cfg.mqtt_ca_file),
                    timeout_s=self.cfg.timeout_s,
                    on_connected=functools.partial(self._notifier_connected, broker, topics),
                    on_message=self.on_notification,
                )
            except (VtnError, notifier.NotifierError, aiomqtt.MqttError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
            finally:
                if self.notifier_up:
                    self.notifier_up = False
                    self.m.notifier.set(0)
                    self._resync.set()  # back to polling, from a fresh read
                    failures = 0  # the session held: start the backoff over
            failures += 1
            delay = self._backoff(failures)
            if problem != last:
                log.warning(
                    "notifier: %s; polling every %g s, MQTT again in %.1f s",
                    problem,
                    self.cfg.poll_s,
                    delay,
                )
            last = problem
            await asyncio.sleep(delay)

    async def _discover(self) -> tuple[notifier.Broker | None, list[str]]:
        got = await self._vtn.request("GET", "/notifiers", op="notifiers")
        broker = notifier.broker_of(got, self.cfg.client_id)
        if broker is None:
            return None, []
        assert self.ven_id is not None
        ven = quote(self.ven_id, safe="")
        topics: list[str] = []
        for what in ("events", "programs"):
            path = f"/notifiers/mqtt/topics/vens/{ven}/{what}"
            got = await self._vtn.request("GET", path, op=f"topics_{what}")
            topics += notifier.topic_names(got, path)
        return broker, topics

    def _notifier_connected(self, broker: notifier.Broker, topics: list[str]) -> None:
        self.notifier_up = True
        self.m.notifier.set(1)
        self._resync.set()  # the specification's recovery: GET after every (re)connect
        log.info("notifier connected to %s, topics %s", broker.uri, ", ".join(topics))

    def on_notification(self, payload: bytes, topic: str) -> None:
        """One MQTT notification: events taken as they are, programs by a re-read."""
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
            kind, op, obj = msg.get("objectType"), msg.get("operation"), msg.get("object")
            if not isinstance(kind, str) or not isinstance(op, str):
                raise ValueError("no objectType or operation")
            self.m.notifications.labels(kind, op).inc()
            if kind == "EVENT" and op in ("CREATE", "UPDATE"):
                ev = parse_event(obj)
                if ev.program_id in self.programs:
                    self._upsert(ev, time.monotonic())
                elif not self.cfg.programs or self._missing_programs:
                    self._resync.set()  # perhaps a program this VEN has not read yet
            elif kind == "EVENT" and op == "DELETE":
                eid = obj.get("id") if isinstance(obj, dict) else None
                if not isinstance(eid, str):
                    raise ValueError("DELETE without the event's id")
                self._deleted[eid] = time.monotonic()
                self._remove(eid, "deleted")
            elif kind == "PROGRAM":
                self._resync.set()
        except (ValueError, ObjectError) as exc:  # json.JSONDecodeError is a ValueError
            self.m.notifications.labels("invalid", "-").inc()
            self._say_once(
                f"notif:{exc}",
                logging.WARNING,
                "notification on %s ignored: %s",
                topic,
                exc,
            )

    # -- the rail ---------------------------------------------------------------------------
    async def _apply_loop(self) -> None:
        while True:
            self._changed.clear()
            now = time.time()
            d = self.evaluate(now)
            wait = min(max(d.next_change - now, 0.0) + 0.005, RECHECK_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()

    def evaluate(self, now: float) -> Decision:
        """Decide and hand the level to the rails if it changed."""
        d = decide(
            ((t.event, t.spans) for t in self.events.values()),
            self.programs,
            self.cfg.payloads,
            now,
        )
        for eid, text in d.problems:
            self._say_once(f"{eid}:{text}", logging.WARNING, "event %s: %s; ignored", eid, text)
        self.decision = d
        key = (d.level_w, d.reason)
        if key != self._applied:
            self._applied = key
            self.ctx.rails.set_ceiling("openadr", d.level_w, d.reason)
            self.m.level.set(math.nan if d.level_w is None else d.level_w)
            if d.level_w is None:
                log.info("no event in force")
                self._journal("no event in force")
            else:
                log.info("%s: level %.1f kW", d.reason, d.level_w / 1e3)
                self._journal(f"{d.reason}: level {d.level_w / 1e3:.1f} kW")
        return d

    # -- reports ----------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            if any(not p.done for t in self.events.values() for p in t.plans):
                tel = self.ctx.telemetry()
                w = tel.measured_w
                if w is not None and math.isfinite(w):
                    self.samples.add(tel.at, w)
            await asyncio.sleep(SAMPLE_S)

    async def _report_loop(self) -> None:
        failures = 0
        retry_at = 0.0
        while True:
            now = time.time()
            for t in list(self.events.values()):
                self._collect(t, now)
            if self.outbox and time.monotonic() >= retry_at:
                try:
                    await self._flush()
                    failures = 0
                except VtnError as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    retry_at = time.monotonic() + delay
                    log.warning("report not delivered: %s; again in %.1f s", exc, delay)
            await asyncio.sleep(SAMPLE_S)

    def _collect(self, t: Tracked, now: float) -> None:
        for plan in t.plans:
            for batch in plan.due(now):
                self._seq += 1
                body = report_body(
                    t.event,
                    plan.descriptor,
                    batch,
                    self.samples,
                    client_name=self.ven_name,
                    resource_name=self.cfg.resource_name,
                    seq=self._seq,
                )
                if body is None:
                    self.m.reports.labels("unmeasured").inc()
                    log.info(
                        "event %s: no measurement for its %s report over %d interval(s)",
                        t.event.label,
                        plan.descriptor.payload_type,
                        len(batch),
                    )
                    continue
                if len(self.outbox) == self.outbox.maxlen:
                    self.m.reports.labels("dropped").inc()
                self.outbox.append(body)

    async def _flush(self) -> None:
        while self.outbox:
            body = self.outbox[0]
            try:
                got = await self._vtn.request(
                    "POST", "/reports", op="report", body=body, expect=(200, 201)
                )
            except VtnError as exc:
                status = exc.status or 0
                if 400 <= status < 500 and status not in _RETRYABLE:
                    self.outbox.popleft()  # the VTN refuses this one: sending it again won't help
                    self.m.reports.labels("refused").inc()
                    log.error("report for event %s refused: %s", body["eventID"], exc)
                    continue
                raise
            self.outbox.popleft()
            self.reports_sent += 1
            self.m.reports.labels("sent").inc()
            rid = got.get("id") if isinstance(got, dict) else None
            values = [iv["payloads"][0]["values"][0] for iv in body["resources"][0]["intervals"]]
            d = body["payloadDescriptors"][0]
            text = (
                f"report {rid} for event {body['eventID']}: {d['payloadType']} "
                f"{', '.join(f'{v:g}' for v in values)} {d['units']}"
            )
            log.info("%s", text)
            self._journal(text)
