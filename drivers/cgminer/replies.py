"""Reply pieces every cgminer-style firmware shares: the error a refused command raises, the
first item of a body list, and multi-commands ("a+b": each command's reply in a one-element
list under its name). Each firmware's `check` (its STATUS codes and refusals) stays its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from drivers.base import ProtocolError
from drivers.cgminer.wire import Json


class CommandError(ProtocolError):
    """The miner understood the request and refused it (STATUS "E")."""

    def __init__(self, command: str, code: int, msg: str) -> None:
        super().__init__(f"{command}: {msg} (code {code})")
        self.command = command
        self.code = code
        self.msg = msg


def first(reply: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """The first item of the body list `key`; ProtocolError if there is none."""
    try:
        item = reply[key][0]
    except (KeyError, IndexError, TypeError):
        raise ProtocolError(f"reply without {key}") from None
    if not isinstance(item, Mapping):
        raise ProtocolError(f"{key}[0] is not an object")
    return item


def multi_reply(parts: Mapping[str, Json]) -> Json:
    """A multi-command answer: each command's full reply wrapped in a one-element list."""
    out: Json = {cmd: [reply] for cmd, reply in parts.items()}
    out["id"] = 1
    return out


def split_multi(
    reply: Mapping[str, Any],
    commands: Sequence[str],
    check: Callable[[Mapping[str, Any], str], Json],
) -> dict[str, Json]:
    """The replies of a multi-command by command, each still unchecked; a single command's
    reply is returned as that command's. A reply refusing the whole multi-command (a firmware
    without them) raises what `check` raises for it."""
    if len(commands) == 1:
        return {commands[0]: dict(reply)}
    out: dict[str, Json] = {}
    for cmd in commands:
        part = reply.get(cmd)
        if not isinstance(part, list) or not part or not isinstance(part[0], Mapping):
            if "STATUS" in reply:  # refused as a whole
                check(reply, "+".join(commands))
            raise ProtocolError(f"multi-command reply without {cmd!r}")
        out[cmd] = dict(part[0])
    return out


__all__ = ["CommandError", "first", "multi_reply", "split_multi"]
