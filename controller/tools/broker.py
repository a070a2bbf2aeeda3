"""A local MQTT broker for demos and local runs: mosquitto when installed, else embedded amqtt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("rampd.broker")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """mosquitto on PATH, or where Debian puts it (sbin is not on every user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in MOSQUITTO_CANDIDATES if Path(p).is_file()), None
    )


async def reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), timeout_s)
    return True


class LocalBroker:
    """Start a throwaway broker on 127.0.0.1 and a free port; stop it on exit.

    `prefer="mosquitto"` uses the mosquitto binary when it is on PATH and falls back to the
    embedded amqtt broker (the `demo` extra) otherwise; `prefer="amqtt"` forces the latter.
    """

    def __init__(self, prefer: str = "mosquitto", port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.prefer = prefer
        self.kind = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._amqtt: Any = None

    async def __aenter__(self) -> LocalBroker:
        exe = find_mosquitto()
        if self.prefer == "mosquitto" and exe:
            await self._start_mosquitto(exe)
        else:
            await self._start_amqtt()
        deadline = asyncio.get_running_loop().time() + 10.0
        while not await reachable(self.host, self.port):
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(f"{self.kind} exited with {self._proc.returncode}")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{self.kind} did not listen on {self.host}:{self.port}")
            await asyncio.sleep(0.05)
        log.info("started %s broker on %s:%d", self.kind, self.host, self.port)
        return self

    async def _start_mosquitto(self, exe: str) -> None:
        self.kind = "mosquitto"
        self._tmp = tempfile.TemporaryDirectory(prefix="rampd-mosquitto-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        self._proc = await asyncio.create_subprocess_exec(
            exe,
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise RuntimeError(
                "no MQTT broker: install mosquitto (apt-get install mosquitto) "
                "or the embedded one (pip install 'rampd[demo]')"
            ) from None
        self.kind = "amqtt (embedded)"
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._amqtt = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await asyncio.wait_for(self._amqtt.start(), 10.0)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._amqtt is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._amqtt.shutdown(), 5.0)
        if self._tmp is not None:
            self._tmp.cleanup()
