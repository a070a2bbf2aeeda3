"""Shared test helpers: a real mosquitto broker on a free loopback port, `until()`, and what
the protocol drivers' integration tests share (loopback nets, physics stepping, `DriverRig`).

Importable as `tests.helpers` (tests/ is a package; its conftest puts the repo root on
sys.path under pytest's default rootdir-based import mode).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import ipaddress
import logging
import math
import random
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.app import Daemon, Overrides
from controller.config import DeviceSpec, load_config
from controller.tools.broker import free_port
from drivers.core.command import Commands, Intent
from drivers.core.image import ProcessImage
from drivers.sim.physics import SitePhysics
from drivers.sim.site import SimSite

T = TypeVar("T")
DriverT = TypeVar("DriverT")

SIM_DT = 0.02
"""Physics step of the simulated devices in driver tests (50 Hz)."""


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    what: str | None = None,
) -> T:
    """Poll `predicate` (sync or async) until it returns something truthy; return that.

    Raises AssertionError naming the condition when `timeout` seconds pass first. The poll
    sleeps yield to the event loop, so the code under test keeps running.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = predicate()
        value: T = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


def _under(name: str, logger: str) -> bool:
    return name == logger or name.startswith(logger + ".")


def log_records(
    records: Iterable[logging.LogRecord], logger: str, level: int
) -> list[logging.LogRecord]:
    """The records of `logger` (or its children) at exactly `level`.

    For the tests where the line itself is the contract ("errors logged once per state
    change, no per-cycle spam"): they count records by logger and level, never by wording.
    """
    return [r for r in records if r.levelno == level and _under(r.name, logger)]


# The daemon's line format (controller/cli.py): "%(asctime)s %(levelname)s %(name)s %(message)s",
# asctime being "YYYY-MM-DD HH:MM:SS,mmm".
_DAEMON_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<name>\S+) (?P<message>.*)$")


def daemon_log_messages(text: str, logger: str, level: int) -> list[str]:
    """The messages of `logger` (or its children) at exactly `level` in a daemon's log file
    (traceback lines and other output are skipped): the file counterpart of `log_records`."""
    want = logging.getLevelName(level)
    out = []
    for line in text.splitlines():
        m = _DAEMON_LINE.match(line)
        if m and m["level"] == want and _under(m["name"], logger):
            out.append(m["message"])
    return out


class Mosquitto:
    """A real mosquitto on 127.0.0.1:<port>, anonymous, no persistence.

    `start()` / `stop()` / `kill()` can be repeated; the port stays the same, so a client
    can reconnect to a restarted broker. `listener_conf` replaces the lines after `listener`
    (default: anonymous access), e.g. TLS files, `password_file`, `acl_file`; it may be
    changed between a stop and a start. `extra_conf` lines go at the end of the file (e.g. a
    bridge: `connection`, `address`, `topic` lines).
    """

    def __init__(
        self,
        exe: str,
        workdir: Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        listener_conf: Sequence[str] = ("allow_anonymous true",),
        extra_conf: Sequence[str] = (),
    ) -> None:
        self.exe = exe
        self.host = host
        self.port = port or free_port(host)
        self.listener_conf = list(listener_conf)
        self.extra_conf = list(extra_conf)
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            + "".join(f"{line}\n" for line in self.listener_conf)
            + "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "max_keepalive 3600\n"
            # Default 1000: QoS 1 messages queued for a busy subscriber beyond that are
            # dropped (a dispatch burst would lose dispatches). See README "Broker settings".
            "max_queued_messages 100000\n" + "".join(f"{line}\n" for line in self.extra_conf)
        )

    def accepting(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait (bounded) until the port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_conf()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode} on port {self.port}:\n"
                    + self.log_tail()
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"mosquitto not accepting on port {self.port} in {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- TLS: a throwaway CA for servers and clients under test ---


