"""rampd's messages: one typed model per message, each with one encoder and one decoder.

Pure: no asyncio, no MQTT. `dispatch` (in), `heartbeat` (in), `ack`, `status` and `telemetry`
(out); `timestamps` is the one time format, `signing` the one dispatch signature, `codec` the
JSON and field readers they share. The MQTT side is `controller.mqtt_link` (the daemon's
connection) and `controller.dispatcher` (a dispatcher's).
"""

from controller.wire.ack import Ack
from controller.wire.codec import MAX_PAYLOAD_BYTES, WireError
from controller.wire.dispatch import Dispatch, DispatchMode, DispatchRejected
from controller.wire.heartbeat import Heartbeat
from controller.wire.status import Status
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import parse_rfc3339, rfc3339

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Ack",
    "Dispatch",
    "DispatchMode",
    "DispatchRejected",
    "Heartbeat",
    "Status",
    "Telemetry",
    "WireError",
    "parse_rfc3339",
    "rfc3339",
]
