"""consumer.run / consumer.Runner against the real broker, into SQLite: what the result says
was committed is what the sink holds, and the reason it stopped is the real one."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

import consumer
from consumer import CheckpointError, Runner, TopicPartition
from consumer.examples.orders import app
from tests.fixtures.kafka_tools import create_topic, encode, order_event, produce, unique_name
from tests.fixtures.processes import FAST_GROUP_SETTINGS, wait_until
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = pytest.mark.integration

PARTITIONS = 3
ORDERS = 300
# The test group timeouts of the CLI tests, as keyword settings.
FAST_GROUP = dict(pair.split("=", 1) for pair in FAST_GROUP_SETTINGS[1::2])


def _orders_topic(kafka: Service) -> tuple[str, dict[int, int]]:
    topic = unique_name("api-orders")
    create_topic(kafka.address, topic, PARTITIONS)
    keys = [f"o-{n}".encode() for n in range(ORDERS)]
    produce(
        kafka.address,
        topic,
        ((key, encode(order_event(key.decode(), 1))) for key in keys),
        partition_of={key: n % PARTITIONS for n, key in enumerate(keys)},
    )
    return topic, {p: ORDERS // PARTITIONS for p in range(PARTITIONS)}


def test_run_consumes_until_idle_and_says_what_it_committed(kafka: Service, tmp_path: Path) -> None:
    topic, ends = _orders_topic(kafka)
    db = tmp_path / "orders.db"
    group = unique_name("api")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    result = consumer.run(
        app,
        bootstrap_servers=kafka.address,
        group=group,
        topics=[topic],
        sink=f"sqlite:///{db}",
        stop_when_idle_s=1.0,
        batch_max_records=50,
        kafka_config=FAST_GROUP,
    )

    assert (result.stop_reason, result.exit_code, result.error) == ("idle", 0, None)
    assert result.committed == {TopicPartition(topic, p): end for p, end in ends.items()}
    assert (result.records, result.rows, result.dead_letters) == (ORDERS, ORDERS, 0)
    assert result.batches >= ORDERS // 50
    assert sqlite_checkpoints(db, group) == ends
    assert sqlite_rows(db, "SELECT count(*) FROM orders") == [(ORDERS,)]
    # Run on the main thread, it handled SIGTERM and SIGINT, and gave them back.
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def test_runner_stop_from_another_thread_commits_and_says_stop_requested(
    kafka: Service, tmp_path: Path
) -> None:
    topic, ends = _orders_topic(kafka)
    db = tmp_path / "orders.db"
    group = unique_name("api-stop")
    runner = Runner(
        "consumer.examples.orders:app",
        bootstrap_servers=kafka.address,
        group=group,
        topics=[topic],
        sink=f"sqlite:///{db}",
        kafka_config=FAST_GROUP,
    )
    results: list[consumer.RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    try:
        wait_until(lambda: sqlite_checkpoints(db, group) == ends, timeout=60, what="all committed")
    finally:
        runner.stop()
        thread.join(60)

    [result] = results
    assert (result.stop_reason, result.exit_code) == ("stop_requested", 0)
    assert result.committed == {TopicPartition(topic, p): end for p, end in ends.items()}


def test_an_error_ends_the_run_in_its_result(kafka: Service, tmp_path: Path) -> None:
    topic, _ends = _orders_topic(kafka)
    started = time.monotonic()

    result = consumer.run(
        app,
        bootstrap_servers=kafka.address,
        group=unique_name("api-error"),
        topics=[topic],
        sink=f"sqlite:///{tmp_path / 'orders.db'}",
        reset_policy="error",  # no checkpoint stored: refused
        kafka_config=FAST_GROUP,
    )

    assert (result.stop_reason, result.exit_code) == ("error", 1)
    assert isinstance(result.error, CheckpointError)
    assert (result.records, result.committed) == (0, {})
    assert time.monotonic() - started < 60
