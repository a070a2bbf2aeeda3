"""Fixtures of the integration tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture
def quiet_pyasic() -> Iterator[None]:
    """For tests that drive simulated miners with pyasic: pyasic 0.79 still declares pydantic
    v1-style config classes, which warn on import and use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
