"""The open-file soft limit is raised to the hard limit at start, in one log line."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from controller.fdlimit import raise_fd_limit


@pytest.fixture
def lowered() -> Iterator[tuple[int, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_soft_limit_goes_up_to_the_hard_limit_and_says_so(
    lowered: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    low, hard = lowered
    caplog.set_level(logging.INFO, logger="test.fdlimit")
    old, new = raise_fd_limit(logging.getLogger("test.fdlimit"))
    assert old == low
    soft_now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert new == soft_now and (hard == resource.RLIM_INFINITY or soft_now == hard)
    assert soft_now > low
    [line] = caplog.messages
    assert f"from {low} to {new}" in line

    caplog.clear()  # already there: nothing to raise, still one line
    assert raise_fd_limit(logging.getLogger("test.fdlimit")) == (new, new)
    [line] = caplog.messages
    assert str(new) in line
