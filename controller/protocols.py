"""The device protocols this daemon ships: importing their modules registers their drivers
(`drivers.core.registry`). The zone driver lives in the controller package (it speaks rampd's
own dispatch protocol over the daemon's MQTT settings) and registers the same way."""

from __future__ import annotations

import controller.zone.client
import drivers.antminer.client
import drivers.braiins.client
import drivers.breaker.client
import drivers.luxos.client
import drivers.modbus.client
import drivers.redfish.client
import drivers.whatsminer.client

BUILTIN = (
    drivers.antminer.client,
    drivers.braiins.client,
    drivers.breaker.client,
    drivers.luxos.client,
    drivers.modbus.client,
    drivers.redfish.client,
    drivers.whatsminer.client,
    controller.zone.client,
)
