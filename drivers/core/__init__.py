"""The neutral core shared by the controller and the drivers: device states and array aliases,
device specs, the process image and the ports drivers write it through, typed commands, and
the protocol registry. Nothing here imports the controller."""
