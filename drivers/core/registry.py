"""Protocol name -> driver factory. Each driver module registers itself when imported; the
daemon looks protocols up when it builds its drivers, and config loading checks them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from drivers.base import CommandObserver, Driver
    from drivers.core.image import DevicePort, ProcessImage
    from drivers.core.spec import DeviceSpec


class UnknownProtocol(LookupError):
    """No driver registered for a protocol; the message names the known ones."""


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What the daemon hands every driver besides its port: the command observer (metrics),
    the site's poll stretch, a concurrency limit, and settings only some protocols read (by
    name)."""

    on_command: CommandObserver | None = None
    poll_stretch: float = 1.0
    max_concurrency: int | None = None
    """Exchanges in flight per driver; None: the driver's own default."""
    settings: Mapping[str, object] = field(default_factory=dict)


class DriverFactory(Protocol):
    def __call__(self, port: DevicePort, ctx: DriverContext) -> Driver: ...


_factories: dict[str, DriverFactory] = {}


def register(protocol: str) -> Callable[[DriverFactory], DriverFactory]:
    """Decorator: `factory` builds the driver for every device of `protocol`."""

    def add(factory: DriverFactory) -> DriverFactory:
        if _factories.get(protocol, factory) is not factory:
            raise ValueError(f"protocol {protocol!r} registered twice")
        _factories[protocol] = factory
        return factory

    return add


def known() -> tuple[str, ...]:
    return tuple(sorted(_factories))


def lookup(protocol: str) -> DriverFactory:
    try:
        return _factories[protocol]
    except KeyError:
        raise UnknownProtocol(
            f"unknown device protocol {protocol!r}; known: {', '.join(known()) or 'none'}"
        ) from None


def check(specs: Sequence[DeviceSpec]) -> None:
    """UnknownProtocol for the first device whose protocol has no driver."""
    for spec in specs:
        if spec.protocol not in _factories:
            lookup(spec.protocol)


def build(image: ProcessImage, ctx: DriverContext) -> list[Driver]:
    """One driver per protocol of `image`, in `image.protocols` order (the cycle routes
    commands by that index), each built on the port over its own rows: every row has exactly
    one owner. UnknownProtocol, building nothing, when a protocol has no driver."""
    factories = [lookup(p) for p in image.protocols]
    return [f(image.port(p), ctx) for f, p in zip(factories, image.protocols, strict=True)]
