"""MicroBT Whatsminer miners over their API v2 (TCP 4028, AES-encrypted privileged commands):
the driver (`client`), the message set (`messages`), the token cryptography (`crypto`) and
the simulated miners (`sim_server`)."""
