"""The fan-out bench as a script: the same code as `rampd bench fanout` (see
controller/tools/bench/fanout.py).

Time from a dispatch's arrival to the last device's command answered, for LuxOS, Modbus and
Redfish fleets served by `rampd sim` processes, beside a floor of bare asyncio streams sending
the same frames. Not a test: figures depend on the machine.

Reproduce: python bench/fanout.py [--sizes 1000,5000,10000] [--protocols luxos,modbus,redfish]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.tools.bench.fanout import main

if __name__ == "__main__":
    raise SystemExit(main())
