"""`[openadr]` in the site file, and reading the VTN's notifier binding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controller.config import ConfigError, load_config
from controller.northbound.openadr.config import OpenAdrConfig
from controller.northbound.openadr.notifier import (
    Broker,
    NotifierError,
    broker_of,
    tls_context,
    topic_names,
)

BASE = {
    "vtn_url": "https://vtn.example/openadr3/",
    "client_id": "site-a",
    "client_secret_file": "oadr.secret",
}


def cfg(**over: Any) -> OpenAdrConfig:
    return OpenAdrConfig.model_validate({**BASE, **over})


def test_defaults() -> None:
    c = cfg()
    assert c.vtn_url == "https://vtn.example/openadr3"  # no trailing slash: paths go below
    assert set(c.payloads) == {"IMPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT"}
    assert c.payloads["IMPORT_CAPACITY_LIMIT"].maps_to == "import_limit"
    assert c.payloads["DISPATCH_SETPOINT"].units == "KW"
    assert c.programs == [] and c.resource_name == "AGGREGATED_REPORT"


def test_payload_mapping_with_units() -> None:
    c = cfg(
        payloads={
            "IMPORT_CAPACITY_LIMIT": {"maps_to": "import_limit", "units": "MW"},
            "CONTROL_SETPOINT": {"maps_to": "setpoint"},
        }
    )
    assert c.payloads["IMPORT_CAPACITY_LIMIT"].units == "MW"
    assert c.payloads["CONTROL_SETPOINT"].maps_to == "setpoint"


@pytest.mark.parametrize(
    ("over", "problem"),
    [
        ({"vtn_url": "ftp://vtn"}, "http:// or https://"),
        ({"vtn_url": "http://vtn.example"}, "plaintext http"),
        ({"vtn_url": "https://vtn/?x=1"}, "query"),
        ({"payloads": {}}, "at least one"),
        ({"payloads": {"DISPATCH_SETPOINT": {"maps_to": "price"}}}, "maps_to"),
        ({"payloads": {"DISPATCH_SETPOINT": {"maps_to": "setpoint", "units": "kVA"}}}, "units"),
        ({"ven_name": ""}, "ven_name"),
        ({"poll": 5}, "poll"),  # a typo is an error, not a silent default
    ],
)
def test_bad_settings(over: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        cfg(**over)


def test_plaintext_allowed_on_loopback_or_when_told() -> None:
    assert cfg(vtn_url="http://127.0.0.1:8080/x").vtn_url == "http://127.0.0.1:8080/x"
    assert cfg(vtn_url="http://vtn.lan", allow_plaintext=True).allow_plaintext


def test_files_relative_to_the_site_file(tmp_path: Path) -> None:
    c = cfg(ca_file="/etc/ssl/vtn.pem").resolve(tmp_path / "site.toml")
    assert c.client_secret_file == tmp_path / "oadr.secret"
    assert c.ca_file == Path("/etc/ssl/vtn.pem") and c.mqtt_ca_file is None


def site(tmp_path: Path, openadr: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(
        f"""
site_id = "s"
[site]
max_kw = 100
[meter]
host = "127.99.8.1"
[[devices]]
name = "d"
template = "modbus-load"
address = "127.99.8.2"
[openadr]
{openadr}
"""
    )
    return p


def test_site_file_section(tmp_path: Path) -> None:
    loaded = load_config(
        site(
            tmp_path,
            """vtn_url = "https://vtn.example"
