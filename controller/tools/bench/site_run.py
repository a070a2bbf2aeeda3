"""A bench site as separate processes: a broker, `rampd sim`, `rampd run`, and a dispatcher.

`start_site()` writes the config the run uses into the output directory (a copy of the site
file with the broker port, a free metrics port and a journal path filled in; `--quick` shrinks
the fleet), starts the simulator and the daemon, connects a dispatcher client over MQTT and
waits until the daemon reports every device ON. On exit it stops both processes (SIGTERM,
then SIGKILL after a timeout) and the broker it started.

Figures come from the simulator's ground truth (`truth.jsonl`), never from the daemon's word.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiomqtt

from controller.config import ConfigError, LoadedConfig, load_config, split_host_port
from controller.dispatcher import DispatcherClient, Sent
from controller.tools.broker import LocalBroker, free_port
from controller.tools.truth import TruthTail
from controller.wire import Ack, Telemetry

log = logging.getLogger("rampd.bench")

REPO: Final = Path(__file__).resolve().parents[3]
QUICK_COUNTS: Final[Mapping[str, int]] = {
    "modbus": 10,
    "luxos": 100,
    "braiins": 25,
    "whatsminer": 25,
    "antminer": 25,
    "redfish": 4,
    "breaker": 6,
}
"""Devices per protocol of the `--quick` site (same templates as the reference site)."""

STOP_TIMEOUT_S: Final = 10.0
ACK_TIMEOUT_S: Final = 5.0
HTTP_TIMEOUT_S: Final = 5.0
HEARTBEAT_S: Final = 10.0
POLL_S: Final = 0.1


class BenchError(Exception):
    """The bench cannot go on (a process died, a wait timed out); the message says why."""


# --- the run's config ----------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(text: str) -> str:
    # JSON escapes (\" \\ \n \uXXXX for controls) are valid TOML basic-string escapes.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump_toml(doc: Mapping[str, Any], header: str = "") -> str:
    """TOML text for a document of tables, arrays of tables and plain values (what a site
    file holds); checked by reading it back."""
    lines = [f"# {line}" for line in header.splitlines()]

    def table(path: list[str], t: Mapping[str, Any], inline: bool = False) -> None:
        # Inside an array of tables, sub-tables are written inline (`overrides = { ... }`).
        nested = {
            k: v for k, v in t.items() if (isinstance(v, dict) and not inline) or _is_table_array(v)
        }
        for k, v in t.items():
            if k not in nested:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in nested.items():
            name = ".".join(_toml_key(p) for p in [*path, k])
            for item in v if isinstance(v, list) else [v]:
                lines.extend(["", f"[[{name}]]" if isinstance(v, list) else f"[{name}]"])
                table([*path, k], item, inline=isinstance(v, list))

    table([], doc)
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != doc:
        raise ValueError("TOML round trip changed the document")
    return text


def quick_site(doc: dict[str, Any], loaded: LoadedConfig) -> dict[str, Any]:
    """The `--quick` site: QUICK_COUNTS devices per protocol from the same groups and
    templates; site limits, deadband, reserve and non-flexible load scaled with the fleet's
    maximum."""
    out: dict[str, Any] = json.loads(json.dumps(doc))  # a deep copy of plain TOML data
    left = dict(QUICK_COUNTS)
    groups = []
    full = small = 0.0
    row = 0
    for g in out["devices"]:
        count = int(g.get("count", 1))
        rows = loaded.devices[row : row + count]  # devices expand group by group, in order
        row += count
        full += sum(d.p_max_w for d in rows)
        n = min(count, left.get(rows[0].protocol, 0))
        if n > 0:
            left[rows[0].protocol] -= n
            small += sum(d.p_max_w for d in rows[:n])
            groups.append({**g, "count": n})
    if not groups:
        raise BenchError(f"--quick: the site has none of {', '.join(QUICK_COUNTS)}")
    out["devices"] = groups
    ratio = small / full

    def scale(table: dict[str, Any], key: str) -> None:
        if key in table:
            table[key] = round(float(table[key]) * ratio, 1)

    scale(out["site"], "max_kw")
    scale(out["site"], "min_kw")
    # The deadband must stay below the settle band (0.5% of the site maximum at least).
    scale(out["site"], "deadband_kw")
    scale(out, "noncontrollable_kw")
    scale(out.get("reserve", {}), "up_kw_5s")
    scale(out.get("reserve", {}), "down_kw_5s")
    scale(out.get("failsafe", {}), "baseline_kw")
    return out


def write_run_config(
    source: Path,
    out_dir: Path,
    *,
    quick: bool,
    broker: tuple[str, int],
    metrics_port: int,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> LoadedConfig:
    """Write OUT/site.toml (the config this run uses) and return it loaded; `sections`
    replace tables of the source (a bench's `[services]`)."""
    try:
        loaded = load_config(source)
        doc = tomllib.loads(source.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    if quick:
        doc = quick_site(doc, loaded)
    for name, table in (sections or {}).items():
        doc[name] = json.loads(json.dumps(table))
    doc.setdefault("mqtt", {}).update(host=broker[0], port=broker[1])
    doc.setdefault("metrics", {})["listen"] = f"127.0.0.1:{metrics_port}"
    doc.setdefault("journal", {})["path"] = str((out_dir / "journal.sqlite").resolve())
    # Templates beside the source file stay visible from the copy.
    templates = source.resolve().parent / "devices"
    link = out_dir / "devices"
    if templates.is_dir() and not link.exists():
        link.symlink_to(templates, target_is_directory=True)
    path = out_dir / "site.toml"
    header = (
        f"Generated by rampd bench from {source}{' (--quick)' if quick else ''}: "
        f"broker, metrics and journal filled in.\nDo not edit; edit the source file instead."
    )
    path.write_text(dump_toml(doc, header), encoding="utf-8")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


def default_out(kind: str) -> Path:
    return Path("bench-runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{kind}"


# --- processes -----------------------------------------------------------------------------


async def spawn(args: list[str], log_path: Path) -> asyncio.subprocess.Process:
    """`python -m controller.cli ARGS` in its own session (our cleanup, not the tty's)."""
    with log_path.open("ab") as fh:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fh,
            stderr=fh,
            start_new_session=True,
        )


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL when it has not exited within `timeout_s`."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        log.warning("pid %d ignored SIGTERM for %.0f s: killing it", proc.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), timeout_s)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def _broker(mqtt: str | None) -> AsyncIterator[tuple[str, int]]:
    if mqtt:
        yield split_host_port(mqtt, default_port=1883)
        return
    async with LocalBroker() as broker:
        yield broker.host, broker.port


# --- the dispatcher ------------------------------------------------------------------------


async def ack_of(d: DispatcherClient, sent: Sent, within: float = ACK_TIMEOUT_S) -> Ack | None:
    """The daemon's ack of `sent`, or None if none came within `within` seconds."""
    try:
        return await d.ack_for(sent.dispatch.id, within)
    except TimeoutError:
        return None


async def fresh_telemetry(d: DispatcherClient, within: float = 5.0) -> Telemetry:
    try:
        return await d.fresh_telemetry(within)
    except TimeoutError:
        raise BenchError(f"no telemetry from the daemon within {within:.0f} s") from None


# --- the running site ----------------------------------------------------------------------


@dataclass(slots=True)
class Site:
    """A running bench site: its config, processes, truth log and dispatcher."""

    cfg: LoadedConfig
    out: Path
    broker: tuple[str, int]
    control_port: int
    sim: asyncio.subprocess.Process
    daemon: asyncio.subprocess.Process
    d: DispatcherClient
    truth: TruthTail
    _physical_min_warned: bool = False

    @property
    def n_devices(self) -> int:
        return len(self.cfg.devices)

    @property
    def site_max_kw(self) -> float:
        return self.cfg.site.site.max_kw

    def check_alive(self) -> None:
        for name, proc, log_name in (
            ("rampd sim", self.sim, "sim.log"),
            ("rampd run", self.daemon, "rampd.log"),
        ):
            if proc.returncode is not None:
                raise BenchError(
                    f"{name} exited with {proc.returncode}; end of {self.out / log_name}:\n"
                    f"{_tail(self.out / log_name)}"
                )

    async def all_devices_on(self, within: float) -> Telemetry:
        """Wait until the daemon's telemetry counts every device ON; return that telemetry."""
        deadline = time.monotonic() + within
        while True:
            self.check_alive()
            tel = self.d.latest()
            on = 0 if tel is None else tel.devices.on
            if tel is not None and on == self.n_devices:
                return tel
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the daemon saw {on} of "
                    f"{self.n_devices} devices ON after {within:.0f} s (see {self.out}/*.log)"
                )
            await asyncio.sleep(0.2)

    async def physical_min(
        self, target_kw: float, tol_kw: float
    ) -> tuple[float | None, dict[str, Any]]:
        """The fleet's physical minimum time (s) to reach target +- tol, from the simulator's
        true state, and its whole answer; (None, {}) when the simulator does not offer it."""
        url = f"http://127.0.0.1:{self.control_port}/physical_min"
        body = {"target_kw": target_kw, "tol_kw": tol_kw}
        try:
            answer = json.loads(await asyncio.to_thread(http_json, url, body))
            value = answer.get("physical_min_s")
            return (None if value is None else float(value)), dict(answer)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            if not self._physical_min_warned:
                self._physical_min_warned = True
                print(f"  (no physical minimum from the simulator: {exc}; ratio not computed)")
            return None, {}

    async def poll_truth(self) -> None:
        self.check_alive()
        await asyncio.sleep(POLL_S)
        self.truth.poll()

    async def settle(
        self, target_kw: float, tol_kw: float, *, t0: float, hold_s: float, cap_s: float
    ) -> float:
        """Follow the truth from t0 until it has stayed within target +- tol for hold_s, or
        until t0 + cap_s; return the end of the window (unix s)."""
        i = self.index_at(t0)
        t_in: float | None = None
        while True:
            await self.poll_truth()
            t, kw = self.truth.t, self.truth.kw
            for j in range(i, len(t)):
                if abs(kw[j] - target_kw) > tol_kw:
                    t_in = None
                elif t_in is None:
                    t_in = t[j]
            i = len(t)
            last = t[-1] if t else t0
            if t_in is not None and last - t_in >= hold_s and last - t0 >= hold_s:
                return last
            if time.time() - t0 >= cap_s:
                return min(last, t0 + cap_s) if last > t0 else t0 + cap_s

    async def steady(self, tol_kw: float, *, hold_s: float, within: float) -> float:
        """Wait until the truth has stayed within a 2*tol wide band for hold_s (at rest);
        returns the last level seen. Gives up quietly after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            await self.poll_truth()
            t, kw = self.truth.t, self.truth.kw
            if t and t[-1] - t[0] >= hold_s:
                j = self.index_at(t[-1] - hold_s)
                recent = kw[j:]
                if max(recent) - min(recent) <= 2 * tol_kw or time.monotonic() > deadline:
                    return sum(recent) / len(recent)

    def index_at(self, t0: float) -> int:
        """Index of the first truth sample at or after t0 (unix s)."""
        return bisect.bisect_left(self.truth.t, t0)


def http_json(url: str, body: Mapping[str, Any] | None = None) -> str:
    """GET (or POST a JSON body) with a timeout; blocking: call it through asyncio.to_thread."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="POST" if data else "GET",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} from {url}") from None


