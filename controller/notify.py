"""sd_notify over $NOTIFY_SOCKET: READY, WATCHDOG, STATUS, STOPPING (a few lines of stdlib).

The watchdog is kicked from the control cycle itself, so a stuck cycle stops the kicks and
systemd restarts the daemon; a helper thread would keep kicking through a dead loop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("rampd.notify")


class LastError(logging.Handler):
    """Remembers the newest warning or error logged by rampd, for systemd's STATUS= line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.text = record.getMessage()[:200]
        self.count += 1


class Notifier:
    """Does nothing when not started by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # '@' names a socket in the abstract namespace.
        self._addr = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        )
        self._last_kick = float("-inf")
        self._failing = False
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError as exc:  # never let supervision break control; say so once
            if not self._failing:
                log.warning("sd_notify failed: %s", exc)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.send(f"READY=1\nSTATUS={status}")
            self.ready_sent = True

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def kick(self, now: float) -> None:
        """Send WATCHDOG=1 at most every half WATCHDOG_USEC (now: monotonic seconds)."""
        if self.watchdog_interval_s is not None and now - self._last_kick >= (
            self.watchdog_interval_s
        ):
            self.send("WATCHDOG=1")
            self._last_kick = now

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
