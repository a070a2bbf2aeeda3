"""Reports as reportDescriptors ask: which slots, batched how, with what measured values;
every body built is validated against openadr3.yaml's reportRequest and the enumerations."""

from __future__ import annotations

import math
from typing import Any

import pytest

from controller.northbound.openadr.model import Event, ReportDescriptor, parse_event
from controller.northbound.openadr.reports import ReportPlan, Samples, report_body, supported
from controller.northbound.openadr.schedule import spans
from tests.openadr_vtn import (
    IGNORE_OAUTH2_WARNING,
    Conformance,
    payload_errors,
    reading_type_errors,
)

pytestmark = pytest.mark.filterwarnings(IGNORE_OAUTH2_WARNING)

T0 = 1_717_243_200.0


@pytest.fixture(scope="module")
def conformance() -> Conformance:
    return Conformance("http://127.0.0.1:1/oadr")


def event(n: int = 3, duration: str = "PT10S", **report: Any) -> Event:
    return parse_event(
        {
            "id": "e1",
            "programID": "p1",
            "intervalPeriod": {"start": "2024-06-01T12:00:00Z", "duration": duration},
            "intervals": [
                {"id": 10 + i, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [1]}]}
                for i in range(n)
            ],
            "reportDescriptors": [{"payloadType": "DEMAND", **report}],
        }
    )


def plan(e: Event, period_s: float = 4.0) -> ReportPlan:
    return ReportPlan(e, e.report_descriptors[0], spans(e, T0, "s")[0], period_s)


def ids(batches: list[list[Any]]) -> list[list[int]]:
    return [[s.interval_id for s in b] for b in batches]


def test_defaults_one_report_of_all_intervals_after_the_last() -> None:
    p = plan(event())  # startInterval -1, numIntervals -1, frequency -1, repeat 1
    assert p.due(T0 + 10) == [] and p.due(T0 + 29.9) == []
    assert ids(p.due(T0 + 30)) == [[10, 11, 12]]
    assert p.done and p.due(T0 + 100) == []


def test_frequency_and_repeat() -> None:
    p = plan(event(n=5, frequency=2, repeat=-1))
    assert ids(p.due(T0 + 20)) == [[10, 11]]
    assert ids(p.due(T0 + 50)) == [[12, 13], [14]]  # the rest, once the last one ends
    p = plan(event(n=5, frequency=1, repeat=2))
    assert ids(p.due(T0 + 50)) == [[10], [11]] and p.done


def test_start_and_number_of_intervals() -> None:
    p = plan(event(n=5, startInterval=1, numIntervals=2, frequency=1, repeat=-1))
    assert ids(p.due(T0 + 50)) == [[11], [12]]


def test_indefinite_interval_reported_in_slots() -> None:
    p = plan(event(n=1, duration="P9999Y", frequency=-1, repeat=-1), period_s=4.0)
    assert p.next_due() == T0 + 4.0
    batches = p.due(T0 + 12.5)
    assert [[(s.start - T0, s.end - T0) for s in b] for b in batches] == [
        [(0.0, 4.0)],
        [(4.0, 8.0)],
        [(8.0, 12.0)],
    ]
    assert all(s.interval_id == 10 for b in batches for s in b)
    assert not p.done and p.next_due() == T0 + 16.0


def test_sub_intervals_of_a_finite_interval() -> None:
    p = plan(event(n=1, duration="PT10S", reportIntervals="SUB_INTERVALS", frequency=1, repeat=-1))
    got = p.due(T0 + 10)
    assert [(s.start - T0, s.end - T0) for b in got for s in b] == [(0, 4), (4, 8), (8, 10)]


def test_an_update_does_not_report_twice() -> None:
    e = event(n=1, duration="P9999Y", frequency=1, repeat=-1)
    p = plan(e)
    assert len(p.due(T0 + 8)) == 2
    again = p.rebased(e, spans(e, T0, "s")[0])
    assert again.sent == 2 and [b[0].start - T0 for b in again.due(T0 + 12)] == [8.0]


def test_what_is_not_reported() -> None:
    assert supported(ReportDescriptor("DEMAND")) is None
    assert supported(ReportDescriptor("USAGE")) is None
    assert "BASELINE" in str(supported(ReportDescriptor("BASELINE")))
    assert "forecast" in str(supported(ReportDescriptor("DEMAND", historical=False)))


def samples(values: list[tuple[float, float]]) -> Samples:
    s = Samples(keep_s=3600.0)
    for t, w in values:
        s.add(T0 + t, w)
    return s


