"""A stored state entry newer than the app knows stops the consumer with an error naming both
versions, and nothing is overwritten: not the entry, not the rows, not the checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.kafka_tools import create_topic, encode, produce, unique_name
from tests.fixtures.processes import ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest

pytestmark = pytest.mark.integration

APP = "consumer.examples.totals:app"  # state version 2


def _pay(kafka: Service, topic: str, start: int, count: int) -> None:
    produce(
        kafka.address,
        topic,
        (
            (f"c{i % 5}".encode(), encode({"customer": f"c{i % 5}", "amount_cents": 100 + i}))
            for i in range(start, start + count)
        ),
    )


def test_an_entry_newer_than_the_app_is_refused_and_nothing_is_overwritten(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("future-state"), unique_name("future-state")
    create_topic(kafka.address, topic, 1)
    _pay(kafka, topic, 0, 50)
    args = run_args(APP, kafka.address, group, topic, sink.url, "--stop-when-idle", "2")
    first = ConsumerProcess(args, tmp_path / "first.log")
    consumers.append(first)
    assert first.wait(timeout=60) == 0
    sink.query_write(  # as if a newer app version had written c3's entry
        f"UPDATE offsetkeeper_state SET version = 3 WHERE group_id = '{group}'"
    )
    state = "SELECT key, value, version FROM offsetkeeper_state ORDER BY key"
    before = (
        sink.query(state),
        sink.query("SELECT * FROM customer_totals ORDER BY customer"),
        sink.checkpoints(group),
    )
    _pay(kafka, topic, 50, 10)

    second = ConsumerProcess(args, tmp_path / "second.log")
    consumers.append(second)
    assert second.wait(timeout=60) == 1
    output = second.log_path.read_text()
    assert "state entry v3 is newer than this code knows" in output
    assert "reads up to v2" in output
    assert (
        sink.query(state),
        sink.query("SELECT * FROM customer_totals ORDER BY customer"),
        sink.checkpoints(group),
    ) == before
