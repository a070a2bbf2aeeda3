"""`rampd demo`: a broker, the simulated site and the daemon, driven by a short dispatch script.

Everything runs as it would on site: the simulator and the daemon are separate processes that
talk Modbus over loopback, and the demo publishes dispatches over MQTT like a grid dispatcher.
Progress and the settle figures come from the simulator's ground truth, not the daemon's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import numpy as np

from controller.config import load_config, split_host_port
from controller.dispatcher import DispatcherClient
from controller.ramp_score import RampRecord, score_series
from controller.tools.broker import LocalBroker, reachable
from controller.tools.truth import TruthTail, tolerance_kw
from controller.wire import Ack, Telemetry


async def _spawn(args: list[str], log_path: Path) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.cli", *args, stdout=log, stderr=log
        )
    finally:
        log.close()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def _broker(cfg_host: str, cfg_port: int, mqtt: str | None) -> AsyncIterator[tuple[str, int]]:
    if mqtt:
        yield split_host_port(mqtt, default_port=1883)
    elif await reachable(cfg_host, cfg_port):
        print(f"using the broker at {cfg_host}:{cfg_port}")
        yield cfg_host, cfg_port
    else:
        async with LocalBroker() as broker:
            print(
                f"no broker at {cfg_host}:{cfg_port}; started {broker.kind} on port {broker.port}"
            )
            yield broker.host, broker.port


def _agc_signal(t: float) -> float:
    """A synthetic AGC-like regulation signal in -1..+1 (two slow tones and a faster one)."""
    s = 0.55 * math.sin(2 * math.pi * t / 47) + 0.3 * math.sin(2 * math.pi * t / 17 + 1.0)
    return max(-1.0, min(1.0, s + 0.1 * math.sin(2 * math.pi * t / 6.1)))


async def _show(tail: TruthTail, target_kw: float, t_from: float, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.time())))
        tail.poll()
        now = tail.latest()
        if now is not None:
            err = now - target_kw
            pct = 100 * err / max(target_kw, 1.0)
            print(
                f"  t={time.time() - t_from:6.1f}s  target {target_kw:9.1f} kW  "
                f"measured {now:9.1f} kW  error {err:+8.1f} kW ({pct:+5.1f}%)"
            )


async def run_demo(config: Path, *, mqtt: str | None, regulation_s: float, hold_s: float) -> int:
    cfg = load_config(config)
    root = cfg.topic_root
    n_devices = len(cfg.devices)
    limits = (cfg.site.site.min_kw, cfg.site.site.max_kw)
    workdir = Path(tempfile.mkdtemp(prefix="rampd-demo-"))
    truth = workdir / "truth.jsonl"
    print(
        f"rampd demo: site {cfg.site.site_id!r}, {n_devices} simulated devices; logs in {workdir}"
    )
    async with _broker(cfg.site.mqtt.host, cfg.site.mqtt.port, mqtt) as (host, port):
        sim = await _spawn(["sim", "-c", str(config), "--truth", str(truth)], workdir / "sim.log")
        daemon = await _spawn(
            [
                "run",
                "-c",
                str(config),
                "--mqtt",
                f"{host}:{port}",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            workdir / "rampd.log",
        )
        try:
            return await _script(host, port, root, n_devices, limits, truth, hold_s, regulation_s)
        finally:
            await _stop(daemon)
            await _stop(sim)


async def _script(
    host: str,
    port: int,
    root: str,
    n_devices: int,
    limits: tuple[float, float],
    truth: Path,
    hold_s: float,
    regulation_s: float,
) -> int:
    async with DispatcherClient(host, port, root, id_prefix="demo") as d:
        print("waiting for the daemon to see every device ...")
        try:
            await d.until(lambda: _all_on(d.latest(), n_devices), within=60.0)
        except TimeoutError:
            print(f"the daemon did not see all devices in 60 s: {d.latest()}")
            return 1
        tel = d.latest()
        assert tel is not None and tel.min_w is not None and tel.max_w is not None  # _all_on
        # The fleet's reachable range, inside what the site may be dispatched to.
        lo = max(tel.min_w / 1e3, limits[0])
        hi = min(tel.max_w / 1e3, limits[1])
        measured = "?" if tel.measured_w is None else f"{tel.measured_w / 1e3:.1f}"
        print(f"site range {lo:.0f}..{hi:.0f} kW; measured {measured} kW")
        tail = TruthTail(truth)
        t_start = time.time()
        steps: list[tuple[str, float, float, float]] = []
        for frac in (0.2, 0.8, 0.5):
            target = round(lo + frac * (hi - lo), 1)
            print(f"\ndispatch: setpoint {target:.1f} kW ({frac:.0%} of the flexible range)")
            t0 = (await d.send("setpoint", target, ramp_s=0.0)).t
            await _show(tail, target, t_start, hold_s)
            steps.append((f"setpoint {frac:.0%}", t0, time.time(), target))
        base, band = round(lo + 0.5 * (hi - lo), 1), round(0.3 * (hi - lo), 1)
        print(f"\nregulation: base {base:.1f} kW, band +-{band:.1f} kW for {regulation_s:.0f} s")
        reg: list[tuple[float, float]] = []
        t_reg = time.time()
        while time.time() - t_reg < regulation_s:
            s = round(_agc_signal(time.time() - t_reg), 4)
            await d.send("regulation", base, band_kw=band, signal=s)
            reg.append((time.time(), base + s * band))
            await _show(tail, base + s * band, t_start, 2.0)
        tail.poll()
    return _summary(tail, steps, reg, limits[1], d.acks)


def _all_on(tel: Telemetry | None, n_devices: int) -> bool:
    return tel is not None and tel.devices.on >= n_devices and None not in (tel.min_w, tel.max_w)


def _summary(
    tail: TruthTail,
    steps: list[tuple[str, float, float, float]],
    reg: list[tuple[float, float]],
    site_max: float,
    acks: Sequence[Ack],
) -> int:
    t, kw = tail.arrays()
    figures: list[tuple[str, RampRecord]] = []
    for name, t0, t_end, target in steps:
        tol = tolerance_kw(target, site_max)
        f = score_series(t, kw * 1e3, t0=t0, t_end=t_end, target_w=target * 1e3, tol_w=tol * 1e3)
        figures.append((name, f))
    print("\ntime to settle (ground truth enters and stays within +-2% of target):")
    print(format_table(figures))
    if reg and t.size:
        rt = np.asarray([r[0] for r in reg])
        want = np.asarray([r[1] for r in reg])
        sel = t >= rt[0]
        # The requested power is piecewise constant between regulation updates.
        req = want[np.searchsorted(rt, t[sel], side="right") - 1]
        mae = float(np.mean(np.abs(kw[sel] - req)))
        band = float(np.ptp(want)) / 2 or 1.0
        print(f"regulation: mean |error| {mae:.1f} kW ({100 * mae / band:.1f}% of the band)")
    rejected = [a for a in acks if not a.accepted]
    print(f"acks: {len(acks)} received, {len(rejected)} rejected")
    return 0 if all(f.settle_s is not None for _, f in figures) and not rejected else 1


def format_table(rows: Iterable[tuple[str, RampRecord]]) -> str:
    out = [f"{'step':<28} {'target kW':>10} {'settle s':>9} {'overshoot kW':>13} {'IAE kWh':>9}"]
    for name, f in rows:
        settle = f"{f.settle_s:.2f}" if f.settle_s is not None else "never"
        out.append(
            f"{name:<28} {f.target_w / 1e3:>10.1f} {settle:>9} {f.overshoot_w / 1e3:>13.1f} "
            f"{f.iae_j / 3.6e6:>9.3f}"
        )
    return "\n".join(out)
