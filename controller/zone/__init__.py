"""Zones: child rampd instances driven as devices, through the grid's own dispatch protocol.

Their messages are `controller.wire`'s models; `dynamics.py` turns a zone's capability into
its row's bounds and ramp rates; `client.py` is the driver.
"""
