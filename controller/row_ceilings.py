"""Ceilings on single devices' setpoints, set from outside the control law, by device name.

A northbound interface caps one row (the DSX Flex agent: a zone feed's target caps that
zone's row in this parent's allocation); the control cycle reads every ceiling at once as one
array over its process image (`Snapshot.row_ceiling_w`). The array is rebuilt only when a
ceiling changes or the image does (a reload), with one lookup per capped device: the cycle
itself never loops over devices. A name the image does not have (a device a reload removed)
caps nothing.

Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import math

import numpy as np

from drivers.core.state import F64


class RowCeilings:
    def __init__(self) -> None:
        self._w: dict[str, float] = {}
        self._names: tuple[str, ...] | None = None
        self._array: F64 | None = None

    def set(self, name: str, ceiling_w: float | None) -> None:
        """Cap device `name` at `ceiling_w` (None: lift its cap). ValueError, changing
        nothing, for a ceiling that is not a finite number >= 0."""
        if ceiling_w is None:
            if self._w.pop(name, None) is not None:
                self._names = None
            return
        if not (math.isfinite(ceiling_w) and ceiling_w >= 0.0):
            raise ValueError(f"ceiling of {name}: {ceiling_w!r} W is not a finite number >= 0")
        if self._w.get(name) != ceiling_w:
            self._w[name] = float(ceiling_w)
            self._names = None

    def get(self, name: str) -> float | None:
        """The ceiling on `name` (None: none)."""
        return self._w.get(name)

    def array(self, names: tuple[str, ...]) -> F64 | None:
        """Per row of an image whose devices are `names`: its ceiling (+inf: none), or None
        when no row is capped. The same array until a ceiling or `names` changes (callers
        read it only)."""
        if self._names is not names:
            self._array = self._build(names)
            self._names = names
        return self._array

    def _build(self, names: tuple[str, ...]) -> F64 | None:
        if not self._w:
            return None
        out = np.full(len(names), np.inf)
        for name, w in self._w.items():  # the capped devices: a few zones
            try:
                out[names.index(name)] = w
            except ValueError:
                continue  # not in this image: caps nothing
        if not np.isfinite(out).any():
            return None
        out.flags.writeable = False
        return out
