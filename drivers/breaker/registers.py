"""The feeder breaker's Modbus map, shared by the driver and the simulated breaker.

A feeder breaker (or contactor) with a remote trip/close input, an auxiliary contact and a
power meter on its feeder, over Modbus TCP. Addresses are PDU addresses (0-based); coils and
discrete inputs are bit addresses, registers their own space (separate tables, as on real
devices). 32-bit values are big-endian in bytes and words, as in drivers.modbus.registers.

    table             addr  name        type     meaning
    coil              0     close       bit  rw  1 close (run the feeder), 0 open (trip)
    discrete input    0     closed      bit  ro  auxiliary contact (52a): 1 contacts closed
    input registers   0     measured_w  float32  power through the breaker, W
                      2     close       uint16   the coil, as last written (the readback)
                      3     closed      uint16   the auxiliary contact, as discrete input 0
                      4     trips       uint32   open operations taken by command since power-up

The input registers are also readable as holding registers (FC3, read-only): one read of
six registers returns the whole state, whatever function a client prefers. A command is one
FC5 (write single coil) to coil 0.
"""

from __future__ import annotations

from drivers.modbus.registers import Reg, RegisterMap

CLOSE_COIL = 0
"""Coil: 1 closed (RUN), 0 open (SLEEP: tripped)."""
CLOSED_INPUT = 0
"""Discrete input: the auxiliary contact, the breaker's actual position."""

BREAKER_MAP = RegisterMap(
    "breaker",
    (
        Reg("measured_w", 0, "f32", unit="W"),
        Reg("close", 2, "u16"),
        Reg("closed", 3, "u16"),
        Reg("trips", 4, "u32"),
    ),
)
BREAKER_TELEMETRY = ("measured_w", "close", "closed", "trips")
"""One read: everything."""
TELEMETRY_ADDR, TELEMETRY_COUNT = BREAKER_MAP.span("measured_w", "trips")
