"""The processes the chaos bench kills: a broker it can SIGKILL and start again on the same
port, and a supervisor that plays systemd's `Restart=on-failure` for `rampd run`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from controller.tools.bench.site_run import BenchError, Site, spawn, stop_process
from controller.tools.broker import find_mosquitto, free_port, reachable

RESTART_SEC: Final = 1.0
"""systemd's RestartSec: the pause between the daemon's death and its next start."""
START_LIMIT: Final = (5, 60.0)
"""systemd's StartLimitBurst / StartLimitIntervalSec, for exits the bench did not cause."""
CLEAN_EXITS: Final = frozenset(
    {0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP, -signal.SIGPIPE}
)
"""Exits `Restart=on-failure` does not restart."""
BROKER_START_S: Final = 10.0


class ChaosBroker:
    """mosquitto on 127.0.0.1 and a fixed free port, killed (SIGKILL) and started again at
    will; anonymous, no persistence (a restart loses sessions, as a crash would)."""

    def __init__(self, out: Path) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise BenchError("the chaos bench kills the broker: it needs mosquitto installed")
        self.exe = exe
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf = out / "mosquitto.conf"
        self.log = out / "mosquitto.log"
        self._proc: asyncio.subprocess.Process | None = None
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            # A dispatch burst must not be dropped for a busy subscriber (README "Broker").
            "max_queued_messages 100000\n",
            encoding="utf-8",
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start it and wait (bounded) until it listens; retried while the port is still
        held by the killed one."""
        if self.running:
            return
        deadline = time.monotonic() + BROKER_START_S
        while True:
            with self.log.open("ab") as fh:
                self._proc = await asyncio.create_subprocess_exec(
                    self.exe,
                    "-c",
                    str(self.conf),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=fh,
                    stderr=fh,
                    start_new_session=True,
                )
            while self._proc.returncode is None and time.monotonic() < deadline:
                if await reachable(self.host, self.port, 0.2):
                    return
                await asyncio.sleep(0.05)
            if time.monotonic() >= deadline:
                await self.stop()
                raise BenchError(f"mosquitto did not listen on port {self.port} (see {self.log})")
            await asyncio.sleep(0.2)  # it exited (port not free yet): again

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    async def stop(self) -> None:
        if self._proc is not None:
            await stop_process(self._proc, 5.0)

    async def __aenter__(self) -> ChaosBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass(slots=True)
class DaemonExit:
    at: float
    code: int
    killed: bool
    """The bench killed it (a planned fault), else it exited on its own."""
    restarted_at: float | None = None


class DaemonSupervisor:
    """Watches `site.daemon`; when it dies other than cleanly, starts `rampd run` again with
    the same config (so the same journal) after RESTART_SEC and puts it in `site.daemon`."""

    def __init__(self, site: Site, restart_s: float = RESTART_SEC) -> None:
        self.site = site
        self.restart_s = restart_s
        self.exits: list[DaemonExit] = []
        self._kill_pending = False
        self._news = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-supervisor")

    def check(self) -> None:
        """Raise what stopped the supervisor (a crash loop, a clean exit)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    @property
    def unplanned(self) -> list[DaemonExit]:
        return [e for e in self.exits if not e.killed]

    def kill(self) -> float:
        """SIGKILL the daemon now; returns the unix time."""
        self._kill_pending = True
        with contextlib.suppress(ProcessLookupError):
            self.site.daemon.kill()
        return time.time()

    async def restarted_after(self, t: float, within: float) -> float:
        """When the supervisor started the daemon again after unix time t."""
        async with asyncio.timeout(within):
            while True:
                news = self._news
                self.check()
                for e in self.exits:
                    if e.at >= t - 1.0 and e.restarted_at is not None and e.restarted_at >= t:
                        return e.restarted_at
                await news.wait()

    async def _run(self) -> None:
        run_cfg = str(self.site.out / "site.toml")
        try:
            while True:
                code = await self.site.daemon.wait()
                e = DaemonExit(time.time(), code, self._kill_pending)
                self._kill_pending = False
                self.exits.append(e)
                if code in CLEAN_EXITS:
                    raise BenchError(f"rampd run exited with {code}: Restart=on-failure stops")
                burst, window = START_LIMIT
                if sum(1 for x in self.unplanned if x.at > e.at - window) >= burst:
                    raise BenchError(f"rampd run exited {burst} times within {window:.0f} s")
                await asyncio.sleep(self.restart_s)
                self.site.daemon = await spawn(["run", "-c", run_cfg], self.site.out / "rampd.log")
                e.restarted_at = time.time()
                self._wake()
        finally:
            self._wake()  # a waiter sees the failure at once

    def _wake(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def close(self) -> None:
        """Stop supervising, then stop the daemon in place (SIGTERM)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BenchError):
                await self._task
        await stop_process(self.site.daemon)
