"""The chaos bench as a script: the same code as `rampd bench chaos` (see
controller/tools/bench/chaos.py).

Replays the real PJM RegA signal on the simulated bench site while a seeded schedule kills
devices, the meter, the broker and the daemon (restarted by a supervisor, as systemd would);
prints the PJM score per block, each fault with the capability before and after it, the
dispatches sent, acked and re-sent, the journal's rows, and the goals. Not a test: figures
depend on the machine.

Reproduce: python bench/chaos_bench.py [-c configs/bench-site.toml] [--minutes 30] [--seed N]
           [--compress K] [--fault-every-s 60,180] [--first-fault-s S] [--kinds ...] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.tools.bench.chaos import main

if __name__ == "__main__":
    raise SystemExit(main())
