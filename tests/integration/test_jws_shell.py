"""A dispatcher that is not Python: the README's shell lines (bash, openssl, base64, tr, awk,
sed, mosquitto_pub) sign dispatches and heartbeats that rampd accepts, HS256 and ES256.

The shell below is the README's text, run as it stands (only the values it asks the reader
to set are prepended). First through `Dispatch.decode` with the keys a site file names, then
through a real broker to a real daemon: acked, in force, its heartbeats counted, while an
unsigned dispatch and an unsigned heartbeat from the same broker change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from controller.app import Daemon
from controller.config import SiteLimits, load_config
from controller.dispatcher import DispatcherClient
from controller.tools.broker import free_port
from controller.wire import Ack, Dispatch, DispatchRejected, rfc3339
from controller.wire.jws import Signer
from tests.helpers import Mosquitto, cancel_and_wait, until

# --- the README's lines (keep them identical: test_readme_carries_these_lines) -------------

KEYGEN = """\
openssl rand -hex 32 > desk-2025a.key                                # HS256: the shared secret
openssl ecparam -name prime256v1 -genkey -noout -out desk-2025b.pem  # ES256: the private key
openssl ec -in desk-2025b.pem -pubout -out desk-2025b.pub.pem        # and its public half
"""

HELPERS = r"""b64url() { base64 | tr '+/' '-_' | tr -d '=\n'; }
jws_hs256() {  # $1: the JSON to sign; $kid: a kid; $key: its secret file
  local data sig
  data=$(printf '{"alg":"HS256","kid":"%s"}' "$kid" | b64url).$(printf '%s' "$1" | b64url)
  sig=$(printf '%s' "$data" | openssl dgst -sha256 -hmac "$(cat "$key")" -binary | b64url)
  printf '%s.%s' "$data" "$sig"
}
jws_es256() {  # $1: the JSON to sign; $kid: a kid; $key: the private key (PEM)
  local data sig
  data=$(printf '{"alg":"ES256","kid":"%s"}' "$kid" | b64url).$(printf '%s' "$1" | b64url)
  sig=$(printf '%s' "$data" | openssl dgst -sha256 -sign "$key" | der2raw | b64url)
  printf '%s.%s' "$data" "$sig"
}
der2raw() {  # openssl's DER ECDSA signature -> the 64 bytes R||S that JWS wants
  local hex
  hex=$(openssl asn1parse -inform DER | awk -F: '/INTEGER/ {
    h = $NF; sub(/^0+/, "", h); while (length(h) < 64) h = "0" h; printf "%s", h }')
  printf "$(printf '%s' "$hex" | sed 's/../\\x&/g')"
}
"""

USAGE = """\
now=$(date -u +%Y-%m-%dT%H:%M:%SZ) seq=$(date +%s)
dispatch=$(printf '{"id":"desk-%s","seq":%s,"issued_at":"%s",' "$seq" "$seq" "$now"
           printf '"mode":"setpoint","target_kw":5000,"ramp_s":30}')
mosquitto_pub -L "mqtt://$broker/$root/dispatch" -q 1 -m "$(jws_hs256 "$dispatch")"
beat=$(printf '{"from":"desk","at":"%s"}' "$now")
mosquitto_pub -L "mqtt://$broker/$root/heartbeat" -m "$(jws_hs256 "$beat")"
"""

README_BLOCKS = (KEYGEN, HELPERS, USAGE)
LIMITS = SiteLimits(min_kw=0.0, max_kw=6000.0)
LAST_SEEN = "rampd_dispatcher_last_seen_timestamp_seconds"
ES256_USAGE = USAGE.replace("jws_hs256", "jws_es256")  # the README says so in words


def bash(script: str, cwd: Path) -> str:
    for tool in ("bash", "openssl", "base64", "awk", "sed", "tr"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed: the README's shell needs it", pytrace=False)
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def site_file(tmp_path: Path, *, meter_port: int = 1502, extra: str = "") -> Path:
    """A site with the README's two kids, their files where KEYGEN made them; `extra`: more
    sections ([mqtt], [metrics])."""
    p = tmp_path / "site.toml"
    lines = [
        'site_id = "jws"',
        "[site]",
        "max_kw = 6000",
        "[meter]",
        'host = "127.0.9.1"',
        f"port = {meter_port}",
        *extra.splitlines(),
        "[dispatch]",
        f'keys = {{ desk-2025a = "{tmp_path}/desk-2025a.key", '
        f'desk-2025b = "{tmp_path}/desk-2025b.pub.pem" }}',
        "[[devices]]",
        'name = "row"',
        'template = "modbus-load"',
        'address = "127.0.7.1"',
        "overrides = { p_max_kw = 6000 }",
    ]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_readme_carries_these_lines() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    if "jws_hs256" not in readme:
        pytest.skip("README has no JWS shell example yet")
    for block in README_BLOCKS:
        assert block in readme, block


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
def test_shell_signed_dispatch_decodes(tmp_path: Path, alg: str) -> None:
    bash(KEYGEN, tmp_path)
    kid, key, sign = {
        "HS256": ("desk-2025a", "desk-2025a.key", "jws_hs256"),
        "ES256": ("desk-2025b", "desk-2025b.pem", "jws_es256"),
    }[alg]
    # USAGE's lines that build the dispatch, then the signing function on its own.
    build = "".join(USAGE.splitlines(keepends=True)[:3])
    out = bash(f'kid={kid} key={key}\n{HELPERS}{build}{sign} "$dispatch"\n', tmp_path)
    keys = load_config(site_file(tmp_path)).dispatch_key
    assert keys is not None and keys.kids == ("desk-2025a", "desk-2025b")
    now = time.time()
    d = Dispatch.decode(out.encode(), now_unix=now, last_seq=None, limits=LIMITS, hmac_key=keys)
    assert (d.id, d.mode, d.target_w, d.ramp_s) == (f"desk-{d.seq}", "setpoint", 5e6, 30.0)
    assert abs(d.issued_at - now) < 5.0
    # Altered in transit: refused.
    head, payload, sig = out.split(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    altered = f"{head}.{tampered}.{sig}".encode()
    with pytest.raises(DispatchRejected) as info:
        Dispatch.decode(altered, now_unix=now, last_seq=None, limits=LIMITS, hmac_key=keys)
    assert info.value.code == "bad_signature"


class Grid:
    """The observer: the site's acks; and a publisher without keys."""

    def __init__(self, broker: Mosquitto, root: str) -> None:
        self.client = aiomqtt.Client(broker.host, broker.port, timeout=5)
        self.root = root
        self.acks: list[Ack] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Grid:
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.root}/ack", qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            self.acks.append(Ack.decode(m.payload))

    def ack(self, seq: int) -> Ack | None:
        return next((a for a in self.acks if a.seq == seq), None)


