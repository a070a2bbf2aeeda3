"""The open-file soft limit is raised to the hard limit at start, in one log line."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from controller.fdlimit import raise_fd_limit
from tests.helpers import log_records


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
    # The one line is the contract (an operator sees the limit at start); counted by logger
    # and level, and it carries the figures, whatever the wording around them.
    [line] = log_records(caplog.records, "test.fdlimit", logging.INFO)
    assert {low, new} <= set(line.args or ()), line.args

    caplog.clear()  # already there: nothing to raise, still one line
    assert raise_fd_limit(logging.getLogger("test.fdlimit")) == (new, new)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new
    [line] = log_records(caplog.records, "test.fdlimit", logging.INFO)
    assert new in set(line.args or ()), line.args
