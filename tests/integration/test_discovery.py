"""`rampd discover` against a simulated mixed fleet over real sockets: every miner found with
its firmware and model, the right templates, and a written site file the daemon accepts.
Plus the pure parts: ranges, classification, stanzas."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller import discovery
from controller.cli import main
from controller.config import load_config, template_dirs
from drivers.sim.site import run_sim
from tests.helpers import free_loopback_net, until

# group name -> (template, count, firmware protocol, model as discovered)
FLEET = {
    "lux": ("antminer-s21-luxos", 3, "luxos", "S21"),
    "bos": ("antminer-s21-braiins", 2, "braiins", "S21"),
    "m60": ("whatsminer-m60s", 2, "whatsminer", "M60S"),
    "m50": ("whatsminer-m50s", 1, "whatsminer", "M50S"),
    "stock": ("antminer-s21-stock", 2, "antminer", "S21"),
}


def write_site(path: Path, net: str) -> None:
    """The fleet on consecutive addresses of `net`, a gap between groups; loads and the
    meter elsewhere (discovery must not take them for miners)."""
    lines = [
        'site_id = "disc"',
        "[site]",
        "max_kw = 1000.0",
        "[meter]",
        f'host = "{net}.250"',
        "port = 1502",
    ]
    host = 10
    for name, (template, count, _, _) in FLEET.items():
        lines += [
            "[[devices]]",
            f'name = "{name}"',
            f'template = "{template}"',
            f"count = {count}",
            f'address = "{net}.{host}"',
        ]
        host += count + 5
    lines += [
        "[[devices]]",
        'name = "row"',
        'template = "modbus-load"',
        "count = 2",
        f'address = "{net}.200"',
        "overrides = { port = 1502 }",
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    net, _ = free_loopback_net(4028)
    site = tmp_path / "sim.toml"
    write_site(site, net)
    cfg = load_config(site)
    stop = asyncio.Event()
    task = asyncio.create_task(run_sim(cfg.sim_site, tmp_path / "truth.jsonl", stop))
    truth = tmp_path / "truth.jsonl"
    # The truth log is written once every device is served and the physics steps.
    await until(lambda: truth.exists() and truth.stat().st_size > 0, 15.0, what="sim serving")
    yield net, site
    stop.set()
    await asyncio.wait_for(task, 15.0)


async def test_every_simulated_miner_is_found_with_its_firmware_model_and_template(
    fleet: tuple[str, Path], tmp_path: Path
) -> None:
    net, sim_site = fleet
    hosts = discovery.hosts_of([f"{net}.0/24"])
    found = discovery.with_templates(
        await discovery.scan(hosts, concurrency=64, timeout_s=1.0), template_dirs(sim_site)
    )
    sim = load_config(sim_site)
    miners = {d.host: d for d in sim.devices if d.protocol != "modbus"}
    assert {f.host for f in found} == set(miners)
    for f in found:
        group = miners[f.host].name.rsplit("-", 1)[0]
        template, _, protocol, model = FLEET[group]
        assert (f.protocol, f.model, f.template) == (protocol, model, template), f

    # The written site file loads and lists exactly the simulated miners, by template.
    out = tmp_path / "found.toml"
    out.write_text(discovery.site_file(found, site_id="found"))
    written = load_config(out)
    assert sorted((d.host, d.kind) for d in written.devices) == sorted(
        (d.host, d.kind) for d in miners.values()
    )
    assert len(written.site.devices) == len(FLEET)  # one stanza per run of addresses


async def test_the_cli_writes_a_site_file_the_daemon_accepts(
    fleet: tuple[str, Path], tmp_path: Path
) -> None:
    net, _ = fleet
    out = tmp_path / "site.toml"
    args = ["discover", f"{net}.0/25", "--write", str(out), "--timeout", "1"]
    assert await asyncio.to_thread(main, args) == 0
    assert await asyncio.to_thread(main, ["check-config", str(out)]) == 0
    assert len(load_config(out).devices) == sum(c for _, c, _, _ in FLEET.values())


async def test_nothing_answering_is_a_clear_failure(tmp_path: Path) -> None:
    net, _ = free_loopback_net(4028)
    assert await asyncio.to_thread(main, ["discover", f"{net}.1/30", "--timeout", "0.2"]) == 1


def test_ranges_are_checked_and_expanded_once() -> None:
    assert discovery.hosts_of(["10.0.0.0/30", "10.0.0.1"]) == [
        ipaddress.IPv4Address("10.0.0.1"),
        ipaddress.IPv4Address("10.0.0.2"),
    ]
    with pytest.raises(ValueError, match="not an IPv4"):
        discovery.hosts_of(["10.0.0.0/33"])
    with pytest.raises(ValueError, match="more than"):
        discovery.hosts_of(["10.0.0.0/8"])


def test_classification_by_each_firmwares_own_replies() -> None:
    lux = {"VERSION": [{"LUXminer": "2024.6", "Type": "Antminer S19j Pro"}]}
    assert discovery.classify(lux, None) == discovery.Found("", "luxos", "LuxOS 2024.6", "S19j Pro")
    bos = {"VERSION": [{"BOSer": "25.01"}]}
    details = {"DEVDETAILS": [{"Model": "Antminer S21", "Driver": "bitmain"}]}
    assert discovery.classify(bos, details).model == "S21"  # type: ignore[union-attr]
    wm_version = {"STATUS": "S", "Msg": {"fw_ver": "20230911"}}
    wm_details = {"DEVDETAILS": [{"Model": "M60S.VK30", "Driver": "bitmicro"}]}
    wm = discovery.classify(wm_version, wm_details)
    assert wm is not None and (wm.protocol, wm.model) == ("whatsminer", "M60S")
    assert discovery.classify({"VERSION": [{"CGMiner": "4.9"}]}, {}) is None


def test_stanzas_group_consecutive_addresses_and_list_unknown_models() -> None:
    def f(host: str, template: str | None) -> discovery.Found:
        return discovery.Found(host, "luxos", "LuxOS", "S21", template, 3.5)

    found = [
        f("10.0.0.3", "a"),
        f("10.0.0.1", "a"),
        f("10.0.0.2", "a"),
        f("10.0.0.5", "a"),
        f("10.0.0.4", "b"),
        f("10.0.0.9", None),
    ]
    text = discovery.stanzas(found)
    assert text.count("[[devices]]") == 3
    assert 'name = "a"\ntemplate = "a"\ncount = 3\naddress = "10.0.0.1"' in text
    assert 'name = "a-2"\ntemplate = "a"\ncount = 1\naddress = "10.0.0.5"' in text
    assert "# 10.0.0.9: S21 on LuxOS: no template" in text
