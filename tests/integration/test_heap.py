"""Once ready, a daemon that owns its process freezes its long-lived objects out of garbage
collection (controller.heap); one embedded in another program (these tests) leaves the
collector alone."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from controller import heap
from tests.helpers import Mosquitto, daemon_on_sim, until

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
    mosquitto: Mosquitto, tmp_path: Path, settle: bool
) -> None:
    gc.unfreeze()
    try:
        async with daemon_on_sim(SITE, tmp_path, mosquitto, settle_heap=settle) as daemon:
            await until(lambda: daemon.notifier.ready_sent, 20, what="ready")
            if settle:
                # Judged by the collector itself, not by the daemon's line about it.
                assert gc.get_freeze_count() > 1000  # less what was freed since
                # The daemon's own objects are among them.
                young = gc.get_objects()  # the frozen ones are in no generation
                assert not any(o is daemon.drivers for o in young)
            else:
                assert gc.get_freeze_count() == 0
                assert any(o is daemon.drivers for o in gc.get_objects())
    finally:
        heap.thaw()