class CertAuthority:
    """A test CA (EC P-256, valid for a day) that issues server and client certificates as
    PEM files in `workdir`; `ca_file` is what a peer configures to trust it."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        ca = (
            self._builder(self._subject, self._key.public_key(), ca=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = workdir / f"{name}-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool
    ) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        )

    def issue(self, cn: str, *, ips: Sequence[str] = (), client: bool = False) -> tuple[Path, Path]:
        """A leaf certificate for `cn`: a server one valid for `ips`, or (`client`) one for
        client authentication. Returns (cert, key) PEM files."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = self._builder(name, key.public_key(), ca=False).add_extension(
            x509.ExtendedKeyUsage([usage]), False
        )
        if ips:
            sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        pem = serialization.Encoding.PEM
        cert_file = self.workdir / f"{self.name}-{cn}.pem"
        key_file = self.workdir / f"{self.name}-{cn}-key.pem"
        cert_file.write_bytes(b.sign(self._key, hashes.SHA256()).public_bytes(pem))
        key_file.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert_file, key_file


def tls_material(workdir: Path, ips: Sequence[str], name: str) -> tuple[Path, Path, Path]:
    """A fresh test CA and a server certificate for `ips` signed by it: (ca, cert, key)."""
    ca = CertAuthority(workdir, name)
    cert, key = ca.issue("server", ips=ips)
    return ca.ca_file, cert, key


# --- protocol driver tests: simulated devices on loopback, physics in the background ---


_SPEC = DeviceSpec(
    name="d",
    kind="modbus_load",
    protocol="modbus",
    host="127.0.0.1",
    port=1502,
    unit=1,
    p_min_w=1000.0,
    p_max_w=10_000.0,
    p_idle_w=100.0,
    ramp_up_w_s=1000.0,
    ramp_down_w_s=2000.0,
    dead_time_s=0.0,
    wake_s=0.0,
    sleep_s=0.0,
    step_w=0.0,
    deadband_w=0.0,
    noise_w=0.0,
    priority=0,
    poll_s=1.0,
    timeout_s=1.0,
)


def device_spec(**fields: Any) -> DeviceSpec:
    """A device row: a continuous 10 kW load, no dead time or latency, no noise, polled every
    second; a test overrides what it is about."""
    return replace(_SPEC, **fields)


_MINER = replace(
    _SPEC,
    ramp_up_w_s=20_000.0,
    ramp_down_w_s=20_000.0,
    dead_time_s=0.05,
    wake_s=1.0,
    sleep_s=0.1,
    poll_s=0.3,
    timeout_s=0.5,
)


def miner_specs(net: str, n: int, *, name: str = "miner", **fields: Any) -> list[DeviceSpec]:
    """`n` miners on hosts net.1, net.2, ... named name-00, name-01, ...: polled every 0.3 s
    with a 0.5 s timeout and their dynamics sped up so driver tests take seconds; `fields` are
    the firmware's and the test's (kind, protocol, port, powers, access)."""
    base = replace(_MINER, **fields)
    return [replace(base, name=f"{name}-{i:02d}", host=f"{net}.{i + 1}") for i in range(n)]


def free_loopback_net(port: int = 0) -> tuple[str, int]:
    """A random 127.a.b net whose .1 can bind `port` (0: any free port), and that port.

    Each simulated device takes its own host of the net (127.x.y.z needs no setup on Linux);
    the net's other hosts are unused, so they can all listen on the same port.
    """
    rnd = random.Random()
    for _ in range(50):
        net = f"127.{rnd.randint(10, 250)}.{rnd.randint(1, 250)}"
        with socket.socket() as s:
            try:
                s.bind((f"{net}.1", port))
            except OSError:
                continue
            return net, int(s.getsockname()[1])
    raise RuntimeError("no free loopback address")


async def step_forever(ph: SitePhysics, dt: float = SIM_DT) -> None:
    """Step the physics on the monotonic clock (no drift, no bursts) until cancelled."""
    t0, k = time.monotonic(), 0
    while True:
        k += 1
        await asyncio.sleep(max(0.0, t0 + k * dt - time.monotonic()))
        ph.step(dt)


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait until every one has finished, whatever it raised."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def daemon_on_sim(
    site_toml: str, workdir: Path, mosquitto: Mosquitto, *, settle_heap: bool = False
) -> AsyncIterator[Daemon]:
    """The site `site_toml` simulated, and a daemon running on it in this process over the
    test broker; both stopped on the way out."""
    cfg_path = workdir / "site.toml"
    cfg_path.write_text(site_toml)
    cfg = load_config(cfg_path)
    sim = SimSite(cfg.sim_site)
    await sim.start()
    sim_task = asyncio.create_task(sim.run())
    daemon = Daemon(
        cfg, Overrides(mqtt=f"{mosquitto.host}:{mosquitto.port}"), settle_heap=settle_heap
    )
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        await cancel_and_wait(task, sim_task)
        await sim.close()


