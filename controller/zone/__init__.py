"""Zones: child rampd instances driven as devices, through the grid's own dispatch protocol.

`wire.py` reads what a zone publishes (status, telemetry with its capability, acks) and
writes what it takes (signed dispatches); `client.py` is the driver.
"""
