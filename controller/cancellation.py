"""`stop_if_cancelled` lives in the neutral core (drivers use it too)."""

from drivers.core.cancellation import stop_if_cancelled

__all__ = ["stop_if_cancelled"]