def cmd(
    local: Sequence[int] | np.ndarray, power_w: Sequence[float] | np.ndarray, *, sleep: bool = False
) -> Commands:
    """Commands for a driver, by local index: RUN at `power_w`, or SLEEP at it."""
    rows = np.asarray(local, dtype=np.intp)
    intent = Intent.SLEEP if sleep else Intent.RUN
    return Commands(
        rows, np.asarray(power_w, dtype=np.float64), np.full(len(rows), intent, dtype=np.int8)
    )


class CommandLog(list[tuple[str, float, bool]]):
    """A driver's `on_command` observer that keeps every (driver name, seconds, ok)."""

    def __call__(self, driver: str, seconds: float, ok: bool) -> None:
        self.append((driver, seconds, ok))


class _Closes(Protocol):
    async def close(self) -> None: ...


class _Runs(Protocol):
    async def run(self) -> None: ...


ServersT = TypeVar("ServersT", bound=_Closes)
RunsT = TypeVar("RunsT", bound=_Runs)


@dataclass
class MinerSite(Generic[ServersT]):
    """Simulated miners of one firmware on loopback, their physics stepped in the background."""

    specs: list[DeviceSpec]
    physics: SitePhysics
    servers: ServersT
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def start_site_of(
    specs: list[DeviceSpec],
    serve: Callable[[SitePhysics], Awaitable[ServersT]],
    *,
    seed: int,
) -> MinerSite[ServersT]:
    """Physics for `specs` (stepped until `stop_site`) and the servers `serve` starts on it."""
    ph = SitePhysics(specs, 0.0, seed=seed, dt_s=SIM_DT)
    servers = await serve(ph)
    return MinerSite(specs, ph, servers, [asyncio.create_task(step_forever(ph))])


async def stop_site(site: MinerSite[Any]) -> None:
    """Stop the site's tasks (physics, drivers), then its servers."""
    await cancel_and_wait(*site.tasks)
    await site.servers.close()


@dataclass
class DriverRig(Generic[DriverT]):
    """A protocol driver running against simulated devices, and what its tests look at."""

    specs: list[DeviceSpec]
    physics: SitePhysics
    image: ProcessImage
    driver: DriverT
    commands: CommandLog

    def polled(self, rows: Sequence[int] | None = None) -> bool:
        """Whether each of `rows` (default: all) has been polled at least once."""
        at = self.image.measured_at if rows is None else self.image.measured_at[list(rows)]
        return bool(np.isfinite(at).all())

    async def first_polls(self, timeout: float = 5.0) -> None:
        await until(self.polled, timeout, what="first polls")


@dataclass
class MinerRig(DriverRig[RunsT], Generic[RunsT, ServersT]):
    """A miner driver running against a `MinerSite`."""

    site: MinerSite[ServersT]


@asynccontextmanager
async def driving(
    site: MinerSite[ServersT],
    driver: Callable[[ProcessImage, CommandLog], RunsT],
    image_specs: Sequence[DeviceSpec] | None = None,
) -> AsyncIterator[MinerRig[RunsT, ServersT]]:
    """`driver` (built on a process image of `image_specs`, default the site's, and a command
    log) running against `site`; the site is stopped on the way out."""
    image = ProcessImage(site.specs if image_specs is None else image_specs)
    commands = CommandLog()
    drv = driver(image, commands)
    site.tasks.append(asyncio.create_task(drv.run()))
    try:
        yield MinerRig(site.specs, site.physics, image, drv, commands, site)
    finally:
        await stop_site(site)


def assert_finite_numbers(value: object) -> None:
    """Every number inside ``value`` (lists, tuples, dataclasses) is finite: what a device
    parser returns ends up in the fleet arrays, where a NaN or inf would poison sums."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        assert math.isfinite(value), value
    elif isinstance(value, list | tuple):
        for v in value:
            assert_finite_numbers(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            assert_finite_numbers(getattr(value, name))
