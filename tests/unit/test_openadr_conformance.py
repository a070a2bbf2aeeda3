"""The conformance machinery itself: the vendored openadr3.yaml is the published one, each
erratum the test VTN applies is still needed (the unpatched document fails exactly there),
and the validation rejects what the specification rejects (so the tests that rely on it
can fail)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate as validate_spec

from tests.openadr_vtn import (
    ERRATA,
    IGNORE_OAUTH2_WARNING,
    SPEC_FILE,
    Conformance,
    payload_errors,
    raw_spec,
    spec,
)

pytestmark = pytest.mark.filterwarnings(IGNORE_OAUTH2_WARNING)

BASE = "http://127.0.0.1:8080/oadr"
SHA256 = "0a85f28a91565b3e2c7488d2a7a7a9afb11ce3ef6b35afddb328484720077006"
"""Of configs/standards/openadr3-3.1.1/openadr3.yaml (see its README.md)."""

STAMP = {"createdDateTime": "2024-06-01T00:00:00Z", "modificationDateTime": "2024-06-01T00:00:00Z"}
VEN = {"id": "v1", **STAMP, "objectType": "VEN", "venName": "site-a", "clientID": "c1"}
EVENT = {
    "id": "e1",
    **STAMP,
    "objectType": "EVENT",
    "programID": "p1",
    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [4]}]}],
}
PROGRAM = {
    "id": "p1",
    **STAMP,
    "objectType": "PROGRAM",
    "programName": "cap",
    "payloadDescriptors": [
        {
            "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
            "payloadType": "IMPORT_CAPACITY_LIMIT",
            "units": "KW",
        }
    ],
}


@pytest.fixture(scope="module")
def conformance() -> Conformance:
    return Conformance(BASE)


def test_the_vendored_document_is_the_published_one() -> None:
    assert hashlib.sha256(SPEC_FILE.read_bytes()).hexdigest() == SHA256
    assert raw_spec()["info"]["title"] == "OpenADR 3 API"


def test_patched_document_is_valid_openapi() -> None:
    validate_spec(spec(BASE))


def others(erratum: str) -> tuple[str, ...]:
    return tuple(e for e in ERRATA if e != erratum)


def without(erratum: str) -> dict[str, Any]:
    return spec(BASE, errata=others(erratum))


def test_erratum_targets_default_still_needed() -> None:
    with pytest.raises(Exception, match="null          -"):
        validate_spec(without("targets default"))


def test_erratum_ven_object_type_still_needed() -> None:
    c = Conformance(BASE, errata=others("ven objectType"))
    # No objectType makes a stored ven valid: objectMetadata's and BlVenRequest's exclude
    # each other.
    for kind in ("VEN", "BL_VEN_REQUEST", "VEN_VEN_REQUEST"):
        assert c.schema_errors("ven", {**VEN, "objectType": kind}), kind


def test_erratum_discriminator_mapping_still_needed() -> None:
    c = Conformance(BASE, errata=others("discriminator mapping"))
    assert any("could not be resolved" in e for e in c.schema_errors("program", PROGRAM))
    note = {"objectType": "EVENT", "operation": "CREATE", "object": EVENT}
    assert any("could not be resolved" in e for e in c.schema_errors("notification", note))


def test_patched_document_accepts_the_objects(conformance: Conformance) -> None:
    assert conformance.schema_errors("ven", VEN) == []
    assert conformance.schema_errors("program", PROGRAM) == []
    note = {"objectType": "EVENT", "operation": "UPDATE", "object": EVENT}
    assert conformance.schema_errors("notification", note) == []


def req(method: str, path: str, body: Any = None, *, form: bytes | None = None) -> MockRequest:
    if form is not None:
        return MockRequest(
            "http://127.0.0.1:8080",
            method,
            "/oadr" + path,
            data=form,
            content_type="application/x-www-form-urlencoded",
        )
    data = None if body is None else json.dumps(body).encode()
    return MockRequest(
        "http://127.0.0.1:8080",
        method,
        "/oadr" + path,
        headers={"Authorization": "Bearer t"},
        data=data,
        content_type="application/json",
    )


def ok(api: OpenAPI, r: MockRequest) -> bool:
    try:
        api.validate_request(r)
    except Exception:
        return False
    return True


REPORT = {
    "eventID": "e1",
    "clientName": "site-a",
    "resources": [
        {
            "resourceName": "AGGREGATED_REPORT",
            "intervals": [
                {
                    "id": 0,
                    "intervalPeriod": {"start": "2024-06-01T12:00:00.000Z", "duration": "PT10S"},
                    "payloads": [{"type": "DEMAND", "values": [401.5]}],
                }
            ],
        }
    ],
}


def test_requests_rampd_sends_and_what_the_schema_refuses(conformance: Conformance) -> None:
    api = conformance.api
    assert ok(api, req("post", "/vens", {"objectType": "VEN_VEN_REQUEST", "venName": "site-a"}))
    assert not ok(api, req("post", "/vens", {"objectType": "VEN", "venName": "site-a"}))
    assert ok(api, req("post", "/reports", REPORT))
    assert not ok(
        api, req("post", "/reports", {k: v for k, v in REPORT.items() if k != "resources"})
    )
    bad_duration = json.loads(json.dumps(REPORT))
    bad_duration["resources"][0]["intervals"][0]["intervalPeriod"]["duration"] = "10 s"
    assert not ok(api, req("post", "/reports", bad_duration))
    good = b"grant_type=client_credentials&client_id=a&client_secret=b"
    assert ok(api, req("post", "/auth/token", form=good))
    assert not ok(
        api, req("post", "/auth/token", form=good.replace(b"client_credentials", b"password"))
    )
    assert not ok(api, req("get", "/events/e1/intervals"))  # no such path
    # Strict: a property the document does not define is refused in a request.
    assert ok(api, req("post", "/reports", {**REPORT, "comment": "x"}))
    assert not ok(conformance.strict, req("post", "/reports", {**REPORT, "comment": "x"}))
    assert ok(conformance.strict, req("post", "/reports", REPORT))
    ven = {"objectType": "VEN_VEN_REQUEST", "venName": "site-a"}
    assert ok(conformance.strict, req("post", "/vens", ven))
    assert not ok(conformance.strict, req("post", "/vens", {**ven, "site": "x"}))


def test_responses_the_schema_refuses(conformance: Conformance) -> None:
    api = conformance.api
    r = req("get", "/events")

    def resp(obj: Any, status: int = 200) -> bool:
        try:
            api.validate_response(
                r,
                MockResponse(
                    json.dumps(obj).encode(), status_code=status, content_type="application/json"
                ),
            )
        except Exception:
            return False
        return True

    assert resp([EVENT])
    assert not resp([{**EVENT, "priority": -1}])
    assert not resp([{**EVENT, "intervalPeriod": {"start": "0001-01-01"}}])  # needs a time
    assert not resp([{k: v for k, v in EVENT.items() if k != "programID"}])
    assert not resp({"title": "x"}, 418)


def test_enumerations() -> None:
    assert payload_errors("report", "DEMAND", [1.5]) == []
    assert payload_errors("report", "DEMAND", [-1.0])
    assert payload_errors("event", "IMPORT_CAPACITY_LIMIT", [1, 2])
    assert payload_errors("event", "X_PRIVATE", ["anything"]) == []


def test_openapi_core_without_errata_refuses_the_document() -> None:
    with pytest.raises(Exception, match="null          -"):
        OpenAPI.from_dict(raw_spec())
    OpenAPI.from_dict(spec(BASE), config=Config())
