"""`[dsx_flex]` in the site file."""

from __future__ import annotations

from drivers.core.spec import Strict


class DsxFlexConfig(Strict):
    agent_id: str
