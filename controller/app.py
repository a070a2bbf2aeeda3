"""Composition root: builds fleet, drivers, control, MQTT and metrics, and runs them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import controller.protocols  # noqa: F401  (registers the built-in drivers)
from controller import heap
from controller.clock import ClockWatch
from controller.config import (
    ConfigError,
    JournalConfig,
    LoadedConfig,
    load_config,
    plaintext_problem,
    split_host_port,
)
from controller.control import Controller, FleetParams
from controller.cycle import ControlCycle, CycleOutput
from controller.governor import TICK_S as RAILS_TICK_S
from controller.governor import Governor
from controller.grid.frequency import FrequencyMonitor, Sample
from controller.grid.services import RESPONSE_AFTER_S, Deployment, GridServices
from controller.intake import (
    DispatchIntake,
    HeartbeatGate,
    TokenBucket,
    initial_target_w,
    resumable,
)
from controller.journal import (
    DEFAULT_FILENAME,
    Journal,
    TelemetrySample,
)
from controller.journal.recover import open_for_daemon
from controller.liveness import LivenessRecorder, start_w
from controller.liveness import restore as restore_liveness
from controller.market.rails import RailName
from controller.metrics import Metrics
from controller.mqtt_link import MqttLink
from controller.northbound import context as northbound
from controller.northbound.context import DeviceView, NorthboundContext
from controller.notify import Notifier
from controller.ramp_score import tolerance_w
from controller.ramp_watch import RampWatch
from controller.readiness import Readiness
from controller.row_ceilings import RowCeilings
from controller.status import SiteStatus
from controller.target import TargetTracker
from controller.telemetry import build_telemetry, ramp_limit_report
from controller.wire import Dispatch, Telemetry
from controller.wire.telemetry import ServiceReport
from drivers.base import Driver
from drivers.core import registry
from drivers.core.command import Commands, CommandShaper
from drivers.core.image import ProcessImage
from drivers.modbus.client import ModbusMeter

log = logging.getLogger("rampd")


RELOAD_TIMEOUT_S = 30.0
"""How long a reload waits for the old drivers to stop (log off, close sessions)."""
ADOPT_IDLE_S = 10.0
"""Without a dispatch for this long, learned device limits go into the control math."""


class NoMeter:
    """`[meter] protocol = "none"`: no site meter (a parent of zones, whose power is what its
    zones measure and report); the cycle runs on its device model, corrected by telemetry."""

    value_w = math.nan
    at = math.nan

    async def run(self) -> None:
        return None


def rampd_version() -> str:
    try:
        return version("rampd")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def open_journal(cfg: JournalConfig) -> Journal | None:
    """The configured journal, or $STATE_DIRECTORY/journal.sqlite under systemd, or None.

    A corrupt journal is moved aside and a fresh one begun; one that cannot be written opens
    anyway and counts the rows it drops (`controller.journal.recover`). Raises JournalError
    (a clear message) for a configuration problem only.
    """
    path = cfg.path
    if path is None:
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not state:
            log.warning("no journal: set [journal] path, or run under systemd (StateDirectory=)")
            return None
        path = Path(state) / DEFAULT_FILENAME
    return open_for_daemon(
        path,
        time.time(),
        retention_days=cfg.retention_days,
        telemetry_retention_days=cfg.telemetry_retention_days,
    )


@dataclass(slots=True)
class _Fleet:
    """A reloaded site file's devices, ready to take over from the running ones."""

    cfg: LoadedConfig
    image: ProcessImage
    drivers: list[Driver]
    shaper: CommandShaper
    in_control: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Overrides:
    mqtt: str | None = None
    metrics_listen: str | None = None


