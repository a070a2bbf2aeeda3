"""The ramp bench as a script: the same code as `rampd bench ramp`
(see controller/tools/bench/ramp.py).

Setpoint steps on a simulated site (broker, `rampd sim`, `rampd run` as processes): settle
time, overshoot and integral error from the simulator's ground truth, against the fleet's
physical minimum. Not a test: figures depend on the machine.

Reproduce: python bench/ramp_bench.py [-c configs/bench-site.toml] [--quick] [--seed N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.tools.bench.ramp import main

if __name__ == "__main__":
    raise SystemExit(main())