async def test_signed_dispatches_and_heartbeats_reach_a_real_daemon(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub not installed (apt-get install mosquitto-clients)")
    await asyncio.to_thread(bash, KEYGEN, tmp_path)
    root = "rampd/jws"
    metrics_at = f"127.0.0.1:{free_port('127.0.0.1')}"
    config = site_file(
        tmp_path,
        meter_port=free_port("127.0.0.1"),  # nothing listens: devices and meter not under test
        extra=(
            f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nprefix = "rampd"\n'
            f'reconnect_max_s = 1.0\n[metrics]\nlisten = "{metrics_at}"'
        ),
    )
    daemon = Daemon(load_config(config))
    gate = daemon.heartbeats
    values = f"broker={mosquitto.host}:{mosquitto.port} root={root}\n"
    task = asyncio.create_task(daemon.run())
    try:
        async with Grid(mosquitto, root) as grid:
            await until(lambda: daemon.link.connected, 10.0, what="daemon connected")
            hs = f"kid=desk-2025a key=desk-2025a.key {values}{HELPERS}{USAGE}"
            await asyncio.to_thread(bash, hs, tmp_path)
            await until(lambda: gate.accepted >= 1 and daemon.tracker.last_seq, 5.0, what="HS256")
            seq = daemon.tracker.last_seq
            assert seq is not None
            ack = await until(lambda: grid.ack(seq), 5.0, what="ack")
            assert ack.accepted, ack.reason
            assert daemon.tracker.active is not None and daemon.tracker.active.seq == seq

            # Without a key: an unsigned heartbeat and an unsigned dispatch change nothing.
            seen = daemon.metrics.registry.get_sample_value(LAST_SEEN)
            hb = json.dumps({"from": "intruder", "at": rfc3339(time.time())}).encode()
            await grid.client.publish(f"{root}/heartbeat", hb, qos=1)
            await until(lambda: gate.ignored == 1, 5.0, what="unsigned heartbeat ignored")
            assert daemon.metrics.registry.get_sample_value(LAST_SEEN) == seen  # no sign of life
            value = daemon.metrics.registry.get_sample_value("rampd_heartbeats_rejected_total")
            assert value == 1.0
            forged = {"id": "x", "seq": seq + 10**9, "issued_at": rfc3339(time.time()),
                      "mode": "setpoint", "target_kw": 0}  # fmt: skip
            await grid.client.publish(f"{root}/dispatch", json.dumps(forged).encode(), qos=1)
            bad = await until(lambda: grid.ack(seq + 10**9), 5.0, what="forged ack")
            assert not bad.accepted and "not signed" in bad.reason, bad.reason
            assert daemon.tracker.last_seq == seq

            # The other kid (rotation: both active), ES256, a second later (seq: seconds).
            await asyncio.sleep(max(0.0, seq + 1.05 - time.time()))
            es = f"kid=desk-2025b key=desk-2025b.pem {values}{HELPERS}{ES256_USAGE}"
            await asyncio.to_thread(bash, es, tmp_path)
            await until(lambda: (daemon.tracker.last_seq or 0) > seq, 5.0, what="ES256")
            ack2 = await until(lambda: grid.ack(daemon.tracker.last_seq or 0), 5.0, what="ack")
            assert ack2.accepted, ack2.reason
            await until(lambda: gate.accepted >= 2, 5.0, what="ES256 heartbeat")
            assert gate.ignored == 1

            # rampd's own dispatcher client, with the same private key.
            signer = Signer.es256("desk-2025b", (tmp_path / "desk-2025b.pem").read_bytes())
            async with DispatcherClient(mosquitto.host, mosquitto.port, root, signer=signer) as d:
                ack3, _ = await d.send_acked("setpoint", 4000.0)
                assert ack3.accepted, ack3.reason
                await d.heartbeat()
                await until(lambda: gate.accepted >= 3, 5.0, what="client heartbeat")
            assert gate.ignored == 1 and daemon.tracker.active is not None
            assert daemon.tracker.active.target_w == 4e6
    finally:
        async with asyncio.timeout(15.0):
            await cancel_and_wait(task)