client_id = "c"
client_secret_file = "s.secret"
programs = ["ERCOT-LR"]
[openadr.payloads]
IMPORT_CAPACITY_LIMIT = { maps_to = "import_limit", units = "MW" }""",
        )
    )
    o = loaded.site.openadr
    assert o is not None and o.programs == ["ERCOT-LR"]
    assert (
        list(o.payloads) == ["IMPORT_CAPACITY_LIMIT"]
        and o.payloads["IMPORT_CAPACITY_LIMIT"].units == "MW"
    )
    with pytest.raises(ConfigError, match=r"openadr\.client_id"):
        load_config(site(tmp_path, 'vtn_url = "https://vtn.example"\nclient_secret_file = "x"'))


def test_notifier_binding() -> None:
    b = broker_of(
        {
            "WEBHOOK": True,
            "MQTT": {
                "URIS": ["wss://vtn/mqtt", "mqtts://broker.vtn:8884"],
                "serialization": "JSON",
                "authentication": {"method": "ANONYMOUS"},
            },
        },
        "me",
    )
    assert b == Broker("mqtts://broker.vtn:8884", "broker.vtn", 8884, True, "ANONYMOUS")
    b = broker_of(
        {
            "WEBHOOK": True,
            "MQTT": {
                "URIS": ["mqtt://b"],
                "serialization": "JSON",
                "authentication": {"method": "OAUTH2_BEARER_TOKEN", "username": "{clientID}"},
            },
        },
        "site-a",
    )
    assert b is not None and (b.port, b.tls, b.username) == (1883, False, "site-a")
    b = broker_of(
        {
            "WEBHOOK": True,
            "MQTT": {
                "URIS": ["mqtt://b"],
                "serialization": "JSON",
                "authentication": {"method": "OAUTH2_BEARER_TOKEN", "username": "oauth2"},
            },
        },
        "site-a",
    )
    assert b is not None and b.username == "oauth2"
    assert broker_of({"WEBHOOK": True}, "me") is None


@pytest.mark.parametrize(
    ("mqtt", "problem"),
    [
        ({"URIS": ["ws://b"], "serialization": "JSON"}, "no MQTT URI"),
        ({"URIS": ["mqtt://b"], "serialization": "CBOR"}, "serialization"),
        ({"URIS": ["mqtt://b"], "authentication": {"method": "KERBEROS"}}, "authentication"),
        ({"URIS": ["mqtt://b"], "authentication": {"method": "CERTIFICATE"}}, "caCert"),
        ({"URIS": "mqtt://b"}, "not a list"),
    ],
)
def test_notifier_binding_not_usable(mqtt: dict[str, Any], problem: str) -> None:
    with pytest.raises(NotifierError, match=problem):
        broker_of({"WEBHOOK": True, "MQTT": mqtt}, "me")


def test_certificate_binding_loads_its_pems(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ven")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    b = broker_of(
        {
            "WEBHOOK": True,
            "MQTT": {
                "URIS": ["mqtts://b"],
                "serialization": "JSON",
                "authentication": {
                    "method": "CERTIFICATE",
                    "caCert": pem,
                    "clientCert": pem,
                    "clientKey": key_pem,
                },
            },
        },
        "me",
    )
    assert b is not None and b.certificate is not None
    assert "clientKey" not in repr(b) and key_pem not in repr(b)
    assert tls_context(b, None) is not None
    plain = Broker("mqtt://b", "b", 1883, False, "ANONYMOUS")
    assert tls_context(plain, None) is None


def test_topic_names() -> None:
    assert topic_names(
        {"topics": {"CREATE": "c", "UPDATE": "u", "DELETE": "d", "ALL": "a/+"}}, "t"
    ) == ["a/+"]
    assert topic_names({"topics": {"UPDATE": "u", "DELETE": "d"}}, "t") == ["u", "d"]
    with pytest.raises(NotifierError):
        topic_names({"topic": {}}, "t")


def test_the_secret_file_is_read_at_start(tmp_path: Path) -> None:
    from controller.config import PeaksConfig
    from controller.market.peaks import Peaks
    from controller.market.rails import Rails
    from controller.metrics import Metrics
    from controller.northbound.context import NorthboundContext, build
    from controller.northbound.openadr.ven import Ven
    from controller.wire.telemetry import Telemetry

    loaded = load_config(
        site(tmp_path, 'vtn_url = "https://vtn.example"\nclient_id = "c"\nclient_secret_file = "s"')
    )
    ctx = NorthboundContext(
        cfg=loaded,
        rails=Rails(full_w=1e5, peaks=Peaks(PeaksConfig()), price=None),
        telemetry=lambda: Telemetry(at=0.0, mode="normal"),
        journal=None,
        metrics=Metrics("t"),
    )
    with pytest.raises(ConfigError, match=r"openadr\.client_secret_file: cannot read"):
        build(ctx)
    (tmp_path / "s").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Ven(ctx)
    (tmp_path / "s").write_text("s3cret\n")
    (ven,) = build(ctx)
    assert isinstance(ven, Ven) and ven.name == "openadr" and ven.ven_name == "s"
