"""Config loading: good files expand templates; bad files name the file, the key and the problem."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controller.cli import main, summarize
from controller.config import ConfigError, load_config
from tests.helpers import log_records

REPO = Path(__file__).resolve().parents[2]

GOOD = """
site_id = "t1"
[site]
max_kw = 1000
[meter]
host = "127.0.9.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 3
address = "127.0.8.254"
overrides = { port = 1502, p_max_kw = 100 }
[[devices]]
name = "pdu-a"
template = "modbus-load"
address = "127.0.7.1"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def test_shipped_configs_load() -> None:
    for name in ("sim-site.toml", "example-site.toml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.devices


def test_sim_site_has_the_promised_shape() -> None:
    cfg = load_config(REPO / "configs" / "sim-site.toml")
    assert cfg.site.site_id == "sim"
    assert sum(d.protocol == "modbus" for d in cfg.devices) >= 50


def test_template_group_expands_with_overrides_and_address_carry(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    names = [d.name for d in cfg.devices]
    assert names == ["row-0000", "row-0001", "row-0002", "pdu-a"]
    assert [d.host for d in cfg.devices[:3]] == ["127.0.8.254", "127.0.8.255", "127.0.9.0"]
    assert cfg.devices[0].p_max_w == 100_000.0  # override, in W
    assert cfg.devices[3].p_max_w == 250_000.0  # template value
    assert cfg.devices[3].port == 502
    assert cfg.topic_root == "rampd/t1"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (GOOD.replace("max_kw = 1000", "max_kw = -5"), "site.max_kw", "greater than 0"),
        (GOOD.replace('site_id = "t1"', 'site_id = "a/b"'), "site_id", "letters"),
        (GOOD.replace("count = 3", "count = 0"), "devices.0.count", "greater than or equal"),
        (GOOD.replace("[meter]", "[meter]\nbogus = 1"), "meter.bogus", "Extra inputs"),
        (GOOD.replace('address = "127.0.7.1"', 'address = "nope"'), "devices.1.address", "IPv4"),
        (
            GOOD.replace("p_max_kw = 100", "p_max_kw = 1"),
            "devices.0.overrides",
            "p_min_kw must not exceed p_max_kw",
        ),
        (GOOD.replace('"modbus-load"\ncount', '"no-such"\ncount'), "template", "not found"),
        (
            GOOD.replace("[site]", '[failsafe]\npolicy = "baseline"\n[site]'),
            "failsafe",
            "baseline_kw",
        ),
        (GOOD.replace('host = "127.0.9.1"', 'host = "127.0.8.254"'), "devices", "share"),
    ],
)
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert key in msg
    assert problem in msg


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "site_id = [unclosed"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_check_config_summary_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, GOOD)
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "modbus_load" in out and "4" in out
    summary = summarize(load_config(good))
    # 3 rows of 100 kW + one of 250 kW.
    assert "550.0" in summary.splitlines()[-1]
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("max_kw = 1000", "max_kw = 'lots'"))
    with pytest.raises(SystemExit) as exc:
        main(["check-config", str(bad)])
    assert exc.value.code == 2
    assert "site.max_kw" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mqtt", "ok"),
    [
        ('host = "broker.site.internal"', False),
        ('host = "10.20.1.5"', False),
        ('host = "broker.site.internal"\nallow_plaintext = true', True),
        ('host = "broker.site.internal"\n[mqtt.tls]\nca_file = "/etc/ssl/ca.pem"', True),
        ('host = "127.0.0.1"', True),
        ('host = "::1"', True),
        ('host = "localhost"', True),
    ],
)
def test_plaintext_mqtt_off_this_host_is_refused_unless_allowed(
    tmp_path: Path, mqtt: str, ok: bool
) -> None:
    path = write(tmp_path, GOOD + "[mqtt]\n" + mqtt + "\n")
    if ok:
        load_config(path)
        return
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and "mqtt" in msg and "plaintext MQTT" in msg


