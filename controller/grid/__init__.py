"""The grid the site is on: its frequency (a fast path of its own) and the services that act
on it by themselves (fast frequency response, under-frequency relays, droop)."""
