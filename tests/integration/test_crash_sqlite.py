"""Exactly once into SQLite across kill -9 at random moments, SIGTERM restarts, and bad input."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.kafka_tools import (
    create_topic,
    encode,
    end_offsets,
    order_event,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import (
    OFFSETKEEPER,
    ConsumerProcess,
    run_args,
    wait_until,
)
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 6
BACKENDS = ["confluent", "aiokafka"]


def _run_args(
    kafka: Service, group: str, topic: str, db: Path, *extra: str, backend: str = "confluent"
) -> list[str]:
    return [
        "--backend",
        backend,
        *run_args(
            "consumer.examples.orders:app",
            kafka.address,
            group,
            topic,
            f"sqlite:///{db}",
            "--batch-max-records",
            "500",
            *extra,
        ),
    ]


def _produced_orders(kafka: Service, topic: str) -> dict[int, list[tuple[int, dict[str, object]]]]:
    """What is really in the topic: per partition, (offset, event) in offset order."""
    return {
        partition: [(offset, json.loads(value or b"")) for offset, _key, value in records]
        for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items()
    }


def _assert_sink_matches_checkpoints(
    db: Path, group: str, produced: dict[int, list[tuple[int, dict[str, object]]]]
) -> int:
    """Rows are exactly the events below each partition's checkpoint: none missing, none extra."""
    checkpoints = sqlite_checkpoints(db, group)
    expected = {
        event["order_id"]: event
        for partition, records in produced.items()
        for offset, event in records
        if offset < checkpoints.get(partition, 0)
    }
    rows = sqlite_rows(db, "SELECT order_id, customer, amount_cents, status FROM orders")
    actual = {
        r[0]: {"order_id": r[0], "customer": r[1], "amount_cents": r[2], "status": r[3]}
        for r in rows
    }
    assert len(rows) == len(actual), "an order_id appears twice"
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    assert not missing, f"{len(missing)} committed events have no row, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} rows beyond the checkpoints, e.g. {sorted(extra)[:3]}"
    for order_id, event in expected.items():
        assert actual[order_id] == event, f"row for {order_id} differs from its last event"
    return len(actual)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_at_three_random_moments_loses_and_duplicates_nothing(
    backend: str, kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 50_000
    topic, group = unique_name("orders-crash"), unique_name("crash")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(
        kafka.address,
        topic,
        ((f"order-{i}".encode(), encode(order_event(f"order-{i}", 1))) for i in range(total)),
    )
    produced = _produced_orders(kafka, topic)
    assert sum(len(r) for r in produced.values()) == total
    db = tmp_path / "orders.db"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill moments seed={seed}")

    def committed() -> int:
        return sum(sqlite_checkpoints(db, group).values())

    # Kill at three random levels of progress, each a little after the previous one.
    for kill_number, fraction in enumerate(sorted(rng.uniform(0.05, 0.85) for _ in range(3)), 1):
        process = ConsumerProcess(
            _run_args(kafka, group, topic, db, backend=backend),
            tmp_path / f"consumer-{kill_number}.log",
        )
        consumers.append(process)
        # ... and always after the restarted consumer made progress of its own.
        target = max(int(total * fraction), committed() + 1000)
        wait_until(
            lambda target=target, process=process: committed() >= target or not process.alive(),
            timeout=180,
            interval=0.02,
            what=f"progress to {target} before kill {kill_number}",
        )
        time.sleep(rng.uniform(0, 0.05))  # land at an arbitrary instant of the batch cycle
        assert process.alive(), (
            f"consumer exited early; log:\n{process.log_path.read_text()[-3000:]}"
        )
        process.kill()
        rows = _assert_sink_matches_checkpoints(db, group, produced)
        print(f"kill {kill_number}: at {committed()} committed records, {rows} rows, consistent")

    final = ConsumerProcess(
        _run_args(kafka, group, topic, db, backend=backend), tmp_path / "consumer-final.log"
    )
    consumers.append(final)
    ends = end_offsets(kafka.address, topic, PARTITIONS)
    wait_until(
        lambda: sqlite_checkpoints(db, group) == ends,
        timeout=240,
        what="checkpoints to reach the end offsets",
    )
    assert final.terminate() == 0
    stopped = [e for e in final.events() if e.get("event") == "consumer_stopped"]
    assert stopped, "no consumer_stopped event"
    print(
        f"final consumer ({backend}): {stopped[-1]['records']} records "
        f"at {stopped[-1]['records_per_s']} records/s"
    )
    assert _assert_sink_matches_checkpoints(db, group, produced) == total
    assert sqlite_checkpoints(db, group) == ends


def test_sigterm_mid_stream_commits_and_restart_continues(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 20_000
    topic, group = unique_name("orders-restart"), unique_name("restart")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(
        kafka.address,
        topic,
        ((f"o-{i}".encode(), encode(order_event(f"o-{i}", 1))) for i in range(total)),
    )
    produced = _produced_orders(kafka, topic)
    db = tmp_path / "orders.db"
    first = ConsumerProcess(
        [*_run_args(kafka, group, topic, db), "--batch-max-records", "100"], tmp_path / "first.log"
    )
    consumers.append(first)
    wait_until(
        lambda: sum(sqlite_checkpoints(db, group).values()) >= total // 4,
        timeout=120,
        interval=0.02,
        what="progress",
    )
    assert first.terminate() == 0, first.log_path.read_text()[-3000:]
    at_stop = sum(sqlite_checkpoints(db, group).values())
    assert at_stop < total, "the consumer finished before SIGTERM; the test proves nothing"
    assert _assert_sink_matches_checkpoints(db, group, produced) == at_stop
    events = [e["event"] for e in first.events()]
    assert "shutdown_requested" in events
    assert "consumer_stopped" in events

    second = ConsumerProcess(_run_args(kafka, group, topic, db), tmp_path / "second.log")
    consumers.append(second)
    ends = end_offsets(kafka.address, topic, PARTITIONS)
    wait_until(lambda: sqlite_checkpoints(db, group) == ends, timeout=180, what="catch up")
    assert second.terminate() == 0
    assert _assert_sink_matches_checkpoints(db, group, produced) == total
    # The restart resumed where the first left off: it processed only the rest.
    resumed = [e for e in second.events() if e.get("event") == "consumer_stopped"][-1]
    assert resumed["records"] == total - at_stop


def test_bad_record_stops_its_partition_and_nothing_after_it_commits(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("orders-bad"), unique_name("bad")
    create_topic(kafka.address, topic, 2)
    good = [(f"p0-{i}".encode(), encode(order_event(f"p0-{i}", 1))) for i in range(20)]
    malformed = (b"p0-bad", b'{"order_id": "p0-bad", "customer": ')  # truncated JSON
    p1_events = [order_event(f"p1-{i}", 1) for i in range(20)]
    p1_events[12] = {k: v for k, v in p1_events[12].items() if k != "amount_cents"}
    messages = [*good[:10], malformed, *good[10:]]
    pins = {key: 0 for key, _ in messages}
    p1 = [(e["order_id"].encode(), encode(e)) for e in p1_events]
    pins.update({key: 1 for key, _ in p1})
    produce(kafka.address, topic, [*messages, *p1], partition_of=pins)

    db = tmp_path / "orders.db"
    process = ConsumerProcess(
        [*_run_args(kafka, group, topic, db), "--stop-when-idle", "3"], tmp_path / "bad.log"
    )
    consumers.append(process)
    assert process.wait(timeout=120) == 2, process.log_path.read_text()[-3000:]

    stopped = {e["partition"]: e for e in process.events() if e.get("event") == "partition_stopped"}
    assert set(stopped) == {0, 1}
    assert stopped[0]["topic"] == topic
    assert stopped[0]["offset"] == 10
    assert stopped[0]["error_type"] == "DecodeError"
    assert "not valid JSON" in stopped[0]["error"]
    assert stopped[1]["offset"] == 12
    assert stopped[1]["field"] == "amount_cents"
    assert stopped[1]["error_type"] == "InvalidRecordError"

    ids = {r[0] for r in sqlite_rows(db, "SELECT order_id FROM orders")}
    assert ids == {f"p0-{i}" for i in range(10)} | {f"p1-{i}" for i in range(12)}
    assert sqlite_checkpoints(db, group) == {0: 10, 1: 12}

    # A restart hits the same record and stops again: the record never silently vanishes.
    again = ConsumerProcess(
        [*_run_args(kafka, group, topic, db), "--stop-when-idle", "3"], tmp_path / "again.log"
    )
    consumers.append(again)
    assert again.wait(timeout=120) == 2
    assert sqlite_checkpoints(db, group) == {0: 10, 1: 12}

    # `checkpoint show` reports where each partition stands and what is left behind it.
    shown = subprocess.run(
        [
            OFFSETKEEPER,
            "checkpoint",
            "show",
            "--bootstrap-servers",
            kafka.address,
            "--sink",
            f"sqlite:///{db}",
            "--group",
            group,
            "--format",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(shown.stdout)
    lag = {
        c["partition"]: (c["next_offset"], c["end_offset"], c["lag"]) for c in report["checkpoints"]
    }
    assert lag == {0: (10, 21, 11), 1: (12, 20, 8)}
    table = subprocess.run(
        [
            OFFSETKEEPER,
            "checkpoint",
            "show",
            "--bootstrap-servers",
            kafka.address,
            "--sink",
            f"sqlite:///{db}",
            "--group",
            group,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert f"{topic}  0          10           21          11" in table
