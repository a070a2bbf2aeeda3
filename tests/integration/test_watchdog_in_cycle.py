"""The watchdog is kicked by the control cycle on the event loop, not by a helper thread: when
the loop stalls, the kicks stop (a thread would keep kicking through a dead loop)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import Mosquitto, daemon_on_sim, until

SITE = """
site_id = "wd"
noncontrollable_kw = 50.0
[site]
max_kw = 1000
[metrics]
listen = "127.0.0.1:0"
[meter]
host = "127.68.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 4
address = "127.68.1.1"
overrides = { port = 1502 }
"""


SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
"""Linux's value; Python's socket module does not export it."""


class Listener(threading.Thread):
    """systemd's side of NOTIFY_SOCKET, on its own thread so it hears through a stalled loop.

    Each message is stamped with the kernel's arrival time (SO_TIMESTAMP, wall clock), not
    when this thread got round to reading it: on a loaded machine that can be much later.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.running = True

    def run(self) -> None:
        stamp = struct.calcsize("ll")
        while self.running:
            with contextlib.suppress(TimeoutError):
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(stamp))
                arrived = time.time()
                for level, kind, raw in ancdata:
                    if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMP):
                        sec, usec = struct.unpack("ll", raw[:stamp])
                        arrived = sec + usec / 1e6
                self.messages.append((arrived, data.decode()))

    def kicks(self, t0: float, t1: float) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m and t0 <= t <= t1]


async def test_a_stalled_loop_stops_the_watchdog(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = Listener(tmp_path / "notify.sock")
    listener.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a kick every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        async with daemon_on_sim(SITE, tmp_path, mosquitto):
            await until(lambda: any("READY=1" in m for _, m in listener.messages), 20)
            await until(lambda: len(listener.kicks(time.time() - 1.0, time.time())) >= 3, 5)
            t_block = time.time()
            time.sleep(1.5)  # noqa: ASYNC251 - the point: the loop, and the cycle on it, stuck here
            t_unblock = time.time()
            await until(lambda: listener.kicks(t_unblock, time.time()), 5)
            # Nothing while stuck (a datagram sent just before may land a hair after t_block).
            assert listener.kicks(t_block + 0.05, t_unblock - 0.05) == []
    finally:
        listener.running = False
        listener.join(2)
        listener.sock.close()
