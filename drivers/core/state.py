"""Device states and the numpy array aliases every layer uses (defined here only)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
Bool = npt.NDArray[np.bool_]
Rows = npt.NDArray[np.intp]


class DeviceState(IntEnum):
    ON = 0
    SLEEPING = 1
    WAKING = 2
    FAULT = 3
    UNKNOWN = 4
    UNRESPONSIVE = 5
    """Acknowledges commands but does not move (verified twice): like FAULT, out of
    control and out of the capability promise, while its driver retries with backoff."""


STATE_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in DeviceState)


def counts_by_state(state: I8) -> dict[str, int]:
    """Devices per state name (every name present, zeros included)."""
    counts = np.bincount(state.astype(np.intp), minlength=len(DeviceState))
    return {name: int(c) for name, c in zip(STATE_NAMES, counts, strict=True)}
