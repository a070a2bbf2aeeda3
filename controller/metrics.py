"""Prometheus metrics: base units (watts, seconds, joules), bounded label sets.

Naming follows https://prometheus.io/docs/practices/naming/: a `rampd_` prefix, the base unit
as a suffix, `_total` on counters, `_timestamp_seconds` for Unix times, a `rampd_build_info`.
Every label has a small fixed value set (state, direction, horizon, driver, result, reason,
mode, op). Per-device series exist only behind an opt-in (`enable_device_metrics`), for small
sites: a site with thousands of miners must not put thousands of series per metric in a TSDB.

The control cycle updates the gauges from the event loop; prometheus-client serves them from
its own thread. Driver counters and per-device values are read at scrape time by collectors,
so neither drivers nor the cycle pay anything per device for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, get_args, runtime_checkable
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from controller.target import TrackerMode
from drivers.core.image import ProcessImage
from drivers.core.state import F64, STATE_NAMES

if TYPE_CHECKING:
    from controller.journal import Journal

# Cycle work is sub-millisecond to tens of ms; command round trips 1 ms to the 1 s timeout.
_CYCLE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_COMMAND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

MODES: tuple[str, ...] = get_args(TrackerMode)
"""Values of the `mode` label of `rampd_mode` (the target tracker's modes)."""


@runtime_checkable
class DriverCounters(Protocol):
    """The public counters of a per-device protocol driver (`PerDeviceDriver`)."""

    name: str
    polls_ok: int
    poll_errors: int
    command_errors: int
    resends: int


@runtime_checkable
class MeterCounters(Protocol):
    """The public counters of the site meter reader (`ModbusMeter`)."""

    name: str
    reads: int
    errors: int


class DriverCollector:
    """Per-driver poll/error/resend counters, read from the drivers' own counters at scrape
    time (drivers count anyway; nothing is added to their hot paths). Label `driver` is the
    driver's name (its protocol) or the meter's name: a handful of values per site."""

    def __init__(self, drivers: Iterable[object]) -> None:
        items = list(drivers)
        self._drivers = [d for d in items if isinstance(d, DriverCounters)]
        self._meters = [d for d in items if isinstance(d, MeterCounters)]

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "rampd_device_polls_total",
                "Telemetry reads of devices (and of the site meter), failed ones included",
                labels=["driver"],
            ),
            CounterMetricFamily(
                "rampd_device_errors_total",
                "Failed device operations (poll: telemetry read, command: setpoint write, "
                "unverified: a command acknowledged and not followed)",
                labels=["driver", "op"],
            ),
            CounterMetricFamily(
                "rampd_device_resends_total",
                "Setpoints sent again because a device lost them (reboot, another manager)",
                labels=["driver"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        polls, errors, resends = self._families()
        for d in self._drivers:
            polls.add_metric([d.name], d.polls_ok + d.poll_errors)
            errors.add_metric([d.name, "poll"], d.poll_errors)
            errors.add_metric([d.name, "command"], d.command_errors)
            errors.add_metric([d.name, "unverified"], getattr(d, "unverified", 0))
            resends.add_metric([d.name], d.resends)
        for m in self._meters:
            polls.add_metric([m.name], m.reads + m.errors)
            errors.add_metric([m.name, "poll"], m.errors)
        return (polls, errors, resends)


class DeviceCollector:
    """Opt-in per-device series for small sites: rampd_device_power_watts{device,kind} (last
    measured power; devices never read are left out) and rampd_device_setpoint_watts{device,
    kind} (the cycle's latest decision), straight from the process image and the cycle's last
    plan at scrape time.

    One series per device per metric: do not enable on sites with thousands of devices."""

    def __init__(self, image: ProcessImage, planned_w: Callable[[], F64]) -> None:
        self._image = image
        self._planned_w = planned_w
        self._labels = [
            [name, image.kinds[int(k)]] for name, k in zip(image.names, image.kind_id, strict=True)
        ]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "rampd_device_power_watts",
                "Last measured power of each device (opt-in per-device metrics)",
                labels=["device", "kind"],
            ),
            GaugeMetricFamily(
                "rampd_device_setpoint_watts",
                "Latest setpoint the control cycle decided for each device (opt-in)",
                labels=["device", "kind"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        power, setpoint = self._families()
        image = self._image
        # Copies: the event loop writes these arrays while this runs on the server thread.
        measured = image.measured_w.copy()
        seen = np.isfinite(image.measured_at)
        sp = self._planned_w().copy()
        for i, labels in enumerate(self._labels):
            if seen[i]:
                power.add_metric(labels, float(measured[i]))
            setpoint.add_metric(labels, float(sp[i]))
        return (power, setpoint)


class LoopCollector:
    """rampd_asyncio_tasks: live tasks of the daemon's event loop, counted at scrape time.

    A daemon that runs for months must not leak tasks (a soak watches this gauge). Counted
    from the scrape thread: `asyncio.all_tasks` copies the loop's task set, retrying if the
    loop changes it meanwhile; once per scrape, so the cycle pays nothing."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "rampd_asyncio_tasks", "Live (not yet done) asyncio tasks of the daemon's event loop"
        )

    def describe(self) -> Iterable[Metric]:
        return (self._family(),)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            family.add_metric([], len(asyncio.all_tasks(loop)))
        return (family,)


class JournalCollector:
    """The journal's counters and health, read from its own counters at scrape time (the
    writer thread counts anyway; nothing is added to recording)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    @staticmethod
    def _families() -> tuple[CounterMetricFamily | GaugeMetricFamily, ...]:
        return (
            CounterMetricFamily("rampd_journal_rows_written", "Journal rows committed since start"),
            CounterMetricFamily(
                "rampd_journal_rows_dropped",
                "Journal rows lost: the disk full, read-only or failing, the writer behind, "
                "a row the database refused",
            ),
            CounterMetricFamily(
                "rampd_journal_write_errors", "Journal write transactions that failed"
            ),
            GaugeMetricFamily(
                "rampd_journal_healthy",
                "1 while journal rows are written, 0 while they are dropped (the reason is in "
                "the log and the status detail)",
            ),
            CounterMetricFamily(
                "rampd_journal_moved_aside",
                "Corrupt journals moved aside at start (a fresh one was begun)",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        j = self._journal
        s = j.stats
        moved = int(j.moved_aside is not None)
        families = self._families()
        values = (s.written, s.dropped, s.write_errors, int(s.healthy), moved)
        for family, value in zip(families, values, strict=True):
            family.add_metric([], value)
        return families


class Metrics:
    def __init__(self, version: str) -> None:
        # `_created` series double every counter and histogram in the TSDB for nothing
        # Prometheus 2.x uses; off for the whole process (a daemon owns its process).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, fds, start time) and python_info: a daemon runs for months.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build = Info("rampd_build", "rampd build information", registry=r)
        self.build.info({"version": version})
        self.site_power = Gauge(
            "rampd_site_power_watts",
            "Site power measured at the meter (an estimate from device telemetry while the "
            "meter is stale)",
            registry=r,
        )
        self.site_target = Gauge(
            "rampd_site_target_watts", "Site power target in force", registry=r
        )
        self.site_energy = Counter(
            "rampd_site_energy_joules_total",
            "Site energy consumed, integrated from rampd_site_power_watts every cycle",
            registry=r,
        )
        self.meter_fresh = Gauge(
            "rampd_site_meter_fresh",
            "1 while the site meter's reading is fresh, 0 while site power is estimated",
            registry=r,
        )
        self.noncontrollable = Gauge(
            "rampd_noncontrollable_power_watts",
            "Estimated non-flexible load behind the meter (cooling, auxiliaries)",
            registry=r,
        )
        self.capability = Gauge(
            "rampd_capability_watts",
            "Power the fleet can add (up) or shed (down) within the horizon",
            ["direction", "horizon"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "rampd_cycle_duration_seconds",
            "Work time of one control cycle",
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.cycle_lateness = Histogram(
            "rampd_cycle_lateness_seconds",
            "How late each scheduled control cycle started: the event loop busy elsewhere "
            "(a dispatch flood, a burst of device I/O)",
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.cycle_overruns = Counter(
            "rampd_cycle_overruns_total", "Cycles that missed their deadline", registry=r
        )
        self.command_duration = Histogram(
            "rampd_command_duration_seconds",
            "Round-trip time of device commands",
            ["driver", "result"],
            buckets=_COMMAND_BUCKETS,
            registry=r,
        )
        self.devices = Gauge("rampd_devices", "Devices by state", ["state"], registry=r)
        self.config_reloads = Counter(
            "rampd_config_reloads",
            "Site file reloads (SIGHUP) by result: applied, or rejected (a bad file)",
            ["result"],
            registry=r,
        )
        self.dispatches = Counter(
            "rampd_dispatches_total",
            "Dispatches received, by decision and rejection reason",
            ["result", "reason"],
            registry=r,
        )
        self.heartbeats_rejected = Counter(
            "rampd_heartbeats_rejected_total",
            "Heartbeats ignored: not a JWS from a configured dispatch key, stale or replayed",
            registry=r,
        )
        self.last_dispatch = Gauge(
            "rampd_last_dispatch_timestamp_seconds",
            "Unix time of the last accepted dispatch (0: none since start)",
            registry=r,
        )
        self.dispatcher_last_seen = Gauge(
            "rampd_dispatcher_last_seen_timestamp_seconds",
            "Unix time of the last sign of life from the dispatcher (accepted dispatch or "
            "heartbeat), or of the daemon's start: the failsafe's silence timer",
            registry=r,
        )
        self.dispatcher_last_seen.set(time.time())
        self.mode = Gauge(
            "rampd_mode",
            "1 for the target tracker's current mode, 0 for the others",
            ["mode"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "rampd_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.grid_frequency = Gauge(
            "rampd_grid_frequency_hz", "Grid frequency, the latest plausible reading", registry=r
        )
        self.frequency_implausible = Gauge(
            "rampd_grid_frequency_implausible",
            "Implausible frequency readings so far (ignored: they never trigger)",
            registry=r,
        )
        self.service_armed = Gauge(
            "rampd_service_armed_watts",
            "Load armed for a frequency service",
            ["service"],
            registry=r,
        )
        self.service_armable = Gauge(
            "rampd_service_armable_watts",
            "Load that could shed within the service's deadline now",
            ["service"],
            registry=r,
        )
        self.service_deployed = Gauge(
            "rampd_service_deployed", "1 while the service is deployed", ["service"], registry=r
        )
        self.service_deployments = Gauge(
            "rampd_service_deployments", "Deployments since start", ["service"], registry=r
        )
        self.rail_governing = Gauge(
            "rampd_rail_governing",
            "1 for the rail that governs the site's target (precedence in DESIGN.md)",
            ["rail"],
            registry=r,
        )
        self.rail_wish = Gauge(
            "rampd_rail_wish_watts",
            "What each lower rail asks of the site (NaN: not active)",
            ["rail"],
            registry=r,
        )
        self.price = Gauge(
            "rampd_price_usd_per_mwh", "The power price in force (NaN: none fresh)", registry=r
        )
        self.class_curtailed = Gauge(
            "rampd_class_curtailed_ratio",
            "Share of a device class the price rule curtails",
            ["device_class"],
            registry=r,
        )
        self.curtailments = Counter(
            "rampd_curtailment_events",
            "Curtailment events measured (M&V), by the rail that governed",
            ["rail"],
            registry=r,
        )
        self.inputs_rejected = Counter(
            "rampd_inputs_rejected",
            "Price, peak and economics messages rejected (bad or stale)",
            ["input"],
            registry=r,
        )
        self.clock_steps = Counter(
            "rampd_clock_steps",
            "Wall-clock steps noticed (over 1 s off the monotonic clock within a second): "
            "NTP or manual steps, a resume from suspend",
            registry=r,
        )
        self.clock_last_step = Gauge(
            "rampd_clock_last_step_seconds",
            "The latest wall-clock step (positive: ahead); 0: none since start",
            registry=r,
        )
        for name in STATE_NAMES:
            self.devices.labels(state=name)
        self.dispatches.labels(result="accepted", reason="")  # exists before the first one
        for mode in MODES:
            self.mode.labels(mode=mode)
        self._loop_collector = LoopCollector()
        r.register(self._loop_collector)
        self._driver_collector: DriverCollector | None = None
        self._device_collector: DeviceCollector | None = None
        self._journal_collector: JournalCollector | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- updates from the cycle and the daemon ----------------------------------------------

    def add_energy(self, watts: float, seconds: float) -> None:
        """Add `watts` held for `seconds` to the energy counter. A counter only grows: NaN,
        negative power (export) and non-positive intervals add nothing."""
        if math.isfinite(watts) and watts > 0.0 and math.isfinite(seconds) and seconds > 0.0:
            self.site_energy.inc(watts * seconds)

    def set_site_power(self, watts: float, seconds: float, *, meter_fresh: bool) -> None:
        """The cycle's site power (meter, or estimate while the meter is stale), and the
        energy of the `seconds` since the previous cycle at that power."""
        self.site_power.set(watts)
        self.meter_fresh.set(1 if meter_fresh else 0)
        self.add_energy(watts, seconds)

    def set_device_counts(self, counts: dict[str, int]) -> None:
        for name in STATE_NAMES:
            self.devices.labels(state=name).set(counts.get(name, 0))

    def set_services(
        self,
        hz: float,
        implausible: int,
        armed_w: dict[str, float],
        armable_w: dict[str, float],
        deployed: dict[str, bool],
        deployments: dict[str, int],
    ) -> None:
        self.grid_frequency.set(hz)
        self.frequency_implausible.set(implausible)
        for name, w in armed_w.items():
            self.service_armed.labels(service=name).set(w)
            self.service_armable.labels(service=name).set(armable_w[name])
            self.service_deployed.labels(service=name).set(1 if deployed[name] else 0)
            self.service_deployments.labels(service=name).set(deployments[name])

    def set_rails(
        self,
        governing: str,
        rails: Iterable[str],
        wishes_w: dict[str, float | None],
        price: float | None,
        curtailed: dict[str, float],
    ) -> None:
        for rail in rails:
            self.rail_governing.labels(rail=rail).set(1 if rail == governing else 0)
        for rail, w in wishes_w.items():
            self.rail_wish.labels(rail=rail).set(math.nan if w is None else w)
        self.price.set(math.nan if price is None else price)
        for kind, frac in curtailed.items():
            self.class_curtailed.labels(device_class=kind).set(frac)

    def set_capability(
        self, horizons_s: Sequence[float], up_w: Sequence[float], down_w: Sequence[float]
    ) -> None:
        for h, up, down in zip(horizons_s, up_w, down_w, strict=True):
            self.capability.labels(direction="up", horizon=f"{h:g}s").set(up)
            self.capability.labels(direction="down", horizon=f"{h:g}s").set(down)

    def set_mode(self, mode: str) -> None:
        for m in MODES:
            self.mode.labels(mode=m).set(1 if m == mode else 0)

    def observe_command(self, driver: str, seconds: float, ok: bool) -> None:
        self.command_duration.labels(driver=driver, result="ok" if ok else "error").observe(seconds)

    def count_dispatch(
        self, accepted: bool, reason_code: str, now_unix: float | None = None
    ) -> None:
        """Count a dispatch decision; an accepted one also restarts the silence timer."""
        result = "accepted" if accepted else "rejected"
        self.dispatches.labels(result=result, reason=reason_code if not accepted else "").inc()
        if accepted:
            t = time.time() if now_unix is None else now_unix
            self.last_dispatch.set(t)
            self.dispatcher_last_seen.set(t)

    def heartbeat_seen(self, now_unix: float | None = None) -> None:
        """The dispatcher's heartbeat arrived."""
        self.dispatcher_last_seen.set(time.time() if now_unix is None else now_unix)

    # -- collectors -------------------------------------------------------------------------

    def watch_drivers(self, drivers: Iterable[object]) -> None:
        """Export the drivers' (and the meter's) poll, error and resend counters. Objects
        without such counters are ignored; a second call replaces the first."""
        if self._driver_collector is not None:
            self.registry.unregister(self._driver_collector)
        self._driver_collector = DriverCollector(drivers)
        self.registry.register(self._driver_collector)

    def enable_device_metrics(self, image: ProcessImage, planned_w: Callable[[], F64]) -> None:
        """Opt-in: one series per device (see `DeviceCollector`); for small sites only.
        ``planned_w``: the cycle's latest setpoints. A second call replaces the first."""
        if self._device_collector is not None:
            self.registry.unregister(self._device_collector)
        self._device_collector = DeviceCollector(image, planned_w)
        self.registry.register(self._device_collector)

    def watch_journal(self, journal: Journal) -> None:
        """Export the journal's rows written and dropped, write errors, health, and whether a
        corrupt one was moved aside at start."""
        if self._journal_collector is not None:
            self.registry.unregister(self._journal_collector)
        self._journal_collector = JournalCollector(journal)
        self.registry.register(self._journal_collector)

    def clock_stepped(self, step_s: float) -> None:
        """A wall-clock step (`controller.clock.ClockWatch`)."""
        self.clock_steps.inc()
        self.clock_last_step.set(step_s)

    # -- exposition -------------------------------------------------------------------------

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Export the number of live tasks of `loop` (rampd_asyncio_tasks)."""
        self._loop_collector.loop = loop

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread (prometheus-client's own server); returns port.

        Called from the event loop (the daemon's start), it also watches that loop's tasks."""
        with contextlib.suppress(RuntimeError):  # no running loop: no task gauge
            self.watch_loop(asyncio.get_running_loop())
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
