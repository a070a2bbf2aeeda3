"""Fixtures shared by every test directory: a real mosquitto broker per test; and how the
tests share out under pytest-xdist (`pytest -n 2 --dist loadgroup`, as CI runs them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.tools.broker import find_mosquitto
from tests.helpers import Mosquitto


def _start_broker(workdir: Path) -> Mosquitto:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail(
            "mosquitto not installed: these tests need a real broker "
            "(apt-get install mosquitto; CI installs it)",
            pytrace=False,
        )
    error: Exception | None = None
    for attempt in range(3):  # a free port can be taken between probe and bind
        broker = Mosquitto(exe, workdir / f"mosquitto-{attempt}")
        broker.workdir.mkdir(parents=True)
        try:
            broker.start()
            return broker
        except RuntimeError as exc:
            error = exc
    pytest.fail(f"mosquitto did not start: {error}", pytrace=False)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker on a free 127.0.0.1 port; stopped (killed on timeout) afterwards."""
    broker = _start_broker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def module_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker shared by the tests of a module (for process fixtures of module scope)."""
    broker = _start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield broker
    finally:
        broker.stop()


# Under xdist each module runs whole on one worker (a module-scoped site is started once), and
# end-to-end modules whose simulated devices share loopback addresses, or that load the host
# hardest, share a group so they never run at the same time (`--dist loadgroup` gives a group
# to one worker). Without xdist the marks do nothing.
E2E_GROUPS: dict[str, str] = {
    # The benches' own site (configs/bench-site.toml, 127.80-89) and the floods: heavy.
    "test_bench_smoke": "benches",
    "test_chaos_short": "benches",
    "test_fanout_smoke": "benches",
    "test_soak_short": "benches",
    "test_dispatch_burst": "benches",
    "test_dispatch_flood": "benches",
    # Devices in 127.93-96.
    "test_fleet_e2e": "net93-96",
    "test_mixed_fleet_e2e": "net93-96",
    "test_ramp_limits_e2e": "net93-96",
    "test_frequency_e2e": "net93-96",
    "test_hierarchy_e2e": "net93-96",
}
_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        rel = item.path.relative_to(_TESTS) if item.path.is_relative_to(_TESTS) else item.path
        group = str(rel.with_suffix(""))
        if rel.parts[0] == "e2e":
            group = E2E_GROUPS.get(item.path.stem, group)
        item.add_marker(pytest.mark.xdist_group(group))
