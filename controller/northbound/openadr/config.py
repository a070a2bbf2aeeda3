"""`[openadr]` in the site file."""

from __future__ import annotations

from drivers.core.spec import Strict


class OpenAdrConfig(Strict):
    vtn_url: str