def test_a_plaintext_broker_override_off_this_host_is_refused(tmp_path: Path) -> None:
    from controller.app import Daemon, Overrides

    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"--mqtt 10\.0\.0\.9:1883: plaintext MQTT"):
        Daemon(cfg, Overrides(mqtt="10.0.0.9:1883"))


def _many(count: int, poll_s: float, max_polls: str = "", age: str = "") -> str:
    return f"""
site_id = "big"
[site]
max_kw = 100000
{max_polls}
{age}
[meter]
host = "127.0.9.1"
port = 1502
[[devices]]
name = "rack"
template = "gpu-rack-redfish"
count = {count}
address = "127.1.0.1"
overrides = {{ poll_s = {poll_s} }}
"""


def test_polls_within_the_budget_are_not_stretched(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, _many(100, 1.0, "max_polls_per_s = 100")))
    assert cfg.poll_stretch == 1.0
    assert "device polls 100/s of at most 100/s" in summarize(cfg)


def test_polls_over_the_budget_stretch_every_period_alike(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, _many(1000, 0.5, "max_polls_per_s = 500")))
    assert cfg.poll_stretch == pytest.approx(4.0)  # 2,000 polls/s wanted
    assert "stretched 4.00x" in summarize(cfg)


def test_the_daemon_polls_within_the_budget_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from controller.app import Daemon, Overrides

    cfg = load_config(write(tmp_path, _many(1000, 0.5, "max_polls_per_s = 500")))
    with caplog.at_level(logging.WARNING, logger="rampd"):
        daemon = Daemon(cfg, Overrides())
    # What the budget does: every driver polls that much less often.
    assert [getattr(d, "poll_stretch", None) for d in daemon.drivers] == [pytest.approx(4.0)]
    # Said once at start, with its figures: one WARNING of the "rampd" loggers carries the
    # device count, the budget and the stretch (told apart by those, not by its wording).
    said = [
        r
        for r in log_records(caplog.records, "rampd", logging.WARNING)
        if isinstance(r.args, tuple)
        and 1000 in r.args
        and 500.0 in r.args
        and pytest.approx(4.0) in r.args
    ]
    assert len(said) == 1, caplog.messages


def test_a_stretch_that_would_leave_readings_stale_fails_at_start(tmp_path: Path) -> None:
    text = _many(1000, 1.0, "max_polls_per_s = 100", "telemetry_max_age_s = 15")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))  # 10x: every 10 s, over half of 15 s
    msg = str(err.value)
    assert "site.toml: site.max_polls_per_s" in msg and "telemetry_max_age_s (15 s)" in msg
    # The same devices with readings allowed to age 20 s pass.
    ok = _many(1000, 1.0, "max_polls_per_s = 100", "telemetry_max_age_s = 20")
    assert load_config(write(tmp_path, ok)).poll_stretch == pytest.approx(10.0)


def test_check_config_lists_each_class_strike_least_efficient_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The shipped simulated site's classes with their breakevens, worked out here from the
    templates' efficiencies: hashprice x (1 - pool fee) / (MWh a PH/s draws a day)."""
    site = Path(__file__).resolve().parents[2] / "configs" / "sim-site.toml"
    assert main(["check-config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "economics: hashprice 50 USD/PH/day, pool fee 2.0%" in out
    rows = out[out.index("class (curtailed first)") :].splitlines()[1:]
    strikes = {r.split()[0]: float(r.split()[1]) for r in rows if r.strip()}

    def breakeven(j_per_th: float) -> float:
        return round(50.0 * 0.98 / (j_per_th * 24 / 1e3), 2)

    assert strikes == {
        "whatsminer-m50s": breakeven(26.0),
        "whatsminer-m60s": breakeven(18.5),
        "antminer-s21-luxos": breakeven(17.5),
        "antminer-s21-braiins": breakeven(17.5),
        "antminer-s21-stock": breakeven(17.5),
        "gpu_rack": 2000.0,  # its work value, not a breakeven
    }
    assert list(strikes) == sorted(strikes, key=strikes.__getitem__)  # merit order
