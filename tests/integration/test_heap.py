"""Once ready, a daemon that owns its process freezes its long-lived objects out of garbage
collection (controller.heap); one embedded in another program (these tests) leaves the
collector alone."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from pathlib import Path

import pytest

from controller import heap
from controller.app import Daemon, Overrides
from controller.config import load_config
from drivers.sim.site import SimSite
from tests.helpers import Mosquitto, until

SITE = """
site_id = "heap"
[site]
max_kw = 1000
[metrics]
listen = "127.0.0.1:0"
[meter]
host = "127.69.22.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 3
address = "127.69.21.1"
overrides = { port = 1502, poll_s = 0.2 }
"""


@pytest.mark.parametrize("settle", [True, False])
async def test_the_daemon_freezes_what_lives_long_once_ready(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture, settle: bool
) -> None:
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(SITE)
    cfg = load_config(cfg_path)
    sim = SimSite(cfg)
    await sim.start()
    sim_task = asyncio.create_task(sim.run())
    gc.unfreeze()
    daemon = Daemon(cfg, Overrides(mqtt=f"{mosquitto.host}:{mosquitto.port}"), settle_heap=settle)
    task = asyncio.create_task(daemon.run())
    try:
        with caplog.at_level(logging.INFO, logger="rampd"):
            await until(lambda: daemon.notifier.ready_sent, 20, what="ready")
        if settle:
            said = re.search(r"(\d+) long-lived objects frozen out of garbage", caplog.text)
            assert said is not None and int(said[1]) > 1000, caplog.text
            assert gc.get_freeze_count() > 1000  # less what was freed since
            # The daemon's own objects are among them.
            young = gc.get_objects()  # the frozen ones are in no generation
            assert not any(o is daemon.drivers for o in young)
        else:
            assert gc.get_freeze_count() == 0
            assert any(o is daemon.drivers for o in gc.get_objects())
            assert "frozen out of garbage collection" not in caplog.text
    finally:
        task.cancel()
        sim_task.cancel()
        await asyncio.gather(task, sim_task, return_exceptions=True)
        await sim.close()
        heap.thaw()
