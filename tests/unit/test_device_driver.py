"""PerDeviceDriver's shared machinery, driven by a minimal in-memory protocol.

The protocol drivers' integration tests cover the same machinery over real sockets; these pin
the contract every protocol inherits (FAULT and recovery lines, bug isolation, a port over
its own rows only, clean cancellation) in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Unpack

import numpy as np
import pytest

from drivers.base import DeviceTimeout, Driver, PollPreempted
from drivers.core.command import Commands, Intent
from drivers.core.image import ProcessImage
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.device_driver import DriverOptions, PerDeviceDriver, Reading
from tests.helpers import CommandLog, cancel_and_wait, cmd, device_spec, log_records, until

log = logging.getLogger("rampd.drivers.memory")


class MemoryDriver(PerDeviceDriver[Reading]):
    """Devices are list slots; `broken` makes one fail like a dead device, `buggy` like a bug."""

    protocol = "memory"
    _log = log

    def __init__(self, image: ProcessImage, **options: Unpack[DriverOptions]) -> None:
        super().__init__(image.port("memory"), CommandLog(), name="mem", **options)
        self.power_w = [1000.0] * self.port.n
        self.intents: list[Intent] = []
        self.broken: set[int] = set()
        self.buggy: set[int] = set()
        self.swallow_cancel: set[int] = set()
        self.closed = False

    def _check(self, local: int) -> None:
        if local in self.broken:
            raise DeviceTimeout("no answer")
        if local in self.buggy:
            raise KeyError("oops")

    async def _read(self, local: int) -> Reading:
        self._check(local)
        if local in self.swallow_cancel:  # once, as Python 3.11's wait_for can in a library
            with suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
            self.swallow_cancel.discard(local)
        return Reading(self.power_w[local], DeviceState.ON)

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        self._check(local)
        self.power_w[local] = power_w
        self.intents.append(intent)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.closed = True


def specs(n: int, protocol: str = "memory") -> list[DeviceSpec]:
    return [
        device_spec(name=f"dev-{i}", protocol=protocol, p_max_w=2000.0, poll_s=0.02)
        for i in range(n)
    ]


@pytest.fixture
async def running() -> AsyncIterator[tuple[MemoryDriver, ProcessImage]]:
    fleet = ProcessImage(specs(3) + specs(1, "other"))  # row 3 belongs to another driver
    driver = MemoryDriver(fleet, backoff_base_s=0.02, backoff_cap_s=0.05)
    task = asyncio.create_task(driver.run())
    try:
        yield driver, fleet
    finally:
        await cancel_and_wait(task)
        assert task.done() and driver.closed  # released on cancellation


async def test_polls_fill_the_fleet_and_commands_are_reported(
    running: tuple[MemoryDriver, ProcessImage],
) -> None:
    driver, fleet = running
    assert isinstance(driver, Driver)
    await until(lambda: bool((fleet.state[:3] == DeviceState.ON).all()), 2, what="polled")
    with pytest.raises(IndexError):  # local 3 is past its port: not some other driver's row
        driver.submit(cmd(np.array([1, 3]), np.array([1500.0, 1.0])))
    assert driver.pending == 0
    driver.submit(cmd(np.array([1]), np.array([1500.0])))
    await until(lambda: driver.power_w[1] == 1500.0, 2, what="sent")
    await until(lambda: fleet.measured_w[1] == 1500.0, 2, what="polled back")
    assert driver.commands_ok == 1 and driver.pending == 0
    assert fleet.state[3] == DeviceState.UNKNOWN
    assert isinstance(driver._on_command, CommandLog)
    assert [(name, ok) for name, _, ok in driver._on_command] == [("mem", True)]


@pytest.mark.parametrize("failure", ["broken", "buggy"])
async def test_fault_is_isolated_logged_once_and_recovers(
    running: tuple[MemoryDriver, ProcessImage], failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    driver, fleet = running
    caplog.set_level(logging.INFO, logger=log.name)
    await until(lambda: bool((fleet.state[:3] == DeviceState.ON).all()), 2, what="polled")
    getattr(driver, failure).add(2)
    await until(lambda: fleet.state[2] == DeviceState.FAULT, 2, what="FAULT")
    driver.submit(cmd(np.array([2, 0]), np.array([500.0, 600.0])))
    await until(lambda: driver.power_w[0] == 600.0, 2, what="healthy device commanded")
    await until(lambda: driver.errors_by_device[2] >= 5, 2, what="failures go on")
    assert driver.faulted == 1 and (fleet.state[:2] == DeviceState.ON).all()

    getattr(driver, failure).clear()
    await until(lambda: fleet.state[2] == DeviceState.ON, 2, what="recovered")
    await until(lambda: driver.power_w[2] == 500.0, 2, what="queued command delivered")
    assert driver.faulted == 0 and driver.errors_by_device[:2].sum() == 0
    assert driver.poll_errors + driver.command_errors >= 5  # every failure counted ...
    # ... but said once per state change (the design's logging contract), whatever the
    # wording: one WARNING for the FAULT, one INFO for the recovery, and for a bug in our
    # handling of the device one ERROR with its traceback.
    said = caplog.messages
    assert len(log_records(caplog.records, log.name, logging.WARNING)) == 1, said
    assert len(log_records(caplog.records, log.name, logging.INFO)) == 1, said
    errors = log_records(caplog.records, log.name, logging.ERROR)
    assert len(errors) == (1 if failure == "buggy" else 0), [r.getMessage() for r in errors]
    assert all(r.exc_info for r in errors)


async def test_stops_even_when_a_library_swallows_the_cancellation() -> None:
    driver = MemoryDriver(ProcessImage(specs(2)))
    driver.swallow_cancel = {0, 1}
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0.1)  # both devices are inside a read now
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    if not done:  # the bug: its TaskGroup never cancels twice; stop the devices, then fail
        for t in asyncio.all_tasks():
            if t.get_name().startswith("mem:"):
                t.cancel()
        await asyncio.wait({task}, timeout=2.0)
    assert done and task.cancelled() and driver.closed


class BurstDriver(MemoryDriver):
    """Exchanges take time and share the concurrency limit, as on a real wire."""

    def __init__(self, image: ProcessImage, **options: Unpack[DriverOptions]):
        super().__init__(image, **options)
        self.polls_started: list[float] = []
        self.sent_at: list[float] = []

    async def _read(self, local: int) -> Reading:
        self.polls_started.append(asyncio.get_running_loop().time())
        await self._take_slot(local)
        try:
            await asyncio.sleep(0.01)
        finally:
            self._slots.release()
        return await super()._read(local)

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        await self._take_slot(local)
        try:
            await asyncio.sleep(0.02)
        finally:
            self._slots.release()
        await super()._command(local, power_w, intent)
        self.sent_at.append(asyncio.get_running_loop().time())


@pytest.mark.parametrize("yields", [True, False])
async def test_due_polls_wait_while_a_fleet_wide_command_drains(yields: bool) -> None:
    n, limit = 12, 2
    s = [
        device_spec(name=f"dev-{i}", protocol="memory", p_max_w=2000.0, poll_s=0.2)
        for i in range(n)
    ]
    fleet = ProcessImage(s)
    driver = BurstDriver(fleet, max_concurrency=limit)
    driver.polls_yield_to_bursts = yields  # type: ignore[misc]
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: bool((fleet.state == DeviceState.ON).all()), 2, what="polled")
        t0 = asyncio.get_running_loop().time()
        driver.submit(cmd(np.arange(n), np.full(n, 1500.0)))
        await until(lambda: driver.commands_ok == n, 3, what="burst sent")
        # 12 commands of 20 ms, 2 at a time: 120 ms, while polls fall due every 200 ms
        # (none is a period overdue). Until only `limit` are left, no poll starts.
        draining = driver.sent_at[n - limit - 1]
        started = [t for t in driver.polls_started if t0 < t < draining]
        assert (started == []) == yields, started
        await until(lambda: len(driver.polls_started) > n + 6, 2, what="polls resume")
    finally:
        await cancel_and_wait(task)


async def test_a_command_held_back_for_a_retry_does_not_hold_the_polls() -> None:
    n, limit = 40, 2
    s = [
        device_spec(name=f"dev-{i}", protocol="memory", p_max_w=2000.0, poll_s=2.0)
        for i in range(n)
    ]
    fleet = ProcessImage(s)
    # A long backoff: the dead device's command waits seconds for its retry.
    driver = BurstDriver(fleet, max_concurrency=limit, backoff_base_s=5.0, backoff_cap_s=5.0)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: bool((fleet.state == DeviceState.ON).all()), 4, what="polled")
        driver.broken.add(0)
        driver.submit(cmd(np.arange(n), np.full(n, 1500.0)))  # 40 x 20 ms, 2 at a time
        await until(lambda: driver.commands_ok == n - 1, 3, what="burst sent")
        sent = asyncio.get_running_loop().time()
        # Polls fall due every 50 ms: the ones held back by the burst go once the others
        # are answered, and later ones go when due, not a period late (at most 2 s
        # overdue) behind the dead device's retry.
        await until(lambda: sum(t > sent for t in driver.polls_started) >= 10, 1.0, what="polls go")
        assert driver.command_errors >= 1 and fleet.acked_w[0] != 1500.0
    finally:
        await cancel_and_wait(task)


class GatedDriver(MemoryDriver):
    """Polls wait at a gate before they take a connection slot, where they may give way."""

    def __init__(self, image: ProcessImage) -> None:
        super().__init__(image)
        self.gate = asyncio.Event()
        self.gate.set()
        self.at_gate = 0
        self.events: list[str] = []

    async def _read(self, local: int) -> Reading:
        self.at_gate += 1
        await self.gate.wait()
        try:
            await self._take_slot(local)
        except PollPreempted:
            self.events.append("yield")
            raise
        self._slots.release()
        self.events.append("poll")
        return await super()._read(local)

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        self.events.append("command")
        await super()._command(local, power_w, intent)


@pytest.mark.parametrize("overdue", [False, True])
async def test_a_waiting_poll_gives_way_to_a_command_unless_overdue(overdue: bool) -> None:
    s = [device_spec(name="dev", protocol="memory", p_max_w=2000.0, poll_s=0.3)]
    fleet = ProcessImage(s)
    driver = GatedDriver(fleet)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: driver.polls_ok == 1, 2, what="first poll")
        driver.gate.clear()
        await until(lambda: driver.at_gate == 2, 2, what="second poll at the gate")
        if overdue:  # held past a whole period beyond its due time: it must go first
            t_over = asyncio.get_running_loop().time() + 0.35
            await until(lambda: asyncio.get_running_loop().time() > t_over, 2, what="overdue")
        driver.submit(cmd(np.array([0]), np.array([1500.0])))
        del driver.events[:]
        driver.gate.set()
        await until(lambda: driver.commands_ok == 1 and driver.polls_ok >= 2, 3, what="both")
        # Given way, the poll is still due: it follows the command at once, not a period on.
        expected = ["poll", "command"] if overdue else ["yield", "command", "poll"]
        assert driver.events[: len(expected)] == expected
        assert driver.poll_errors == 0 and driver.faulted == 0
        assert fleet.acked_w[0] == 1500.0
    finally:
        await cancel_and_wait(task)


class OrderDriver(MemoryDriver):
    """Records the order in which commands take the (single) slot."""

    def __init__(self, image: ProcessImage, **options: Unpack[DriverOptions]):
        super().__init__(image, **options)
        self.order: list[int] = []

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        await self._take_slot(local)
        try:
            self.order.append(local)
            await asyncio.sleep(0.001)
        finally:
            self._slots.release()
        await super()._command(local, power_w, intent)


async def test_sleeps_go_first_in_a_burst() -> None:
    n = 8
    s = [
        device_spec(name=f"dev-{i}", protocol="memory", p_min_w=500.0, p_max_w=2000.0, poll_s=0.5)
        for i in range(n)
    ]
    fleet = ProcessImage(s)
    driver = OrderDriver(fleet, max_concurrency=1)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: driver.polls_ok == n, 2, what="first polls")
        sleep = np.array([0, 1, 0, 1, 0, 0, 1, 0], dtype=np.int8)
        driver.submit(Commands(np.arange(n), np.where(sleep, 0.0, 1500.0), sleep))
        await until(lambda: driver.commands_ok == n, 3, what="burst sent")
        # Sleeps (seconds before one acts) before every other, in row order.
        assert driver.order == [1, 3, 6, 0, 2, 4, 5, 7]
        assert [driver.intents[driver.order.index(k)] for k in (1, 0)] == [
            Intent.SLEEP,
            Intent.RUN,
        ]
    finally:
        await cancel_and_wait(task)


class IterationDriver(MemoryDriver):
    """Records the event-loop iteration in which each command starts."""

    def __init__(self, image: ProcessImage, **options: Unpack[DriverOptions]) -> None:
        super().__init__(image, **options)
        self.iteration = 0
        self.started_in: list[int] = []

    def count_iterations(self) -> None:
        """Runs once per loop iteration: each call schedules the next."""
        self.iteration += 1
        asyncio.get_running_loop().call_soon(self.count_iterations)

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        self.started_in.append(self.iteration)
        await super()._command(local, power_w, intent)


async def test_a_burst_is_woken_in_batches_so_the_loop_turns_between_them() -> None:
    n = 1000
    s = [device_spec(name=f"dev-{i}", protocol="memory", poll_s=1.0) for i in range(n)]
    fleet = ProcessImage(s)
    driver = IterationDriver(fleet, max_concurrency=n)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: driver.polls_ok >= n, 5, what="first polls")
        driver.count_iterations()
        driver.submit(cmd(np.arange(n), np.full(n, 1500.0)))
        await until(lambda: driver.commands_ok == n, 5, what="burst sent")
        per_iteration = np.bincount(driver.started_in)
        # All at once, the 1,000 commands would hold one iteration; other tasks (the control
        # cycle, other drivers' answers) get the loop between batches. (A device whose own
        # poll timer fires meanwhile sends unwoken: a few more than a batch.)
        assert per_iteration.max() < 2 * driver.wake_batch, per_iteration.max()
        assert np.count_nonzero(per_iteration) >= n // driver.wake_batch
    finally:
        await cancel_and_wait(task)
