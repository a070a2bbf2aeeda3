"""Readiness: READY=1 once, when every device reported and the meter is fresh; on a real socket."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import heap
from controller.notify import Notifier
from controller.readiness import Readiness


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Notifier]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    try:
        yield sock, notifier
    finally:
        notifier.close()
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(1.0)


def test_ready_once_when_every_device_reported_and_the_meter_is_fresh(
    notify_socket: tuple[socket.socket, Notifier],
) -> None:
    sock, notifier = notify_socket
    ready = Readiness(notifier)
    status_calls = 0

    def status() -> str:
        nonlocal status_calls
        status_calls += 1
        return "mode normal; 3/3 devices on; meter ok"

    assert not ready.check(all_seen=False, meter_ok=True, status=status)
    assert not ready.check(all_seen=True, meter_ok=False, status=status)
    assert received(sock) == [] and not ready.ready and status_calls == 0
    assert ready.check(all_seen=True, meter_ok=True, status=status)
    assert not ready.check(all_seen=True, meter_ok=True, status=status)
    assert received(sock) == ["READY=1\nSTATUS=mode normal; 3/3 devices on; meter ok"]
    assert ready.ready and status_calls == 1 and ready.frozen is None


def test_a_daemon_owning_its_process_freezes_the_heap_once(
    notify_socket: tuple[socket.socket, Notifier],
) -> None:
    _, notifier = notify_socket
    ready = Readiness(notifier, settle_heap=True)
    try:
        assert ready.check(all_seen=True, meter_ok=True, status=lambda: "ok")
        frozen = ready.frozen
        assert frozen is not None and frozen > 0 and gc.get_freeze_count() > 0
        assert not ready.check(all_seen=True, meter_ok=True, status=lambda: "ok")
        assert ready.frozen == frozen
    finally:
        heap.thaw()
