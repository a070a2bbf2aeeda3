"""Fixtures shared by every test directory: a real mosquitto broker per test.

CI runs the tests on two cores, a module whole on one worker (`pytest -n 2 --dist loadfile`):
two modules may run at once, so each module's simulated devices live on loopback addresses
of their own (a block per module, named at its top)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.tools.broker import find_mosquitto
from tests.helpers import Mosquitto


def _start_broker(workdir: Path) -> Mosquitto:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail(
            "mosquitto not installed: these tests need a real broker "
            "(apt-get install mosquitto; CI installs it)",
            pytrace=False,
        )
    error: Exception | None = None
    for attempt in range(3):  # a free port can be taken between probe and bind
        broker = Mosquitto(exe, workdir / f"mosquitto-{attempt}")
        broker.workdir.mkdir(parents=True)
        try:
            broker.start()
            return broker
        except RuntimeError as exc:
            error = exc
    pytest.fail(f"mosquitto did not start: {error}", pytrace=False)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker on a free 127.0.0.1 port; stopped (killed on timeout) afterwards."""
    broker = _start_broker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def module_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker shared by the tests of a module (for process fixtures of module scope)."""
    broker = _start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield broker
    finally:
        broker.stop()

