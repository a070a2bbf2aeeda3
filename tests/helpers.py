"""Shared test helpers: a real mosquitto broker on a free loopback port, and `until()`.

Importable as `tests.helpers` (tests/ is a package; its conftest puts the repo root on
sys.path under pytest's default rootdir-based import mode).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from controller.broker import free_port

T = TypeVar("T")


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    what: str | None = None,
) -> T:
    """Poll `predicate` (sync or async) until it returns something truthy; return that.

    Raises AssertionError naming the condition when `timeout` seconds pass first. The poll
    sleeps yield to the event loop, so the code under test keeps running.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = predicate()
        value: T = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


class Mosquitto:
    """A real mosquitto on 127.0.0.1:<port>, anonymous, no persistence.

    `start()` / `stop()` / `kill()` can be repeated; the port stays the same, so a client
    can reconnect to a restarted broker.
    """

    def __init__(self, exe: str, workdir: Path, port: int | None = None) -> None:
        self.exe = exe
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "max_keepalive 3600\n"
        )

    def accepting(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait (bounded) until the port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_conf()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode} on port {self.port}:\n"
                    + self.log_tail()
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"mosquitto not accepting on port {self.port} in {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
