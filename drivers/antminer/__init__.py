"""Antminers on Bitmain's stock firmware: the web interface's cgi API (HTTP digest auth),
its message set, the driver, and simulated miners (plus the cgminer-style RPC on 4028)."""
