"""Micro-benchmark of `Controller.step`: milliseconds per control step by fleet size.

Fleets:
- `mixed`: a random mix of three device classes: slow miners' power targets (70 %, 2 s dead
  time, 100 W steps, able to sleep), Modbus container loads (20 %, 0.2 s) and GPU rack power
  caps (10 %, 0.1 s), so the two-tier allocation, quantization, the dead-time ring and the
  sleep planner are all exercised (the worst case);
- `uniform`: one class like configs/devices/modbus-load.toml (continuous, 0.2 s dead time).
2 % of rows are not ON, each device is polled every ~2 s, the target follows a
regulation-like random walk. `steady`: device states do not change; `churn`: each cycle
0.1 % of rows change state (ON <-> UNKNOWN), as stale telemetry does on a big site.

Reproduce: python bench/step_bench.py [--sizes 1000,10000,100000,1000000] [--cycles 50]
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.control import Controller, FleetParams, Snapshot

DT = 0.1


def random_fleet(n: int, rng: np.random.Generator, mixed: bool = True) -> FleetParams:
    probs = [0.7, 0.2, 0.1] if mixed else [0.0, 1.0, 0.0]
    kind = rng.choice(3, size=n, p=probs)  # miner, container, GPU rack
    p_max = np.choose(kind, [rng.uniform(3.0e3, 3.5e3, n), np.full(n, 250e3), np.full(n, 40e3)])
    p_min = p_max * np.choose(kind, [0.3, 0.1, 0.25])
    return FleetParams.of(
        p_min_w=p_min,
        p_max_w=p_max,
        ramp_up_w_s=p_max * np.choose(kind, [0.05, 0.2, 2.0]),
        ramp_down_w_s=p_max * np.choose(kind, [0.1, 0.4, 4.0]),
        dead_time_s=np.choose(kind, [2.0, 0.2, 0.1]),
        step_w=np.choose(kind, [100.0, 0.0, 0.0]),
        priority=rng.integers(0, 3, n).astype(np.int32),
        p_idle_w=np.choose(kind, [20.0, 5e3, 2e3]),
        wake_s=np.choose(kind, [120.0, 0.0, 0.0]),  # miners sleep: the planner runs too
        sleep_s=np.choose(kind, [2.0, 0.0, 0.0]),
    )


def bench(
    n: int, cycles: int, churn: bool, mixed: bool = True, seed: int = 1
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    params = random_fleet(n, rng, mixed)
    ctl = Controller(params, deadband_w=1e-4 * float(params.p_max_w.sum()), cycle_s=DT)
    state = np.where(rng.random(n) < 0.98, 0, rng.integers(1, 5, n)).astype(np.int8)
    measured = params.p_min_w + rng.random(n) * (params.p_max_w - params.p_min_w)
    mid = 0.5 * float(params.p_min_w.sum() + params.p_max_w.sum())
    band = 0.2 * float(params.p_max_w.sum() - params.p_min_w.sum())
    poll_phase = rng.integers(0, 20, n)
    signal = 0.0
    times: list[float] = []
    warmup = 5
    for k in range(warmup + cycles):
        signal = float(np.clip(signal + rng.normal(0, 0.05), -1, 1))
        if churn:
            flip = rng.integers(0, n, max(1, n // 1000))
            state[flip] = np.where(state[flip] == 0, 4, 0)
        new = poll_phase == k % 20
        measured[new] += rng.normal(0, 10.0, int(new.sum()))
        snap = Snapshot(
            t=k * DT,
            meter_w=mid + 0.05 * mid + rng.normal(0, 1e3),
            measured_w=measured.copy(),
            new_reading=new,
            state=state.copy(),
        )
        target = mid + signal * band
        t0 = time.perf_counter()
        ctl.step(snap, target, DT)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return float(ms.mean()), float(np.percentile(ms, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--cycles", type=int, default=50)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"Controller.step, dt={DT} s, {args.cycles} cycles after 5 warm-up; "
        f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}"
    )
    print(f"{'devices':>10} {'fleet':>8} {'states':>7} {'mean ms':>9} {'p99 ms':>9}")
    for n in sizes:
        for mixed, churn in ((True, False), (True, True), (False, False)):
            mean, p99 = bench(n, args.cycles, churn, mixed)
            fleet = "mixed" if mixed else "uniform"
            states = "churn" if churn else "steady"
            print(f"{n:>10,} {fleet:>8} {states:>7} {mean:>9.3f} {p99:>9.3f}", flush=True)
    print("reproduce: python bench/step_bench.py")


if __name__ == "__main__":
    main()
