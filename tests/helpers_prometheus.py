"""Real Prometheus tooling for tests: `promtool` and a Prometheus server on loopback.

Both come from Debian's `prometheus` package (CI installs it). `prometheus_server()` starts a
server that scrapes the given targets every second into a TSDB under a test directory and is
killed afterwards; `PrometheusServer.wait_for()` polls its HTTP API with a deadline.

    with prometheus_server([f"127.0.0.1:{port}"], tmp_path) as prom:
        samples = prom.wait_for("rampd_site_power_watts", lambda s: s and s[0].value == 1e6)

From an async test, run the blocking calls in a thread:
`await asyncio.to_thread(prom.wait_for, expr, check)`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.app import Daemon
from controller.config import load_config
from controller.tools.broker import free_port
from controller.wire.timestamps import rfc3339
from drivers.core.state import DeviceState

REPO = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO / "configs" / "prometheus" / "rampd-alerts.yml"
ALERT_TESTS = REPO / "configs" / "prometheus" / "rampd-alerts.test.yml"
PROMETHEUS_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "configs" / "grafana" / "dashboards" / "rampd.json"
_INSTALL_HINT = "apt-get install prometheus (Debian's package brings promtool); CI installs it"


def require_exe(name: str) -> str:
    """The path of `name` on PATH (or in /usr/bin, /usr/sbin); fails the test if missing."""
    exe = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if exe is None:
        pytest.fail(f"{name} not installed: {_INSTALL_HINT}", pytrace=False)
    return exe


def promtool(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """Run `promtool args...`; returns (exit code, stdout and stderr together)."""
    proc = subprocess.run(
        [require_exe("promtool"), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.returncode, out


def http_get(url: str, timeout: float = 5.0, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


# --- the Grafana dashboard's queries ---


# Grafana's built-in interval variables and the dashboard's own, as PromQL can take them.
TEMPLATE_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${instance:regex}": ".*",
    "${instance}": ".*",
    "$instance": ".*",
}


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _fill(expr: str) -> str:
    for var, value in TEMPLATE_VALUES.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where it is, PromQL with the template variables filled in) of every panel target and
    every Prometheus annotation query."""
    exprs = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} ({panel['title']}) {target['refId']}"
            exprs.append((where, _fill(target["expr"])))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            exprs.append((f"annotation {annotation['name']}", _fill(annotation["expr"])))
    return exprs


def recording_rules(exprs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A rule file (as data) recording each expr: what `promtool check rules` parses."""
    rules = [
        {"record": f"rampd_dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)
    ]
    return {"groups": [{"name": "rampd-dashboard", "rules": rules}]}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


# --- a Prometheus server ---


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float


class PrometheusError(RuntimeError):
    pass


@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            body = http_get(f"{self.url}/api/v1/{path}{query}")
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = exc.read()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PrometheusError(
                f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}"
            )
        return answer["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query, now; vector or scalar results as samples."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        raise PrometheusError(f"unexpected result type {data['resultType']} for {expr}")

    def wait_for(
        self,
        expr: str,
        check: Callable[[list[Sample]], object],
        timeout: float = 20.0,
        interval: float = 0.2,
    ) -> list[Sample]:
        """Query `expr` until `check(samples)` is truthy; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if check(samples):
                return samples
            self.check_running()
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{expr}: condition not met within {timeout} s (last: {samples!r})\n"
                    + self.log_tail()
                )
            time.sleep(interval)

    def wait_api(self, path: str, check: Callable[[Any], object], timeout: float = 20.0) -> Any:
        """GET /api/v1/<path> until `check(data)` is truthy; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.api(path)
            if check(data):
                return data
            self.check_running()
            if time.monotonic() >= deadline:
                raise AssertionError(f"{path}: not as expected in {timeout} s: {data!r}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            http_get(f"{self.url}/-/ready", timeout=1.0)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def write_config(
    path: Path,
    targets: Sequence[str],
    *,
    job: str = "rampd",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> None:
    """A prometheus.yml scraping `targets` (host:port) as `job`. JSON is valid YAML."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def prometheus_server(
    targets: Sequence[str],
    workdir: Path,
    *,
    job: str = "rampd",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    timeout: float = 30.0,
) -> Iterator[PrometheusServer]:
    """A real Prometheus on 127.0.0.1:<free port> scraping `targets`, its TSDB and config
    under `workdir`; ready (its /-/ready answers) on entry, stopped (killed on timeout) on
    exit, whatever happened."""
    exe = require_exe("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    write_config(config, targets, job=job, scrape_interval=scrape_interval, rule_files=rule_files)
    server: PrometheusServer | None = None
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        log = workdir / f"prometheus-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=info",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        candidate = PrometheusServer(proc, f"http://127.0.0.1:{port}", workdir, log)
        deadline = time.monotonic() + timeout
        try:
            while not candidate.ready():
                if proc.poll() is not None or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except BaseException:
            candidate.stop()
            raise
        if candidate.ready():
            server = candidate
            break
        candidate.stop()
        if _port_free(port) and "address already in use" not in candidate.log_tail():
            raise PrometheusError(f"prometheus did not start:\n{candidate.log_tail()}")
    if server is None:
        raise PrometheusError("prometheus did not start: no free port in 3 attempts")
    try:
        yield server
    finally:
        server.stop()


# --- a daemon's metrics with realistic values, without its network tasks ---


SIM_SITE = REPO / "configs" / "sim-site.toml"


def realistic_daemon() -> Daemon:
    """The daemon of configs/sim-site.toml, built but not run, in a plausible state: every
    device reported (a few faulted or asleep), the meter fresh, a few cycles and dispatches
    through the daemon's own code paths, so its registry holds what a live site serves."""
    d = Daemon(load_config(SIM_SITE))
    d.metrics.watch_drivers([*d.drivers, d.meter])
    d.metrics.enable_device_metrics(d.image, lambda: d.cycle.planned_w)
    image = d.image
    now = time.monotonic()
    # What the drivers' polls (through their ports) and the meter's reads write.
    for driver in d.drivers:
        port = driver.port
        for local, row in enumerate(port.rows.tolist()):
            asleep = 3 <= row < 8
            power = image.p_idle_w[row] if asleep else 0.8 * image.p_max_w[row]
            port.reading(local, power, DeviceState.SLEEPING if asleep else DeviceState.ON, now)
            if row < 3:
                port.fault(local)
    d.meter.value_w = float(image.measured_w.sum()) + 800e3
    d.meter.at = now
    for _ in range(5):
        d.cycle.tick()
    d.on_heartbeat(b"")
    issued = rfc3339(time.time())
    d.on_dispatch(
        json.dumps(
            {"id": "d-1", "seq": 1, "issued_at": issued, "mode": "setpoint", "target_kw": 9000.0}
        ).encode()
    )
    d.on_dispatch(b"not json")
    d.on_dispatch(  # replayed seq
        json.dumps(
            {"id": "d-0", "seq": 1, "issued_at": issued, "mode": "setpoint", "target_kw": 1.0}
        ).encode()
    )
    for _ in range(5):
        d.cycle.tick()
    d.update_telemetry_metrics(d.telemetry())  # device counts, capability, broker state
    for driver in d.drivers:
        d.metrics.observe_command(driver.name, 0.012, True)
        d.metrics.observe_command(driver.name, 1.0, False)
    d.metrics.cycle_overruns.inc()
    return d
