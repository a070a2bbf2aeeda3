"""`[dsx_flex]`: keys checked at load, the DSX broker over the site's, what is refused; and
the JWS checks (ES256, RS256, the key's algorithm only)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws

from controller.config import ConfigError, LoadedConfig, load_config
from controller.northbound.dsx_flex.signing import SignatureError, Verifier
from tests.dsx_isv import IsvKey

SITE = """
site_id = "t1"
[mqtt]
host = "127.0.0.1"
port = 1884
client_id = "rampd-t1"
username = "site"
password = "pw"
[site]
max_kw = 1000
[meter]
host = "127.98.8.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
address = "127.98.8.2"
overrides = {{ port = 1502 }}
[dsx_flex]
agent_id = "f1"
isv_ids = ["acme"]
{extra}
"""


def load(tmp_path: Path, extra: str) -> LoadedConfig:
    p = tmp_path / "site.toml"
    p.write_text(SITE.format(extra=extra))
    return load_config(p)


def keys_table(*keys: IsvKey) -> str:
    return "[dsx_flex.keys]\n" + "".join(f'{k.kid} = "{k.public_pem}"\n' for k in keys)


def test_defaults_and_the_broker_inherited_from_the_site(tmp_path: Path) -> None:
    key = IsvKey.create(tmp_path, "k1")
    cfg = load(tmp_path, keys_table(key))
    dsx = cfg.site.dsx_flex
    assert dsx is not None
    assert dsx.role == "dsx-flex-agent" and dsx.require_signature
    assert dsx.feed_map("t1") == {"t1": "site"}
    assert set(dsx.public_keys) == {"k1"} and dsx.public_keys["k1"].alg == "ES256"
    m = dsx.mqtt.resolve(cfg.site.mqtt)
    assert (m.host, m.port, m.username, m.password) == ("127.0.0.1", 1884, "site", "pw")
    assert m.client_id == "rampd-t1-dsx"  # never the site link's own id


def test_a_broker_of_its_own(tmp_path: Path) -> None:
    key = IsvKey.create(tmp_path, "k1", "RS256")
    extra = (
        'role = "poweragent"\n[dsx_flex.mqtt]\nport = 8883\nusername = "dsx"\n'
        'client_id = "dsx-1"\n' + keys_table(key)
    )
    cfg = load(tmp_path, extra)
    dsx = cfg.site.dsx_flex
    assert dsx is not None
    m = dsx.mqtt.resolve(cfg.site.mqtt)
    assert (m.host, m.port, m.username, m.client_id) == ("127.0.0.1", 8883, "dsx", "dsx-1")
    assert dsx.role == "poweragent" and dsx.public_keys["k1"].alg == "RS256"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("", "require_signature needs at least one key"),
        ('[dsx_flex.keys]\nk1 = "/nonexistent.pem"', "keys.k1: /nonexistent.pem: file not found"),
        (
            'require_signature = false\n[dsx_flex.feeds]\nmain = "zone:a"',
            "feeds.main: no device is named 'a' (zones: none: this site has no zone devices)",
        ),
        (
            'require_signature = false\n[dsx_flex.feeds]\na = "site"\nb = "site"',
            "one feed per place",
        ),
        ('require_signature = false\nsign_kid = "a1"', "go together"),
        ('require_signature = false\nrole = "isv"', "dsx-flex-agent"),
        ('require_signature = false\nagent_id = "a/b"', "without '/'"),
    ],
)
def test_bad_sections_are_refused_at_load(tmp_path: Path, extra: str, says: str) -> None:
    text = SITE.format(extra=extra)
    if 'agent_id = "a/b"' in extra:
        text = text.replace('agent_id = "f1"\n', "")
    p = tmp_path / "site.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="dsx_flex") as err:
        load_config(p)
    assert says in str(err.value), str(err.value)


def test_keys_that_are_not_usable_are_refused(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    files = {
        "p384": (
            p384.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "P-256",
        ),
        "small": (
            small.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "2048",
        ),
        "private": (
            p384.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "public",
        ),
        "junk": (b"hello", "not a public key"),
    }
    for name, (data, says) in files.items():
        f = tmp_path / f"{name}.pem"
        f.write_bytes(data)
        p = tmp_path / "site.toml"
        p.write_text(SITE.format(extra=f'[dsx_flex.keys]\n{name} = "{f}"'))
        with pytest.raises(ConfigError) as err:
            load_config(p)
        assert f"keys.{name}" in str(err.value) and says in str(err.value), str(err.value)


def test_a_jwk_file_is_a_key_too(tmp_path: Path) -> None:
    key = IsvKey.create(tmp_path, "k1")
    jwk = tmp_path / "k1.jwk.json"
    jwk.write_text(json.dumps(key.private.as_dict(private=False)))
    cfg = load(tmp_path, f'[dsx_flex.keys]\nk1 = "{jwk}"')
    dsx = cfg.site.dsx_flex
    assert dsx is not None
    token = key.sign({"targets": []})
    assert Verifier(dsx.public_keys).verify(token)[0] == "k1"


def _b64(obj: object) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256(secret: bytes) -> str:
    """The classic confusion attack: an HMAC keyed with the public key's bytes."""
    signing = f"{_b64({'alg': 'HS256', 'kid': 'es'})}.{_b64({'a': 1})}"
    mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(mac)}"


def test_verification_takes_only_the_configured_key_with_its_algorithm(tmp_path: Path) -> None:
    from controller.northbound.dsx_flex.signing import load_public_key

    es, rs = IsvKey.create(tmp_path, "es"), IsvKey.create(tmp_path, "rs", "RS256")
    v = Verifier({k.kid: load_public_key(k.kid, k.public_pem) for k in (es, rs)})
    assert v.verify(es.sign({"a": 1})) == ("es", b'{"a":1}')
    assert v.verify(rs.sign({"a": 1})) == ("rs", b'{"a":1}')
    other = IsvKey.create(tmp_path / "other", "es")  # the same kid, another key
    bad = {
        "another key": other.sign({"a": 1}),
        "unknown kid": IsvKey.create(tmp_path, "zz").sign({"a": 1}),
        "alg none": f"{_b64({'alg': 'none', 'kid': 'es'})}.{_b64({'a': 1})}.",
        "alg of the other key": jws.serialize_compact(
            {"alg": "RS256", "kid": "es"}, b"{}", rs.private
        ),
        "HS256 with the public key as secret": _hs256(es.public_pem.read_bytes()),
        "no kid": jws.serialize_compact({"alg": "ES256"}, b"{}", es.private),
        "garbage": "a.b.c",
    }
    for name, token in bad.items():
        with pytest.raises(SignatureError):
            v.verify(token)
            pytest.fail(name)


def test_plaintext_to_a_remote_dsx_broker_stops_the_start(tmp_path: Path) -> None:
    from controller.app import Daemon

    key = IsvKey.create(tmp_path, "k1")
    cfg = load(tmp_path, '[dsx_flex.mqtt]\nhost = "10.0.0.9"\n' + keys_table(key))
    with pytest.raises(ConfigError, match=r"dsx_flex\.mqtt: .*plaintext MQTT to '10\.0\.0\.9'"):
        Daemon(cfg)
