"""Prometheus metrics: base units (watts, seconds), bounded label sets, no per-device labels."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from controller.fleet import STATE_NAMES

# Cycle work is sub-millisecond to tens of ms; command round trips 1 ms to the 1 s timeout.
_CYCLE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_COMMAND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.build = Info("rampd_build", "rampd build information", registry=r)
        self.build.info({"version": version})
        self.site_power = Gauge(
            "rampd_site_power_watts", "Site power measured at the meter", registry=r
        )
        self.site_target = Gauge(
            "rampd_site_target_watts", "Site power target in force", registry=r
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
        self.dispatches = Counter(
            "rampd_dispatches_total",
            "Dispatches received, by decision and rejection reason",
            ["result", "reason"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "rampd_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_device_counts(self, counts: dict[str, int]) -> None:
        for name in STATE_NAMES:
            self.devices.labels(state=name).set(counts.get(name, 0))

    def observe_command(self, driver: str, seconds: float, ok: bool) -> None:
        self.command_duration.labels(driver=driver, result="ok" if ok else "error").observe(seconds)

    def count_dispatch(self, accepted: bool, reason_code: str) -> None:
        result = "accepted" if accepted else "rejected"
        self.dispatches.labels(result=result, reason=reason_code if not accepted else "").inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread (prometheus-client's own server); returns port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
