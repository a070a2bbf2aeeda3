"""The agent's metrics, on the daemon's registry. Label values come from fixed sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

TARGET_RESULTS: Final = (
    "applied",
    "duplicate",
    "unknown_isv",
    "envelope",
    "signature",
    "payload",
    "feed",
    "stale",
)
"""`applied`, a redelivered event (`duplicate`: ignored), or why it was refused."""
ENFORCEMENT_RESULTS: Final = (
    "journalled",
    "duplicate",
    "unknown_infra",
    "envelope",
    "signature",
    "payload",
    "stale",
)
MESSAGES: Final = ("status", "breach")
BREACH_STATUSES: Final = ("active", "escalated", "resolved")


class DsxMetrics:
    def __init__(self, registry: CollectorRegistry, zones: Sequence[str] = ()) -> None:
        """`zones`: the zone devices the feeds name (the label's values)."""
        self.targets = Counter(
            "rampd_dsx_flex_targets_total",
            "DSX Flex load target messages: applied, duplicate (ignored) or refused and why",
            ["result"],
            registry=registry,
        )
        self.enforcements = Counter(
            "rampd_dsx_flex_enforcements_total",
            "DSX Flex enforcement events: journalled, duplicate or refused and why",
            ["result"],
            registry=registry,
        )
        self.published = Counter(
            "rampd_dsx_flex_published_total",
            "DSX Flex messages handed to the broker connection, by message",
            ["message"],
            registry=registry,
        )
        self.breaches = Counter(
            "rampd_dsx_flex_breach_alerts_total",
            "DSX Flex breach alerts raised, by status",
            ["status"],
            registry=registry,
        )
        self.connected = Gauge(
            "rampd_dsx_flex_connected",
            "1 while the DSX Flex agent is connected to its broker",
            registry=registry,
        )
        self.ceiling = Gauge(
            "rampd_dsx_flex_ceiling_watts",
            "The DSX Flex rail's level in force (NaN: no constraint)",
            registry=registry,
        )
        self.zone_ceiling = Gauge(
            "rampd_dsx_flex_zone_ceiling_watts",
            "The ceiling a DSX Flex zone feed's target puts on its zone (NaN: none)",
            ["zone"],
            registry=registry,
        )
        for z in zones:
            self.zone_ceiling.labels(z).set(float("nan"))
        for r in TARGET_RESULTS:
            self.targets.labels(r)
        for r in ENFORCEMENT_RESULTS:
            self.enforcements.labels(r)
        for m in MESSAGES:
            self.published.labels(m)
        for s in BREACH_STATUSES:
            self.breaches.labels(s)
        self.ceiling.set(float("nan"))