def ready_timeout_s(n_devices: int) -> float:
    """How long the daemon may take to see every device ON (2,000 miners take a while)."""
    return 60.0 + 0.03 * n_devices


def _fresh_out(out: Path) -> Path:
    """Create the output directory; return its (emptied) truth log path. A journal left by
    an earlier run in the same directory goes too: the daemon would resume its dispatch."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm", "telemetry.jsonl"):
        (out / name).unlink(missing_ok=True)
    truth = out / "truth.jsonl"
    truth.unlink(missing_ok=True)
    return truth


@contextlib.asynccontextmanager
async def start_site(
    source: Path,
    out: Path,
    *,
    quick: bool,
    mqtt: str | None = None,
    seed: int = 0,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[Site]:
    """Broker (or `mqtt`), simulator and daemon, with a connected dispatcher; every device ON.

    Everything started here is stopped on exit, whatever happens inside.
    """
    truth_path = _fresh_out(out)
    async with _broker(mqtt) as broker:
        cfg = write_run_config(
            source, out, quick=quick, broker=broker, metrics_port=free_port(), sections=sections
        )
        control_port = free_port()
        run_cfg = str(out / "site.toml")
        sim = await spawn(
            [
                "sim",
                "-c",
                run_cfg,
                "--truth",
                str(truth_path),
                "--control",
                f"127.0.0.1:{control_port}",
                "--seed",
                str(seed),
            ],
            out / "sim.log",
        )
        try:
            daemon = await spawn(["run", "-c", run_cfg], out / "rampd.log")
            try:
                async with _dispatcher(broker, cfg.topic_root, out) as d:
                    site = Site(
                        cfg, out, broker, control_port, sim, daemon, d, TruthTail(truth_path)
                    )
                    await site.all_devices_on(ready_timeout_s(site.n_devices))
                    yield site
            finally:
                await stop_process(daemon)
        finally:
            await stop_process(sim)


@contextlib.asynccontextmanager
async def _dispatcher(
    broker: tuple[str, int], root: str, out: Path
) -> AsyncIterator[DispatcherClient]:
    with (out / "telemetry.jsonl").open("a", buffering=1, encoding="utf-8") as tel_log:

        def log_telemetry(_: Telemetry, raw: bytes) -> None:
            tel_log.write(raw.decode("utf-8", "replace") + "\n")

        client = DispatcherClient(
            *broker,
            root,
            id_prefix="bench",
            identifier=f"rampd-bench-{os.getpid()}",
            heartbeat_s=HEARTBEAT_S,
            # The broker may still be starting (`--mqtt` of a fresh one).
            connect_within=15.0,
            on_telemetry=log_telemetry,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            raise BenchError(f"cannot connect to the broker at {broker[0]}:{broker[1]}") from None
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)


# --- run directories -----------------------------------------------------------------------


def write_truth_slice(site: Site, path: Path, t_lo: float, t_hi: float) -> None:
    """The ground truth within [t_lo, t_hi] as its own truth.jsonl (a self-contained run)."""
    i, j = site.index_at(t_lo), site.index_at(t_hi + 1e-6)
    t, kw = site.truth.t, site.truth.kw
    with path.open("w", encoding="utf-8") as fh:
        for k in range(i, j):
            fh.write(json.dumps({"t": t[k], "site_kw": kw[k]}) + "\n")


def write_telemetry_slice(site: Site, path: Path, t_lo: float, t_hi: float) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for tel in site.d.telemetry:
            if t_lo <= tel.at <= t_hi:
                fh.write(tel.encode().decode() + "\n")


def config_summary(site: Site, source: Path, quick: bool) -> dict[str, Any]:
    """What results.json says about the site the figures come from."""
    s = site.cfg.site
    kinds: dict[str, int] = {}
    for dev in site.cfg.devices:
        kinds[dev.kind] = kinds.get(dev.kind, 0) + 1
    return {
        "source": str(source),
        "run_config": str(site.out / "site.toml"),
        "quick": quick,
        "site_id": s.site_id,
        "devices": kinds,
        "fleet_min_kw": round(sum(d.p_min_w for d in site.cfg.devices) / 1e3, 1),
        "fleet_max_kw": round(sum(d.p_max_w for d in site.cfg.devices) / 1e3, 1),
        "site_min_kw": s.site.min_kw,
        "site_max_kw": s.site.max_kw,
        "deadband_kw": s.site.deadband_kw,
        "noncontrollable_kw": s.noncontrollable_kw,
        "reserve": {"up_kw_5s": s.reserve.up_kw_5s, "down_kw_5s": s.reserve.down_kw_5s},
        "cycle_s": s.cycle_s,
    }
