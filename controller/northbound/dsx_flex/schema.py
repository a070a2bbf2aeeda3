"""dsx-flex.yaml's own schemas, applied at run time: every event the agent takes in is
validated against the official document (the envelope, then its verified data), beside the
code checks that give the precise reasons. The document ships in `configs/standards/`."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Final

import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT7

SPEC: Final = (
    Path(__file__).resolve().parents[3] / "configs" / "standards" / "dsx-flex" / "dsx-flex.yaml"
)
URI: Final = "urn:nvidia:dsx-flex:1.7.0"
EVENT_SCHEMAS: Final = {
    "grid.loadtarget.set.v1": ("LoadTargetSetEvent", "SetLoadTargetData"),
    "grid.powerstate.status.v1": ("PowerStateStatusEvent", "PowerStateStatusData"),
    "grid.powerbreach.alert.v1": ("PowerBreachAlertEvent", "PowerBreachAlertData"),
    "grid.powerbreach.enforcement.v1": (
        "PowerBreachEnforcementEvent",
        "PowerBreachEnforcementData",
    ),
}


@cache
def spec() -> dict[str, Any]:
    """The AsyncAPI document (read once; a missing or other version fails the agent's start)."""
    with SPEC.open() as fh:
        doc = yaml.safe_load(fh)
    version = doc.get("info", {}).get("version")
    if version != "1.7.0":
        raise ValueError(f"{SPEC}: DSX Flex {version!r}, this agent speaks 1.7.0")
    return dict(doc)


@cache
def _format_checker() -> jsonschema.FormatChecker:
    # Draft 7 plus `uuid` (a 2019-09 format the document uses throughout).
    checker = jsonschema.FormatChecker()
    for name, func in jsonschema.Draft7Validator.FORMAT_CHECKER.checkers.items():
        checker.checkers[name] = func
    checker.checkers["uuid"] = jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers["uuid"]
    return checker


@cache
def validator(schema: str) -> jsonschema.Draft7Validator:
    """A validator of `components.schemas.<schema>`, $refs resolved within the document."""
    if schema not in spec()["components"]["schemas"]:
        raise KeyError(schema)
    registry: Registry[Any] = Registry().with_resource(URI, DRAFT7.create_resource(spec()))
    return jsonschema.Draft7Validator(
        {"$ref": f"{URI}#/components/schemas/{schema}"},
        registry=registry,
        format_checker=_format_checker(),
    )


def errors(schema: str, instance: Any) -> list[str]:
    """Every schema error of `instance` (empty: valid), as path: message."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(schema).iter_errors(instance)
    ]


def first_error(schema: str, instance: Any) -> str | None:
    """The first schema error (None: valid); what a refusal's reason quotes."""
    found = errors(schema, instance)
    return None if not found else f"{schema}: {found[0]}"
