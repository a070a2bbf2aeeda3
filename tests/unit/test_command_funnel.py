"""The command funnel and the mailbox: the only way a setpoint reaches a driver."""

from __future__ import annotations

import asyncio

import numpy as np

from drivers.base import Backoff, CommandFunnel, CommandMailbox


def funnel() -> CommandFunnel:
    return CommandFunnel(
        p_min_w=np.array([0.0, 100.0, 0.0]),
        p_max_w=np.array([1000.0, 500.0, 3000.0]),
        step_w=np.array([0.0, 0.0, 250.0]),
        deadband_w=np.array([10.0, 10.0, 0.0]),
    )


def test_clamps_quantizes_down_and_skips_within_deadband() -> None:
    f = funnel()
    rows = np.arange(3)
    sent, values = f.changed_rows(rows, np.array([2000.0, 50.0, 1999.0]))
    assert sent.tolist() == [0, 1, 2]
    assert values.tolist() == [1000.0, 100.0, 1750.0]
    # Within the deadband of what was sent: nothing goes out.
    sent, _ = f.changed_rows(rows, np.array([995.0, 105.0, 1800.0]))
    assert sent.tolist() == []
    sent, values = f.changed_rows(rows, np.array([980.0, 105.0, 2000.0]))
    assert sent.tolist() == [0, 2]
    assert values.tolist() == [980.0, 2000.0]


def test_forget_forces_a_resend_of_a_subset() -> None:
    f = funnel()
    rows = np.arange(3)
    f.changed_rows(rows, np.array([500.0, 200.0, 500.0]))
    f.forget(np.array([1]))
    sent, values = f.changed_rows(np.array([0, 1]), np.array([500.0, 200.0]))
    assert sent.tolist() == [1] and values.tolist() == [200.0]


async def test_mailbox_latest_value_wins_and_wakes_the_sender() -> None:
    box = CommandMailbox(4)
    assert not await box.wait(0.01)
    box.put(np.array([1, 3]), np.array([10.0, 30.0]))
    box.put(np.array([1]), np.array([11.0]))
    assert await box.wait(0.01)
    local, values = box.take()
    assert local.tolist() == [1, 3] and values.tolist() == [11.0, 30.0]
    assert box.pending == 0
    # A failed send goes back only if nothing newer arrived meanwhile.
    box.put(np.array([3]), np.array([31.0]))
    box.put_back(3, 30.0)
    box.put_back(1, 11.0)
    local, values = box.take()
    assert dict(zip(local.tolist(), values.tolist(), strict=True)) == {1: 11.0, 3: 31.0}
    waiter = asyncio.create_task(box.wait(5.0))
    await asyncio.sleep(0)
    box.put(np.array([0]), np.array([1.0]))
    assert await asyncio.wait_for(waiter, 1.0)


def test_backoff_grows_with_jitter_and_caps() -> None:
    import random

    b = Backoff(2, base_s=0.5, cap_s=4.0, rng=random.Random(1))
    delays = [b.failed(0, now=0.0) for _ in range(8)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays) and delays[-1] >= 2.0
    assert not b.ready(0, now=0.1) and b.ready(1, now=0.0)
    b.succeeded(0)
    assert b.ready(0, now=0.0) and b.failures(0) == 0
