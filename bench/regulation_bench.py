"""The regulation bench as a script: the same code as `rampd bench regulation` (see
controller/tools/bench/regulation.py).

Replays a real PJM RegA signal as regulation dispatches on a simulated site and scores the
simulator's ground truth with the PJM performance score. Not a test: figures depend on the
machine.

Reproduce: python bench/regulation_bench.py [-c configs/bench-site.toml] [--quick]
           [--compress K] [--minutes M] [--day 8/1/2017] [--start 22:00:00]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.tools.bench.regulation import main

if __name__ == "__main__":
    raise SystemExit(main())
