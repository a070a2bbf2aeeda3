"""The cgminer-style JSON API on TCP 4028 that every miner firmware here speaks (LuxOS, Braiins
OS+'s bosminer, Whatsminer's btminer, stock Antminer's bmminer): framing, the client's
exchange and the simulators' server side. Each firmware's message set stays in its own package.
"""
