"""DSX Flex feeds of a parent's zones: `"zone:<device name>"` places checked at load (file,
key and what is wrong), one feed per place, a site feed beside zone feeds; and what a zone
feed reports (its power, bounds, where it is heading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ConfigError, LoadedConfig, load_config
from controller.northbound.dsx_flex.config import zone_of
from controller.northbound.dsx_flex.status import Bounds, zone_power

PARENT = """
site_id = "campus"
[mqtt]
host = "127.0.0.1"
port = 1884
[site]
max_kw = 3000
[meter]
protocol = "none"
[[devices]]
name = "za"
template = "rampd-zone"
[[devices]]
name = "zb"
template = "rampd-zone"
overrides = {{ p_max_kw = 1500.0 }}
[[devices]]
name = "row"
template = "modbus-load"
address = "127.98.8.2"
overrides = {{ port = 1502 }}
[dsx_flex]
agent_id = "f1"
isv_ids = ["acme"]
require_signature = false
[dsx_flex.feeds]
{feeds}
"""


def write(tmp_path: Path, feeds: str) -> Path:
    p = tmp_path / "campus.toml"
    p.write_text(PARENT.format(feeds=feeds))
    return p


def load(tmp_path: Path, feeds: str) -> LoadedConfig:
    return load_config(write(tmp_path, feeds))


def test_a_site_feed_and_zone_feeds_side_by_side(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'main = "site"\nfeed-a = "zone:za"\n"feed b" = "zone:zb"')
    dsx = cfg.site.dsx_flex
    assert dsx is not None
    places = dsx.feed_map("campus")
    assert places == {"main": "site", "feed-a": "zone:za", "feed b": "zone:zb"}
    assert {t: zone_of(p) for t, p in places.items()} == {
        "main": None,
        "feed-a": "za",
        "feed b": "zb",
    }


def test_zone_feeds_without_a_site_feed(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'a = "zone:za"')
    assert cfg.site.dsx_flex is not None
    assert cfg.site.dsx_flex.feed_map("campus") == {"a": "zone:za"}


@pytest.mark.parametrize(
    ("feeds", "says"),
    [
        (
            'a = "zone:zz"',
            "dsx_flex.feeds.a: no device is named 'zz' (zones: za, zb)",
        ),
        (
            'main = "site"\nb = "zone:row"',
            "dsx_flex.feeds.b: 'row' is a modbus device, not a zone (zones: za, zb)",
        ),
        ('a = "zone:"', 'a place is "site" or "zone:<device name>"'),
        ('a = "zone: za"', 'a place is "site" or "zone:<device name>"'),
        ('a = "building-7"', "a = 'building-7': a place is"),
        ('a = "zone:za"\nb = "zone:za"', "a and b both feed 'zone:za': one feed per place"),
        ('a = "site"\nb = "zone:zb"\nc = "site"', "a and c both feed 'site'"),
        ('"a/b" = "zone:za"', "without '/'"),
        ("a = 3", "dsx_flex.feeds.a"),
    ],
)
def test_bad_feeds_are_refused_at_load_naming_file_key_and_problem(
    tmp_path: Path, feeds: str, says: str
) -> None:
    p = write(tmp_path, feeds)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    text = str(err.value)
    assert text.startswith(str(p)) and "dsx_flex.feeds" in text and says in text, text


def test_a_site_without_zones_says_so(tmp_path: Path) -> None:
    p = tmp_path / "site.toml"
    text = PARENT.format(feeds='a = "zone:za"')
    p.write_text(text.split("[[devices]]", 1)[0] + text[text.index('[[devices]]\nname = "row"') :])
    with pytest.raises(ConfigError, match=r"feeds\.a: no device is named 'za' \(zones: none"):
        load_config(p)


# -- what a zone feed reports ----------------------------------------------------------------


def test_a_zone_feed_reports_the_zones_measured_power_and_capability() -> None:
    p = zone_power(612e3, 800e3, 140e3, 1040e3, 1500e3, 400e3)
    assert p.bounds == Bounds(140e3, 1040e3, 1500e3)
    assert p.measured_w == 612e3 and p.calculated_w == 612e3
    assert p.heading_w == 400e3  # the parent's setpoint under the feed's level


def test_where_a_zone_is_heading_stays_within_its_reach() -> None:
    assert zone_power(None, 800e3, 140e3, 1040e3, 1500e3, None).heading_w == 800e3
    assert zone_power(None, 800e3, 140e3, 1040e3, 1500e3, 50e3).heading_w == 140e3
    assert zone_power(None, 1200e3, 140e3, 1040e3, 1500e3, None).heading_w == 1040e3
    # Before a fresh reading: the calculated load is where it is heading.
    p = zone_power(None, 300e3, 140e3, 1040e3, 1500e3, 400e3)
    assert p.measured_w is None and p.calculated_w == 300e3


def test_a_zone_whose_range_collapsed_reports_a_consistent_range() -> None:
    p = zone_power(10e3, 0.0, 500e3, 300e3, 1000e3, None)
    assert p.bounds.min_w == p.bounds.max_w == 300e3