class Daemon:
    def __init__(
        self, cfg: LoadedConfig, overrides: Overrides | None = None, *, settle_heap: bool = False
    ) -> None:
        """`settle_heap`: the daemon owns its process; freeze what lives long out of garbage
        collection once ready (`controller.heap`)."""
        self.cfg = cfg
        site = cfg.site
        ov = overrides or Overrides()
        mqtt_cfg = site.mqtt
        if ov.mqtt:
            host, port = split_host_port(ov.mqtt, default_port=1883)
            try:
                plaintext_problem(host, mqtt_cfg.tls is not None, mqtt_cfg.allow_plaintext)
            except ValueError as exc:
                raise ConfigError(f"--mqtt {ov.mqtt}: {exc}") from None
            mqtt_cfg = mqtt_cfg.model_copy(update={"host": host, "port": port})
        self.metrics_listen = ov.metrics_listen or site.metrics.listen

        self.image = ProcessImage(cfg.devices)
        self.metrics = Metrics(rampd_version())
        self._driver_ctx = registry.DriverContext(
            on_command=self.metrics.observe_command,
            poll_stretch=cfg.poll_stretch,
            settings={"mqtt": mqtt_cfg},
        )
        self.drivers = self._build_drivers(cfg, self.image)
        self._swap = asyncio.Event()
        self._next_fleet: _Fleet | None = None
        self._reload_lock = asyncio.Lock()
        if cfg.poll_stretch > 1.0:
            log.warning(
                "%d devices would poll over site.max_polls_per_s (%g/s): every poll period "
                "stretched %.2fx",
                sum(s.protocol != "zone" for s in cfg.devices),
                site.site.max_polls_per_s,
                cfg.poll_stretch,
            )
        self.meter = ModbusMeter(site.meter) if site.meter.protocol == "modbus" else NoMeter()
        self.services = self._new_services(self.image)
        has_frequency = site.grid.source is not None or site.meter.protocol == "modbus"
        self.frequency = (
            FrequencyMonitor(site.grid, site.meter, self._on_frequency) if has_frequency else None
        )
        self.metrics.watch_drivers(self._watched())
        if site.metrics.per_device:
            self.metrics.enable_device_metrics(self.image, lambda: self.cycle.planned_w)
        self.controller = self._new_controller()
        self._limits_version = self.image.limits_version
        self._dispatched_at = -math.inf  # monotonic time of the last accepted dispatch
        self.shaper = CommandShaper(self.image.p_idle_w, self.image.deadband_w)
        self.journal = open_journal(site.journal)
        if self.journal is not None:
            self.metrics.watch_journal(self.journal)
            self.journal.record_event(
                "start", f"rampd {rampd_version()}: site {site.site_id}, {self.image.n} devices"
            )
        now_unix = time.time()
        resume = resumable(self.journal, site.site, cfg.dispatch_key, now_unix)
        initial_w = initial_target_w(self.journal, resume, site.site.max_kw * 1e3, now_unix)
        # The failsafe's state from before a restart (`controller.liveness`).
        alive = None if self.journal is None else self.journal.liveness()
        initial_w = start_w(
            self.journal, alive, site.failsafe, now_unix, resumed=bool(resume), default_w=initial_w
        )
        self.tracker = TargetTracker(
            site.site, site.failsafe, initial_w=initial_w, ramp_limits=site.ramp_limits
        )
        self.governor = Governor(cfg, self.tracker, self.metrics, self.journal)
        self.ramps = (
            None
            if self.journal is None
            else RampWatch(
                self.journal,
                self.tracker,
                site_max_w=site.site.max_kw * 1e3,
                physical_min_s=self._physical_min_s,
                mono=time.monotonic,
            )
        )
        self.liveness = (
            None if self.journal is None else LivenessRecorder(self.journal, self.tracker)
        )
        self.clock = ClockWatch(on_step=self._clock_stepped)
        self.ceilings = RowCeilings()  # caps on single rows: a DSX Flex zone feed's target
        self.cycle = ControlCycle(
            image=self.image,
            controller=self.controller,
            shaper=self.shaper,
            drivers=self.drivers,
            meter=self.meter,
            tracker=self.tracker,
            metrics=self.metrics,
            period_s=site.cycle_s,
            telemetry_max_age_s=site.site.telemetry_max_age_s,
            meter_max_age_s=site.control.meter_max_age_s,
            has_meter=not isinstance(self.meter, NoMeter),
            services=self.services,
            ceilings=self.ceilings,
        )
        self.intake = DispatchIntake(
            tracker=self.tracker,
            limits=site.site,
            hmac_key=cfg.dispatch_key,
            journal=self.journal,
            metrics=self.metrics,
            publish_ack=lambda body: self.link.publish("ack", body),
            on_accepted=self._accepted,
            bucket=TokenBucket(site.dispatch.max_per_s, site.dispatch.burst),
        )
        self.heartbeats = HeartbeatGate(cfg.dispatch_key, site.site, self.metrics)
        self.link = MqttLink(
            mqtt_cfg,
            cfg.topic_root,
            on_dispatch=self.on_dispatch,
            on_heartbeat=self.on_heartbeat,
            inputs=self.governor.inputs(),
            admit_dispatch=self.intake.admit,
        )
        self.notifier = Notifier()
        self.readiness = Readiness(self.notifier, settle_heap=settle_heap)
        self.status = SiteStatus(
            tracker=self.tracker,
            cycle=self.cycle,
            link=self.link,
            metrics=self.metrics,
            notifier=self.notifier,
            journal=self.journal,
            failsafe_policy=site.failsafe.policy,
            has_meter=not isinstance(self.meter, NoMeter),
        )
        self.northbound = northbound.build(
            NorthboundContext(
                cfg=cfg,
                rails=self.governor.rails,
                telemetry=self.telemetry,
                journal=self.journal,
                metrics=self.metrics,
                ceilings=self.ceilings,
                device=self.device_view,
            )
        )
        self.cycle.on_tick(self._after_tick)
        self.intake.resume(resume, now_unix)
        if self.journal is not None and alive is not None:
            restore_liveness(self.tracker, self.journal, alive, time.monotonic(), now_unix)
            self.metrics.dispatcher_last_seen.set(alive.last_heard)
        self.governor.resume(site.site, cfg.dispatch_key, now_unix)

    # -- grid services ---------------------------------------------------------------------
    def _new_services(self, image: ProcessImage, old: GridServices | None = None) -> GridServices:
        """The grid services over `image`; the armed amounts of `old` (a reload) carry over,
        its deployments end."""
        site = self.cfg.site
        services = GridServices(
            site.services,
            site.ramp_limits,
            nominal_hz=float(site.grid.nominal_hz),
            site_max_w=site.site.max_kw * 1e3,
            image=image,
            submit=self._submit_now,
            meter_w=lambda: self.meter.value_w,
            on_end=self._deployment_ended,
        )
        if old is not None:
            old.recall()
            for name, svc in old.services.items():
                services.set_armed(name, svc.armed_w)
        return services

    def _watched(self) -> list[object]:
        extra = [] if self.frequency is None else [self.frequency]
        return [*self.drivers, self.meter, *extra]

    def _on_frequency(self, sample: Sample) -> None:
        """Every frequency sample, at once: the services act on the event path."""
        self.services.on_sample(sample)

    def _submit_now(self, cmds: Commands) -> None:
        """Commands of the grid services, to the drivers at once (not at the next cycle)."""
        for owner, commands in self.image.route(cmds):
            self.drivers[owner].submit(commands)
        self.cycle.poke()

    def _deployment_ended(self, d: Deployment) -> None:
        after = tuple(d.response_w.get(s) for s in RESPONSE_AFTER_S)
        duration = None if d.ended_at is None else d.ended_at - d.at
        if self.journal is not None:
            self.journal.record_deployment(
                d.service, d.unix, d.hz, d.armed_w, int(d.rows.size), d.expected_w,
                d.before_w, (after[0], after[1], after[2]), d.end_w, duration, d.ended_by,
            )  # fmt: skip
            self.journal.record_event(
                "deployment",
                f"{d.service.upper()} at {d.hz:.3f} Hz: {d.rows.size} devices, "
                f"{d.expected_w / 1e3:.1f} kW shed of {d.armed_w / 1e3:.1f} kW armed, "
                f"ended by {d.ended_by} after {duration or 0.0:.1f} s",
                at=d.unix,
            )

    def _build_drivers(self, cfg: LoadedConfig, image: ProcessImage) -> list[Driver]:
        ctx = replace(self._driver_ctx, poll_stretch=cfg.poll_stretch)
        try:
            return registry.build(image, ctx)
        except registry.UnknownProtocol as exc:
            raise ConfigError(f"{cfg.path}: {exc}") from None

    def _new_controller(self) -> Controller:
        site = self.cfg.site
        return Controller(
            FleetParams.from_image(self.image),
            deadband_w=site.site.deadband_kw * 1e3,
            observer_tau_s=site.control.observer_tau_s,
            cycle_s=site.cycle_s,
            meter_lag_s=site.control.meter_lag_s,
            reserve_up_w=site.reserve.up_kw_5s * 1e3,
            reserve_down_w=site.reserve.down_kw_5s * 1e3,
        )

    def _adopt_dynamics(self) -> None:
        """Bounds and ramp rates a driver learned at run time (a zone's capability) go into
        the control math at a new dispatch (the site starts a move from where it is, so a
        model restarted from the measurements loses nothing), or once the site has been left
        alone for ADOPT_IDLE_S (at start, and in a long hold)."""
        if self.image.limits_version == self._limits_version:
            return
        self._limits_version = self.image.limits_version
        self.controller = self.cycle.controller = self._new_controller()
        log.info("control model rebuilt with the devices' latest limits and ramp rates")

    # -- dispatch in ---------------------------------------------------------------------
    def on_dispatch(self, payload: bytes) -> None:
        """A dispatch the rate limit admitted as it was read (`intake.admit`)."""
        self.intake.decide(payload)
        self.status.update()

    def _accepted(self, d: Dispatch, now_unix: float) -> None:
        for name, armed_w in (d.armed_w or {}).items():
            self.services.set_armed(name, armed_w)
        if d.mode == "recall":
            self.services.recall()
        if d.mode == "commitment":
            self.governor.add_commitment(d)
        self._adopt_dynamics()
        self._dispatched_at = time.monotonic()
        self.cycle.poke()
        if self.ramps is not None:
            last = self.cycle.last
            self.ramps.check(
                now_unix, last.meter_w if last is not None and last.meter_fresh else None
            )

    def on_heartbeat(self, payload: bytes) -> None:
        if not self.heartbeats.accept(payload):  # unsigned, forged or replayed (dispatch.keys)
            return
        self.tracker.heartbeat(time.monotonic())
        self.metrics.heartbeat_seen()

    # -- out -------------------------------------------------------------------------------
    def _clock_stepped(self, step_s: float, now_unix: float) -> None:
        self.metrics.clock_stepped(step_s)
        if self.journal is not None:
            self.journal.record_event("clock", f"wall clock stepped {step_s:+.3f} s", at=now_unix)

    def _after_tick(self, out: CycleOutput) -> None:
        self.notifier.kick(out.t)
        self.clock.check()
        if self.liveness is not None:
            self.liveness.tick(out.t, time.time())
        if out.t - self._dispatched_at >= ADOPT_IDLE_S:
            self._adopt_dynamics()
        meter_ok = out.meter_fresh or isinstance(self.meter, NoMeter)
        self.readiness.check(
            all_seen=self.cycle.all_seen, meter_ok=meter_ok, status=self.status.text
        )
        self.status.update()
        if self.ramps is not None:
            self.ramps.tick(time.time(), out.meter_w if out.meter_fresh else None)

    def telemetry(self) -> Telemetry:
        """The telemetry message for now (no side effects)."""
        out = self.cycle.last
        at = time.time()
        return build_telemetry(
            out,
            at=at,
            mode=self.tracker.mode,
            devices=self.cycle.counts_by_state(),
            cycles=self.cycle.cycles,
            overruns=self.cycle.overruns,
            reserve=self.cfg.site.reserve,
            physical_min_s=None if out is None else self._physical_min_s(out.target_w),
            ramp_limit=ramp_limit_report(self.tracker, time.monotonic(), at),
            hz=self._fresh_hz(),
            services=self._service_reports(at),
            rails=self.governor.report(at),
        )

    def device_view(self, name: str) -> DeviceView | None:
        """A device as the daemon sees it now (the current image, after any reload)."""
        max_age_s = self.cfg.site.site.telemetry_max_age_s
        now = time.monotonic()
        return DeviceView.of(self.image, self.cycle.planned_w, name, now, max_age_s)

    def _fresh_hz(self) -> float | None:
        f = self.frequency
        return None if f is None or not f.fresh(time.monotonic()) else round(f.hz, 4)

    def _service_reports(self, now_unix: float) -> dict[str, ServiceReport]:
        armable = self.services.armable_w()
        return {
            name: ServiceReport(
                armed_w=svc.armed_w,
                max_armable_w=armable[name],
                deployed=svc.deployment is not None,
                since=None if svc.deployment is None else svc.deployment.unix,
            )
            for name, svc in self.services.services.items()
        }

    def update_telemetry_metrics(self, tel: Telemetry) -> None:
        """The gauges that mirror what telemetry reports, at the same pace."""
        self.metrics.set_device_counts(tel.devices.to_wire())
        self.metrics.mqtt_connected.set(1 if self.link.connected else 0)
        cap = tel.capability  # as telemetry reports it: within the ramp limits
        if cap is not None:
            up = [math.nan if w is None else w for w in cap.up_w]
            down = [math.nan if w is None else w for w in cap.down_w]
            self.metrics.set_capability(cap.horizons_s, up, down)
        svc = self.services.services
        self.metrics.set_services(
            self.services.hz,
            0 if self.frequency is None else self.frequency.implausible,
            {n: s.armed_w for n, s in svc.items()},
            self.services.armable_w(),
            {n: s.deployment is not None for n, s in svc.items()},
            {n: s.deployments for n, s in svc.items()},
        )

    def _physical_min_s(self, target_w: float) -> float | None:
        """The fleet's physical minimum time to ``target_w`` (within the ramp tolerance);
        None when out of reach."""
        tol_w = tolerance_w(target_w, self.cfg.site.site.max_kw * 1e3)
        t = self.controller.physical_min_s(target_w, tol_w)
        t = max(t, self.tracker.limited_min_s(target_w))  # no faster than the ramp limits
        return round(t, 3) if math.isfinite(t) else None

    def _upper_rail(self) -> tuple[RailName, str] | None:
        """The rail above the lower ones in force now (failsafe, frequency, dispatch)."""
        t = self.tracker
        if self._failsafe_governs():
            return "failsafe", t.failsafe_reason
        deployed = [n.upper() for n, s in self.services.services.items() if s.deployment]
        if deployed:
            return "frequency", f"{' and '.join(deployed)} deployed"
        d = t.active
        if d is not None:
            return "dispatch", f"{d.mode} {d.id} (seq {d.seq})"
        return None

    def _failsafe_governs(self) -> bool:
        """In failsafe under a policy that moves the site (`hold` leaves the rails below)."""
        return self.tracker.mode == "failsafe" and self.cfg.site.failsafe.policy != "hold"

    def _upper_wishes(self) -> dict[RailName, float | None]:
        """The level each rail above the lower ones asks now (None: not active): where the
        failsafe or the grid dispatch takes the site, and that plus the frequency offset."""
        t = self.tracker
        failsafe = self._failsafe_governs()
        deployed = any(s.deployment for s in self.services.services.values())
        return {
            "failsafe": t.ramp_end_w if failsafe else None,
            "frequency": t.ramp_end_w + t.exempt_offset_w if deployed else None,
            "dispatch": t.ramp_end_w if t.active is not None and not failsafe else None,
        }

    async def _rails_loop(self) -> None:
        while True:
            await asyncio.sleep(RAILS_TICK_S)
            out = self.cycle.last
            if out is None:
                continue
            self.governor.tick(
                time.time(),
                time.monotonic(),
                upper=self._upper_rail(),
                site_w=out.meter_w if out.meter_fresh else None,
                target_w=out.target_w,
                full_w=out.capability.max_w,
                upper_wishes=self._upper_wishes(),
            )

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            tel = self.telemetry()
            self.update_telemetry_metrics(tel)
            self.link.publish("telemetry", tel.encode(), qos=0)
            if self.journal is not None:
                self.journal.record_telemetry(TelemetrySample.from_telemetry(tel))

    # -- the fleet: reload ------------------------------------------------------------------
    async def _run_drivers(self) -> None:
        """The drivers' tasks; a reload stops them, swaps the fleet in, starts the new set."""
        while True:
            self._swap.clear()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(d.run(), name=f"driver:{d.name}") for d in self.drivers]
                await self._swap.wait()
                for task in tasks:
                    task.cancel()  # each driver logs off and closes its sessions
            self._swap_fleet()

    async def reload(self, timeout_s: float = RELOAD_TIMEOUT_S) -> bool:
        """Read the site file again and control its devices from now on, without stopping
        control: devices kept (same name, same settings) keep what is known of them, added
        ones are adopted at their first answer, removed ones are let go (their power becomes
        part of the site's non-flexible load). Settings outside `[[devices]]` need a restart:
        a warning names them. A bad file changes nothing (an error names file, key and
        problem). Returns whether the new fleet is in control."""
        async with self._reload_lock:
            try:
                new = load_config(self.cfg.path)
                image = ProcessImage(new.devices)
                kept = image.carry_over(self.image)
                drivers = self._build_drivers(new, image)
            except ConfigError as exc:
                log.error("reload refused, running configuration kept: %s", exc)
                self.metrics.config_reloads.labels(result="rejected").inc()
                return False
            stale = [
                name
                for name in type(new.site).model_fields
                if name != "devices" and getattr(new.site, name) != getattr(self.cfg.site, name)
            ]
            if stale:
                log.warning("reload: %s changed: takes a restart to apply", ", ".join(stale))
            shaper = CommandShaper(image.p_idle_w, image.deadband_w)
            new_rows, old_rows = image.same_devices(self.image)
            shaper.carry_over(self.shaper, new_rows, old_rows)
            cfg = replace(
                self.cfg,
                devices=new.devices,
                templates=new.templates,
                site=self.cfg.site.model_copy(update={"devices": new.site.devices}),
            )
            removed = self.image.n - len(kept)
            fleet = self._next_fleet = _Fleet(cfg, image, drivers, shaper)
            self._swap.set()
            try:
                async with asyncio.timeout(timeout_s):
                    await fleet.in_control.wait()
            except TimeoutError:
                # Still swapped in once the old drivers have stopped.
                log.error("reload: the old drivers did not stop within %g s", timeout_s)
                return False
            log.info(
                "reload: %d devices (%d kept, %d added, %d removed)",
                image.n,
                len(kept),
                image.n - len(kept),
                removed,
            )
            self.metrics.config_reloads.labels(result="applied").inc()
            return True

    def _swap_fleet(self) -> None:
        """Put the prepared fleet in control (synchronously: one tick sees old or new)."""
        fleet, self._next_fleet = self._next_fleet, None
        if fleet is None:
            return
        self.cfg, self.image, self.drivers, self.shaper = (
            fleet.cfg,
            fleet.image,
            fleet.drivers,
            fleet.shaper,
        )
        self.controller = self._new_controller()
        self._limits_version = self.image.limits_version
        self.services = self._new_services(self.image, self.services)
        self.cycle.rebind(
            image=self.image, controller=self.controller, shaper=self.shaper, drivers=self.drivers
        )
        self.cycle.services = self.services
        self.metrics.watch_drivers(self._watched())
        if self.cfg.site.metrics.per_device:
            self.metrics.enable_device_metrics(self.image, lambda: self.cycle.planned_w)
        fleet.in_control.set()

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        logging.getLogger("rampd").addHandler(self.status.last_error)
        host, port = split_host_port(self.metrics_listen, default_port=9470)
        bound = self.metrics.serve(host, port)
        log.info(
            "rampd %s: site %s, %d devices, cycle %.0f ms, metrics on %s:%d, broker %s:%d",
            rampd_version(),
            self.cfg.site.site_id,
            self.image.n,
            self.cfg.site.cycle_s * 1e3,
            host,
            bound,
            self.link.host,
            self.link.port,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._run_drivers(), name="drivers")
                tg.create_task(self.meter.run(), name="meter")
                if self.frequency is not None:
                    tg.create_task(self.frequency.run(), name="frequency")
                tg.create_task(self.link.run(), name="mqtt")
                tg.create_task(self.cycle.run(), name="cycle")
                tg.create_task(self._telemetry_loop(), name="telemetry")
                tg.create_task(self._rails_loop(), name="rails")
                tg.create_task(self.intake.run(), name="intake")
                tg.create_task(self.governor.run_sources(), name="prices")
                for nb in self.northbound:
                    tg.create_task(nb.run(), name=nb.name)
        finally:
            self.metrics.close()
            logging.getLogger("rampd").removeHandler(self.status.last_error)
            if self.ramps is not None:
                self.ramps.stop(time.time())
            self.governor.finish(time.time())
            if self.liveness is not None:
                self.liveness.flush(time.monotonic(), time.time())
            self.intake.flush(final=True)
            if self.journal is not None:
                self.journal.record_event("stop", "stopped; devices keep their last setpoints")
                self.journal.close(timeout_s=5.0)  # at most 5 s, at shutdown only


async def run_daemon(cfg: LoadedConfig, overrides: Overrides | None = None) -> None:
    """Run until SIGTERM/SIGINT; devices keep their last setpoints, status goes offline."""
    heap.tune()
    daemon = Daemon(cfg, overrides, settle_heap=True)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def stop(signame: str) -> None:
        log.info("%s: stopping; devices keep their last setpoints", signame)
        daemon.notifier.stopping()
        main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        log.info("SIGHUP: reloading %s", cfg.path)
        task = loop.create_task(daemon.reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await daemon.run()
    finally:
        daemon.notifier.close()
    log.info("stopped")