def body(
    d: ReportDescriptor, s: Samples, slots: list[tuple[float, float]]
) -> dict[str, Any] | None:
    from controller.northbound.openadr.reports import Slot

    e = event()
    return report_body(
        e,
        d,
        [Slot(10, T0 + a, T0 + b) for a, b in slots],
        s,
        client_name="site-a",
        resource_name="AGGREGATED_REPORT",
        seq=7,
    )


def check(conformance: Conformance, b: dict[str, Any] | None) -> dict[str, Any]:
    assert b is not None
    assert conformance.schema_errors("reportRequest", b) == []
    for d in b["payloadDescriptors"]:
        assert conformance.schema_errors("reportPayloadDescriptor", d) == []
        assert reading_type_errors(d["readingType"]) == []
    for iv in b["resources"][0]["intervals"]:
        for p in iv["payloads"]:
            assert payload_errors("report", p["type"], p["values"]) == []
    return b


def value(b: dict[str, Any], i: int = 0) -> float:
    return float(b["resources"][0]["intervals"][i]["payloads"][0]["values"][0])


def test_demand_mean_peak_and_last(conformance: Conformance) -> None:
    s = samples([(t, 400e3 + 10e3 * t) for t in range(10)])  # 400..490 kW
    mean = check(conformance, body(ReportDescriptor("DEMAND"), s, [(0, 10)]))
    assert value(mean) == pytest.approx(445.0)
    d = mean["payloadDescriptors"][0]
    assert (d["payloadType"], d["readingType"], d["units"], d["confidence"]) == (
        "DEMAND",
        "MEAN",
        "KW",
        100,
    )
    iv = mean["resources"][0]["intervals"][0]
    assert iv["id"] == 10 and iv["intervalPeriod"] == {
        "start": "2024-06-01T12:00:00.000Z",
        "duration": "PT10S",
    }
    assert mean["eventID"] == "e1" and mean["clientName"] == "site-a"
    peak = check(
        conformance, body(ReportDescriptor("DEMAND", reading_type="PEAK", units="MW"), s, [(0, 10)])
    )
    assert value(peak) == pytest.approx(0.49)
    assert peak["payloadDescriptors"][0]["units"] == "MW"
    last = check(
        conformance, body(ReportDescriptor("DEMAND", reading_type="DIRECT_READ"), s, [(0, 5)])
    )
    assert value(last) == pytest.approx(440.0)


def test_usage_is_energy_and_partial_cover_says_so(conformance: Conformance) -> None:
    s = samples([(t, 360e3) for t in range(5)])  # 5 of 10 seconds measured
    b = check(conformance, body(ReportDescriptor("USAGE"), s, [(0, 10)]))
    assert value(b) == pytest.approx(1.0)  # 360 kW for 10 s = 1 kWh
    d = b["payloadDescriptors"][0]
    assert (d["units"], d["readingType"], d["confidence"]) == ("KWH", "ESTIMATED", 50)


def test_unmeasured_slots_are_left_out(conformance: Conformance) -> None:
    s = samples([(t, 100e3) for t in range(20, 30)])
    assert body(ReportDescriptor("DEMAND"), s, [(0, 10)]) is None
    b = check(conformance, body(ReportDescriptor("DEMAND"), s, [(0, 10), (20, 30)]))
    assert [iv["intervalPeriod"]["start"] for iv in b["resources"][0]["intervals"]] == [
        "2024-06-01T12:00:20.000Z"
    ]


def test_units_not_known_are_replaced_and_negative_power_clamped(conformance: Conformance) -> None:
    s = samples([(0, -5e3), (1, -5e3)])
    b = check(conformance, body(ReportDescriptor("DEMAND", units="HP"), s, [(0, 2)]))
    assert value(b) == 0.0 and b["payloadDescriptors"][0]["units"] == "KW"


def test_samples_trim_and_ignore_repeats() -> None:
    s = Samples(keep_s=10.0)
    s.add(T0, 1.0)
    s.add(T0, 2.0)  # same instant: ignored
    s.add(T0 - 1, 3.0)  # backwards: ignored
    assert len(s) == 1
    for t in range(1, 4000):
        s.add(T0 + t, 1.0)
    assert len(s) < 3700
    m = s.measure(T0 + 3991, T0 + 4001)
    assert m is not None and m.count == 9 and math.isclose(m.coverage, 0.9)
