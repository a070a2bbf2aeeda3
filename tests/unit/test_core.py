"""The neutral core: the process image and its ports, typed commands and their shaping, the
protocol registry, and the cycle's staleness verdict (made in its snapshot, not the image)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from controller.app import Daemon
from controller.config import ConfigError, load_config
from drivers.core import registry
from drivers.core.command import Commands, CommandShaper, Intent
from drivers.core.image import Limits, ProcessImage
from drivers.core.state import DeviceState
from tests.helpers import device_spec

SIM_SITE = Path(__file__).resolve().parents[2] / "configs" / "sim-site.toml"


def two_protocols() -> ProcessImage:
    # Interleaved on purpose: a driver's rows need not be contiguous.
    return ProcessImage(
        [device_spec(name=f"d{i}", protocol="luxos" if i % 2 else "modbus") for i in range(5)]
    )


def test_a_port_writes_its_own_rows_only() -> None:
    image = two_protocols()
    modbus, luxos = image.port("modbus"), image.port("luxos")
    assert modbus.rows.tolist() == [0, 2, 4] and luxos.rows.tolist() == [1, 3]
    for local in range(luxos.n):
        luxos.reading(local, 500.0 + local, DeviceState.ON)
        luxos.acknowledged(local, 700.0, Intent.SLEEP)
    luxos.fault(1)
    assert luxos.learned_limits(0, Limits(1.0, 2.0, 3.0, 4.0))
    # modbus's rows are as they were: nothing luxos can name reaches them.
    assert np.isnan(image.measured_at[modbus.rows]).all()
    assert (image.state[modbus.rows] == DeviceState.UNKNOWN).all()
    assert np.isnan(image.acked_w[modbus.rows]).all()
    assert image.p_max_w[modbus.rows].tolist() == [10e3] * 3
    assert image.measured_w[[1, 3]].tolist() == [500.0, 501.0]
    assert image.state[[1, 3]].tolist() == [DeviceState.ON, DeviceState.FAULT]
    assert luxos.acked(0) == (700.0, Intent.SLEEP)
    with pytest.raises(IndexError):
        luxos.reading(2, 1.0, DeviceState.ON)  # past its two rows
    with pytest.raises(IndexError):
        luxos.fault(-1)
    with pytest.raises(ValueError, match="already has its port"):
        image.port("luxos")
    with pytest.raises(ValueError, match="no device uses"):
        image.port("redfish")


def test_learned_limits_are_checked_and_counted() -> None:
    port = two_protocols().port("modbus")
    image_version = port._image.limits_version
    assert not port.learned_limits(0, port.limits(0))
    with pytest.raises(ValueError):
        port.learned_limits(0, Limits(5.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        port.learned_limits(0, Limits(0.0, 1.0, 0.0, 1.0))
    assert port._image.limits_version == image_version


def test_route_splits_commands_by_owner_into_local_indices() -> None:
    image = two_protocols()
    cmds = Commands(
        np.array([4, 1, 0, 3]),
        np.array([40.0, 10.0, 0.0, 30.0]),
        np.array([0, 1, 0, 0], dtype=np.int8),
    )
    routed = {owner: c for owner, c in image.route(cmds)}
    modbus, luxos = image.protocols.index("modbus"), image.protocols.index("luxos")
    assert routed[modbus].rows.tolist() == [2, 0] and routed[modbus].power_w.tolist() == [40, 0]
    assert routed[luxos].rows.tolist() == [0, 1] and routed[luxos].intent.tolist() == [1, 0]


def test_shaper_types_sleep_and_applies_the_deadband() -> None:
    shaper = CommandShaper(np.array([50.0, 0.0, 20.0]), np.array([10.0, 10.0, 0.0]))
    rows = np.arange(3)
    out = shaper.changed(rows, np.array([900.0, 400.0, 1750.0]), np.array([True, False, False]))
    assert out.rows.tolist() == [0, 1, 2]
    assert out.power_w.tolist() == [50.0, 400.0, 1750.0]  # asleep: its power asleep
    assert out.intent.tolist() == [Intent.SLEEP, Intent.RUN, Intent.RUN]
    # Within the deadband of what was sent: nothing; an intent change always goes.
    out = shaper.changed(rows, np.array([55.0, 405.0, 1750.0]), np.array([False, False, False]))
    assert out.rows.tolist() == [0] and out.intent.tolist() == [Intent.RUN]
    shaper.forget(np.array([1]))
    out = shaper.changed(rows, np.array([55.0, 405.0, 1750.0]), None)
    assert out.rows.tolist() == [1] and out.power_w.tolist() == [405.0]


def test_registry_knows_the_built_in_protocols_and_names_them_for_an_unknown_one() -> None:
    import controller.protocols  # noqa: F401

    builtin = {"antminer", "braiins", "luxos", "modbus", "redfish", "whatsminer", "zone"}
    assert set(registry.known()) >= builtin
    with pytest.raises(registry.UnknownProtocol, match="'bogus'; known: antminer, braiins, "):
        registry.lookup("bogus")


def test_config_with_an_unknown_protocol_fails_naming_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "odd.toml").write_text(
        'kind = "odd"\nprotocol = "snmp"\np_min_kw = 0\np_max_kw = 1\n'
        "ramp_up_kw_s = 1\nramp_down_kw_s = 1\n"
    )
    (tmp_path / "site.toml").write_text(
        'site_id = "s"\n[site]\nmax_kw = 10\n[meter]\nhost = "127.0.0.1"\n'
        '[[devices]]\nname = "o"\ntemplate = "odd"\naddress = "127.0.0.2"\n'
    )
    with pytest.raises(ConfigError, match="unknown device protocol 'snmp'; known: antminer, "):
        load_config(tmp_path / "site.toml")


def test_every_row_is_owned_by_exactly_one_driver() -> None:
    daemon = Daemon(load_config(SIM_SITE))
    image = daemon.image
    owned = np.concatenate([d.port.rows for d in daemon.drivers])
    assert sorted(owned.tolist()) == list(range(image.n))  # each row once, none left out
    for i, driver in enumerate(daemon.drivers):
        assert driver.port.protocol == image.protocols[i]
        assert all(image.specs[r].protocol == driver.port.protocol for r in driver.port.rows)


def test_staleness_is_in_the_snapshot_not_in_the_image() -> None:
    daemon = Daemon(load_config(SIM_SITE))
    port = daemon.drivers[0].port
    max_age = daemon.cfg.site.site.telemetry_max_age_s
    port.reading(0, 1000.0, DeviceState.ON, at=time.monotonic() - 10 * max_age)  # old
    port.reading(1, 1000.0, DeviceState.ON)  # fresh
    port.fault(2)
    out = daemon.cycle.tick()
    rows = port.rows[:3]
    assert out.snapshot.state[rows].tolist() == [
        DeviceState.UNKNOWN,
        DeviceState.ON,
        DeviceState.FAULT,
    ]
    assert daemon.image.state[rows].tolist() == [DeviceState.ON, DeviceState.ON, DeviceState.FAULT]
    assert out.counts_by_state()["unknown"] == daemon.image.n - 2
