"""Price quotes: the MQTT/HTTP payload parser, staleness, and the CSV reader."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from controller.market.prices import (
    PriceError,
    PriceQuote,
    parse_quote,
    parse_quotes,
    read_price_csv,
)

ERCOT = (
    Path(__file__).resolve().parents[2] / "bench" / "data" / "ercot_rt_spp_hb_west_2024-06_08.csv"
)
T0 = datetime(2024, 6, 1, 5, 0, tzinfo=UTC).timestamp()
GOOD = {"interval_start": "2024-06-01T05:00:00Z", "interval_s": 900, "usd_per_mwh": 131.2}


def test_a_price_message_in_every_form() -> None:
    as_dict = parse_quote(GOOD)
    assert as_dict == parse_quote(json.dumps(GOOD)) == parse_quote(json.dumps(GOOD).encode())
    assert as_dict.interval_start == T0
    assert as_dict.interval_s == 900.0
    assert as_dict.usd_per_mwh == 131.2
    assert as_dict.kind == "realtime"  # the default
    assert as_dict.end == T0 + 900.0
    unix = parse_quote({**GOOD, "interval_start": T0, "kind": "forecast"})
    assert unix.interval_start == T0 and unix.kind == "forecast"
    offset = parse_quote({**GOOD, "interval_start": "2024-06-01T00:00:00-05:00"})
    assert offset.interval_start == T0


def test_negative_prices_are_real() -> None:
    assert parse_quote({**GOOD, "usd_per_mwh": -14.76}).usd_per_mwh == -14.76


def test_stale_past_the_interval_and_the_grace() -> None:
    q = PriceQuote(T0, 900.0, 50.0)
    assert not q.is_stale(T0 + 900.0 + 60.0, grace_s=60.0)
    assert q.is_stale(T0 + 900.0 + 60.001, grace_s=60.0)
    assert q.is_stale(T0 + 901.0, grace_s=0.0)
    assert not q.is_stale(T0 - 5.0, grace_s=0.0)  # early (clock skew) is not stale


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "JSON object"),
        ('{"interval_start": 1, "interval_s": 900, "usd_per_mwh": NaN}', "not JSON"),
        ({"interval_s": 900, "usd_per_mwh": 1.0}, "interval_start"),
        ({"interval_start": T0, "usd_per_mwh": 1.0}, "interval_s"),
        ({"interval_start": T0, "interval_s": 900}, "usd_per_mwh"),
        ({**GOOD, "interval_start": "2024-06-01 05:00"}, "interval_start: not RFC3339"),
        ({**GOOD, "interval_start": "2024-13-01T05:00:00Z"}, "interval_start"),
        ({**GOOD, "interval_s": 0}, "interval_s: must be > 0"),
        ({**GOOD, "interval_s": -900}, "interval_s: must be > 0"),
        ({**GOOD, "usd_per_mwh": "131.2"}, "usd_per_mwh: must be a number"),
        ({**GOOD, "usd_per_mwh": True}, "usd_per_mwh: must be a number"),
        ({**GOOD, "usd_per_mwh": None}, "usd_per_mwh: must be a number"),
        ({**GOOD, "usd_per_mwh": float("inf")}, "usd_per_mwh: must be finite"),
        ({**GOOD, "kind": "dayahead"}, "kind"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(payload: object, reason: str) -> None:
    with pytest.raises(PriceError, match=reason):
        parse_quote(payload)  # type: ignore[arg-type]
    assert issubclass(PriceError, ValueError)


def test_an_http_source_answers_one_or_many() -> None:
    assert parse_quotes(json.dumps(GOOD)) == [parse_quote(GOOD)]
    many = [{**GOOD, "interval_start": T0 + 900 * i, "usd_per_mwh": i} for i in range(4)]
    got = parse_quotes(json.dumps(many).encode())
    assert [q.usd_per_mwh for q in got] == [0, 1, 2, 3]
    assert [q.interval_start for q in got] == [T0 + 900 * i for i in range(4)]
    many[2]["kind"] = "bogus"
    with pytest.raises(PriceError, match="item 2: kind"):
        parse_quotes(json.dumps(many))


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "prices.csv"
    p.write_text(text)
    return p


def test_csv_rows_become_realtime_quotes(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        "interval_start_utc,price_usd_per_mwh\n"
        "2024-06-01T05:00:00Z,17.69\n"
        "\n"
        "2024-06-01T05:15:00,-3.5\n",  # no offset: the column says UTC
    )
    got = read_price_csv(p, interval_s=900.0)
    assert got == [PriceQuote(T0, 900.0, 17.69), PriceQuote(T0 + 900.0, 900.0, -3.5)]


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("time,price\n2024-06-01T05:00:00Z,1\n", ":1:", "header"),
        ("interval_start_utc,price_usd_per_mwh\n2024-06-01T05:00:00Z,abc\n", ":2:", "number"),
        (
            "interval_start_utc,price_usd_per_mwh\n2024-06-01T05:00:00Z,1\n"
            "2024-06-01T05:15:00Z,2\nyesterday,3\n",
            ":4:",
            "ISO 8601",
        ),
        (
            "interval_start_utc,price_usd_per_mwh\n2024-06-01T05:15:00Z,1\n"
            "2024-06-01T05:00:00Z,2\n",
            ":3:",
            "not after",
        ),
        ("interval_start_utc,price_usd_per_mwh\n2024-06-01T05:00:00Z\n", ":2:", "columns"),
        ("interval_start_utc,price_usd_per_mwh\n2024-06-01T05:00:00Z,nan\n", ":2:", "finite"),
        ("interval_start_utc,price_usd_per_mwh\n", "", "no price rows"),
        ("", "", "empty"),
    ],
)
def test_csv_errors_name_the_file_and_line(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    p = _csv(tmp_path, text)
    with pytest.raises(PriceError, match=reason) as exc:
        read_price_csv(p)
    assert str(exc.value).startswith(f"{p}{where}")


def test_a_missing_csv_is_named(tmp_path: Path) -> None:
    with pytest.raises(PriceError, match="file not found"):
        read_price_csv(tmp_path / "nope.csv")


def test_the_ercot_summer_reads_whole() -> None:
    quotes = read_price_csv(ERCOT)
    t = np.array([q.interval_start for q in quotes])
    p = np.array([q.usd_per_mwh for q in quotes])
    assert len(quotes) == 92 * 96  # June to August, 15-minute intervals, no gaps
    assert t[0] == T0  # 2024-06-01 00:00 CDT
    assert np.all(np.diff(t) == 900.0)
    assert p.min() < 0 < p.mean() < 100 < p.max()
    assert all(q.kind == "realtime" and q.interval_s == 900.0 for q in quotes)
