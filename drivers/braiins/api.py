"""Braiins OS+ public gRPC API (package braiins.bos.v1): what the driver, the simulator and the
fan-out floor share, so the three cannot drift.

The messages and grpclib stubs are generated from `proto/bos_v1.proto` (our own minimal copy
of the API's wire facts; `proto/generate.py` regenerates them). The API listens on TCP 50051
(HTTP/2, no TLS on a miner's LAN). `AuthenticationService.Login` answers a token; every other
call carries it in its "authorization" metadata, as the bare token. A token lapses after the
`timeout_s` the login answered; a call with a lapsed or unknown token is UNAUTHENTICATED.
"""

from __future__ import annotations

from pathlib import Path

from drivers.braiins.proto import bos_v1_pb2 as pb
from drivers.core.spec import DeviceAccess

PORT = 50051
"""gRPC API of Braiins OS+ (bos-plus-api README: "port 50051")."""
CGMINER_PORT = 4028
"""bosminer's cgminer-compatible JSON API (read only), kept for older tools."""
AUTH_METADATA = "authorization"
"""Metadata key of the token, in requests and in the login's initial metadata."""
DEFAULT_USERNAME = "root"
DEFAULT_PASSWORD = ""
"""A fresh Braiins OS+ logs `root` in without a password until one is set."""
TOKEN_TIMEOUT_S = 3600
"""A token's lifetime as Braiins OS+ answers it (one hour)."""

LOGIN = "/braiins.bos.v1.AuthenticationService/Login"
SET_POWER_TARGET = "/braiins.bos.v1.PerformanceService/SetPowerTarget"

# Readable names for the enums the driver judges by.
PAUSED = pb.MINER_STATUS_PAUSED
NORMAL = pb.MINER_STATUS_NORMAL
NOT_STARTED = pb.MINER_STATUS_NOT_STARTED


def credentials(access: DeviceAccess) -> tuple[str, str]:
    """(username, password) for Login: the template's, else Braiins OS+'s defaults; the
    password from `password` or the first line of `password_file`.

    Reads a file (blocking): call at construction, never per request.
    """
    password = access.password
    if password is None and access.password_file is not None:
        try:
            text = Path(access.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read password_file {access.password_file}: {exc}") from None
        password = text.splitlines()[0] if text else ""
    username = DEFAULT_USERNAME if access.username is None else access.username
    return username, DEFAULT_PASSWORD if password is None else password


def set_power_target_request(watts: int) -> pb.SetPowerTargetRequest:
    """What the driver sends for a RUN command: the target in whole watts, saved and applied
    (without forcing a restart of the miner's tuner)."""
    return pb.SetPowerTargetRequest(
        save_action=pb.SAVE_ACTION_SAVE_AND_APPLY, power_target=pb.Power(watt=watts)
    )


def model_name(access_model: str | None, kind: str) -> str:
    """The model as Braiins OS+ names it ("Antminer S21"), from the template's `access.model`."""
    if not access_model:
        return kind
    return (
        access_model if access_model.lower().startswith("antminer") else f"Antminer {access_model}"
    )


__all__ = [
    "AUTH_METADATA",
    "CGMINER_PORT",
    "DEFAULT_PASSWORD",
    "DEFAULT_USERNAME",
    "LOGIN",
    "NORMAL",
    "NOT_STARTED",
    "PAUSED",
    "PORT",
    "SET_POWER_TARGET",
    "TOKEN_TIMEOUT_S",
    "credentials",
    "model_name",
    "pb",
    "set_power_target_request",
]
