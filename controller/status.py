"""What the daemon says about itself: the mode and why (MQTT status, retained), systemd's
STATUS= line, the mode metric, and a journal event per change of mode."""

from __future__ import annotations

import logging

from controller.config import FailsafePolicy
from controller.cycle import ControlCycle
from controller.journal import EVENT_DISPATCH_DROPPED, Journal
from controller.metrics import Metrics
from controller.mqtt_link import MqttLink
from controller.notify import LastError, Notifier
from controller.target import TargetTracker

log = logging.getLogger("rampd")


class SiteStatus:
    def __init__(
        self,
        *,
        tracker: TargetTracker,
        cycle: ControlCycle,
        link: MqttLink,
        metrics: Metrics,
        notifier: Notifier,
        journal: Journal | None,
        failsafe_policy: FailsafePolicy,
        has_meter: bool,
    ) -> None:
        self._tracker = tracker
        self._cycle = cycle
        self._link = link
        self._metrics = metrics
        self._notifier = notifier
        self._journal = journal
        self._policy = failsafe_policy
        self._has_meter = has_meter
        self._mode = ""
        self.last_error = LastError()
        """Attach to the "rampd" logger: the last warning goes into STATUS=."""
        self._errors_said = 0

    def text(self) -> str:
        """systemd's STATUS= line."""
        counts = self._cycle.counts_by_state()
        last = self._cycle.last
        meter = "meter ok" if last is not None and last.meter_fresh else "meter stale"
        text = (
            f"mode {self._tracker.mode}; {counts['on']}/{self._cycle.image.n} devices on; {meter}"
        )
        error = self.last_error.text
        return f"{text}; last error: {error}" if error else text

    def detail(self) -> str:
        """Why the site is not simply following its dispatches ("" when it is)."""
        parts = [self._tracker.failsafe_reason]
        last = self._cycle.last
        if last is not None and not last.meter_fresh and self._has_meter:
            parts.append("site meter stale: controlling on device telemetry")
        if self._journal is not None:  # "" while its rows are written
            parts.append(self._journal.problem)
        return "; ".join(p for p in parts if p)

    def update(self) -> None:
        """After a dispatch and every cycle: publish what changed (the link publishes the
        status only when it differs from the last one)."""
        mode = self._tracker.mode
        if mode != self._mode:
            if self._mode:
                log.info("mode %s -> %s", self._mode, mode)
            if self._journal is not None:
                self._journal.record_event("mode", f"{self._mode or 'start'} -> {mode}")
                if mode == "failsafe" and self._policy != "hold":
                    self._journal.record_event(
                        EVENT_DISPATCH_DROPPED,
                        f"failsafe policy {self._policy}: dispatches dropped",
                    )
            self._mode = mode
            self._metrics.set_mode(mode)
            self._notifier.status(self.text())
        if self.last_error.count != self._errors_said:  # a new warning: say so in STATUS=
            self._errors_said = self.last_error.count
            self._notifier.status(self.text())
        self._link.set_status(mode, self.detail())
