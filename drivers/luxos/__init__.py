"""ASIC miners over the LuxOS API (TCP 4028): message set, driver, simulated miners."""
