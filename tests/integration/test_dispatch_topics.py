"""Hostile dispatch traffic through a real broker into the daemon's dispatch path.

Anything published under the site's topic root, on any topic, with any payload: every message
on `<root>/dispatch` gets exactly one ack, in order (rejected with a reason unless valid);
every other topic is ignored (no ack); nothing raises out of the link or the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.app import Daemon
from controller.config import LoadedConfig, load_config
from tests.e2e.harness import dispatch
from tests.helpers import Mosquitto, cancel_and_wait, until
from tests.unit.test_dispatch_parse import dispatch_like, json_values

ROOT = "rampd/hostile"
VALID = b"<a valid dispatch, made when sent>"

suffixes = st.one_of(
    st.sampled_from(
        ["dispatch", "heartbeat", "dispatch/x", "Dispatch", "dispatch ", "", "status", "x/dispatch"]
    ),
    # mosquitto drops a publisher whose topic has control characters: not our input
    st.text(
        st.characters(blacklist_characters="#+", blacklist_categories=("Cc", "Cs", "Cn")),
        max_size=12,
    ),
).filter(lambda s: s != "ack")  # the observer listens there
payloads = st.one_of(
    st.just(VALID),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    dispatch_like.map(lambda v: json.dumps(v).encode()),  # often valid, often damaged
)
messages = st.lists(st.tuples(suffixes, payloads), min_size=1, max_size=10)


@pytest.fixture(scope="module")
def config(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> LoadedConfig:
    """A site whose device and meter nobody answers: only the dispatch path is under test."""
    net = f"127.90.{random.randint(1, 250)}"
    path = tmp_path_factory.mktemp("site") / "site.toml"
    path.write_text(
        'site_id = "hostile"\n[site]\nmax_kw = 100\n'
        f'[meter]\nhost = "{net}.250"\nport = 1502\n'
        f'[mqtt]\nhost = "{module_mosquitto.host}"\nport = {module_mosquitto.port}\n'
        '[[devices]]\nname = "row"\ntemplate = "modbus-load"\n'
        f'address = "{net}.10"\noverrides = {{ port = 1502, p_max_kw = 100 }}\n'
    )
    cfg = load_config(path)
    assert cfg.topic_root == ROOT
    return cfg


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def send_all(cfg: LoadedConfig, broker: Mosquitto, msgs: list[tuple[str, bytes]]) -> None:
    daemon = Daemon(cfg)
    link = asyncio.create_task(daemon.link.run())
    acks: list[dict[str, Any]] = []
    try:
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as grid:
            await grid.subscribe(f"{ROOT}/ack", qos=1)

            async def collect() -> None:
                async for m in grid.messages:
                    assert isinstance(m.payload, bytes)
                    acks.append(json.loads(m.payload))

            collector = asyncio.create_task(collect())
            await until(lambda: daemon.link.connected, 10.0, what="daemon connected")
            # Per message on <root>/dispatch: the id of a valid one, else None (either way).
            expected: list[str | None] = []
            for suffix, payload in [*msgs, ("dispatch", VALID)]:
                sent_id = None
                if payload == VALID:  # fresh, and a seq above anything sent before
                    body = dispatch(time.time_ns(), target_kw=50.0)
                    payload, sent_id = json.dumps(body).encode(), body["id"]
                await grid.publish(f"{ROOT}/{suffix}", payload, qos=1)
                if suffix == "dispatch":
                    expected.append(sent_id)
            # Acks leave in order: a surplus one would come before the last (valid) one.
            await until(lambda: len(acks) >= len(expected), 10.0, what="every ack")
            await cancel_and_wait(collector)
            assert not link.done(), "the link stopped"
    finally:
        await cancel_and_wait(link)
    assert len(acks) == len(expected), acks
    for ack, sent_id in zip(acks, expected, strict=True):
        if sent_id is not None:
            assert ack["id"] == sent_id and ack["accepted"], ack
        assert set(ack) == {"id", "seq", "accepted", "reason", "at"}, ack
        assert bool(ack["reason"]) != ack["accepted"], ack  # a rejection always says why


@settings(max_examples=15, deadline=None)
@given(msgs=messages)
def test_anything_under_the_root_is_acked_once_or_ignored(
    config: LoadedConfig, module_mosquitto: Mosquitto, msgs: list[tuple[str, bytes]]
) -> None:
    errors = Errors()
    logging.getLogger("rampd").addHandler(errors)
    try:
        asyncio.run(send_all(config, module_mosquitto, msgs))
    finally:
        logging.getLogger("rampd").removeHandler(errors)
    assert errors.lines == []
