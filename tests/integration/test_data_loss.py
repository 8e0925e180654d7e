"""Records deleted from the log before the group read them are never skipped silently (real
broker, `delete_records` as retention does it; SQLite sink, row by row)."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_tools import create_topic, produce, unique_name
from tests.fixtures.ops_http import OPS_ARGS, ops_endpoint
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = pytest.mark.integration

APP = "tests.apps.chaos:app"


def _delete_records(kafka: Service, topic: str, partition: int, before: int) -> None:
    admin = AdminClient({"bootstrap.servers": kafka.address})
    for future in admin.delete_records([KafkaTopicPartition(topic, partition, before)]).values():
        future.result(timeout=30)


def _offsets(db: Path) -> list[int]:
    rows = sqlite_rows(db, "SELECT source_offset FROM chaos_events ORDER BY source_offset")
    offsets = [int(r[0]) for r in rows]  # type: ignore[call-overload]
    assert len(offsets) == len(set(offsets)), "a record was written twice"
    return offsets


def _first_run(kafka: Service, tmp_path: Path, backend: str) -> tuple[str, str, Path]:
    """A group that read offsets 0..99 of a one-partition topic, which then grew to 300 and
    lost 100..249 to retention before the group came back."""
    topic, group = unique_name("lost"), unique_name("lost")
    create_topic(kafka.address, topic, 1)
    produce(kafka.address, topic, (chaos_event(i, 50) for i in range(100)))
    db = tmp_path / "lost.db"
    args = run_args(APP, kafka.address, group, topic, f"sqlite:///{db}", "--stop-when-idle", "2")
    first = ConsumerProcess([*args, "--backend", backend], tmp_path / "first.log")
    assert first.wait(timeout=120) == 0
    assert sqlite_checkpoints(db, group) == {0: 100}
    produce(kafka.address, topic, (chaos_event(i, 50) for i in range(100, 300)))
    _delete_records(kafka, topic, 0, 250)
    return topic, group, db


@pytest.mark.parametrize("backend", ["confluent", "aiokafka"])
def test_by_default_the_partition_stops_with_the_loss_named(
    kafka: Service, tmp_path: Path, backend: str
) -> None:
    topic, group, db = _first_run(kafka, tmp_path, backend)
    args = run_args(APP, kafka.address, group, topic, f"sqlite:///{db}", "--stop-when-idle", "2")
    second = ConsumerProcess([*args, "--backend", backend], tmp_path / "second.log")

    assert second.wait(timeout=120) == 2, "exit code 2: a partition stopped"

    (stopped,) = [e for e in second.events() if e["event"] == "partition_stopped"]
    assert stopped["error_type"] == "RecordsLostError"
    assert (stopped["topic"], stopped["partition"], stopped["offset"]) == (topic, 0, 100)
    assert "lost=150" in stopped["error"]
    assert "log_start=250" in stopped["error"]
    assert sqlite_checkpoints(db, group) == {0: 100}, "nothing moved past the gap"
    assert _offsets(db) == list(range(100))


def test_with_skip_the_run_goes_on_and_the_event_and_metric_show_the_loss(
    kafka: Service, tmp_path: Path
) -> None:
    topic, group, db = _first_run(kafka, tmp_path, "confluent")
    args = run_args(
        APP,
        kafka.address,
        group,
        topic,
        f"sqlite:///{db}",
        "--stop-when-idle",
        "6",
        "--on-data-loss",
        "skip",
        *OPS_ARGS,
    )
    second = ConsumerProcess(args, tmp_path / "second.log")
    lost = second.wait_for_event("records_lost", timeout=60, what="the loss reported")
    assert (lost["checkpoint"], lost["log_start"], lost["lost"]) == (100, 250, 150)
    scrape = ops_endpoint(second).scrape()
    assert scrape.value("offsetkeeper_records_lost_total", topic=topic, partition="0") == 150

    assert second.wait(timeout=120) == 0
    assert sqlite_checkpoints(db, group) == {0: 300}
    assert _offsets(db) == [*range(100), *range(250, 300)]


_TINY_PREFETCH = {
    "confluent": (
        "-X",
        "fetch.message.max.bytes=1024",
        "-X",
        "queued.max.messages.kbytes=1",
        "-X",
        "queued.min.messages=1",
    ),
    "aiokafka": ("-X", "max.partition.fetch.bytes=1024", "-X", "fetch.max.bytes=1024"),
}


@pytest.mark.parametrize("backend", ["confluent", "aiokafka"])
def test_records_deleted_while_the_consumer_lags_stop_it_at_the_fetch(
    kafka: Service, tmp_path: Path, backend: str
) -> None:
    topic, group = unique_name("lagging"), unique_name("lagging")
    create_topic(kafka.address, topic, 1)
    # One record per record batch: a fetch returns whole batches, so big ones would bring
    # the records retention is about to delete into the consumer's memory first.
    producer = Producer({"bootstrap.servers": kafka.address, "batch.num.messages": 1})
    for i in range(3000):
        key, value = chaos_event(i, 50)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(60) == 0
    db = tmp_path / "lagging.db"
    # A slow consumer with a tiny prefetch: it is far behind the log end, and has not
    # fetched the records that retention is about to delete.
    args = run_args(
        "tests.apps.slow_chaos:app",
        kafka.address,
        group,
        topic,
        f"sqlite:///{db}",
        "--stop-when-idle",
        "3",
        "--batch-max-records",
        "20",
        "--backend",
        backend,
        *_TINY_PREFETCH[backend],
    )
    consumer = ConsumerProcess(args, tmp_path / "lagging.log", env={"SLOW_CHAOS_DELAY_S": "0.01"})
    wait_until(
        lambda: sqlite_checkpoints(db, group).get(0, 0) > 0 or not consumer.alive(),
        timeout=60,
        what="a commit",
    )
    assert consumer.alive(), consumer.log_path.read_text()[-3000:]
    _delete_records(kafka, topic, 0, 2500)

    assert consumer.wait(timeout=180) == 2

    (stopped,) = [e for e in consumer.events() if e["event"] == "partition_stopped"]
    assert stopped["error_type"] == "RecordsLostError"
    at = sqlite_checkpoints(db, group)[0]
    assert 0 < at < 2500
    assert stopped["offset"] == at
    assert f"lost={2500 - at}" in stopped["error"]
    assert _offsets(db) == list(range(at))
