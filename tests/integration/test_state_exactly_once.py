"""Keyed state stays exact under faults, on SQLite and PostgreSQL, row by row.

The app (tests/apps/state_chaos.py) counts and sums per key in the keyed state: a record
applied twice or lost shows as a wrong count. Runs recover with a tiny state cache
(`--state-cache-mb 1`), so entries are evicted and read back from the sink, not only kept in
memory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.chaos import PacedProducer, chaos_event
from tests.fixtures.kafka_tools import create_topic, end_offsets, produce, unique_name
from tests.fixtures.processes import ConsumerProcess, process_state, run_args, wait_until
from tests.fixtures.services import Service
from tests.fixtures.state_chaos import verify_state_sink
from tests.integration.conftest import SinkUnderTest

pytestmark = [pytest.mark.integration, pytest.mark.fault]

APP = "tests.apps.state_chaos:app"
TINY_CACHE = ("--state-cache-mb", "1")


def _args(kafka: Service, group: str, topic: str, sink: str, *extra: str) -> list[str]:
    return run_args(APP, kafka.address, group, topic, sink, *extra)


def _produce_with_poison(kafka: Service, topic: str, total: int, keys: int) -> None:
    messages = [chaos_event(i, keys) for i in range(total)]
    for position in (500, 2_100, total - 3):  # bad records: dead-lettered, counted nowhere
        messages.insert(position, (b"k-poison", b"poison"))
    produce(kafka.address, topic, messages)


def _wait_caught_up(
    kafka: Service, topic: str, partitions: int, sink: SinkUnderTest, group: str
) -> None:
    ends = end_offsets(kafka.address, topic, partitions)
    wait_until(
        lambda: sink.checkpoints(group) == ends,
        timeout=180,
        what="checkpoints to reach the end offsets",
    )


@pytest.mark.parametrize(
    ("point", "backend"),
    [
        ("after-rows", "confluent"),
        ("after-commit", "confluent"),
        ("after-dead-letters", "confluent"),
        ("after-rows", "aiokafka"),
    ],
)
def test_kill_9_at_each_crash_point_keeps_every_count_exact(
    point: str,
    backend: str,
    kafka: Service,
    sink: SinkUnderTest,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    partitions, total, keys = 3, 12_000, 9_000
    topic, group = unique_name(f"state-{point}"), unique_name("state-kill")
    create_topic(kafka.address, topic, partitions)
    _produce_with_poison(kafka, topic, total, keys)
    flags = ("--backend", backend, "--on-bad-record", "dead-letter", "--bad-record-retries", "0")
    crashing = ConsumerProcess(
        _args(kafka, group, topic, sink.url, *flags, "--batch-max-records", "700"),
        tmp_path / "crashing.log",
        env={"OFFSETKEEPER_TEST_CRASH_POINT": point, "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "3"},
    )
    consumers.append(crashing)
    assert crashing.wait(timeout=120) == -signal.SIGKILL
    # Rows, state and checkpoints moved together: the committed offsets hold every event row
    # below them (up to the 3 poison records, which have none).
    committed = sum(sink.checkpoints(group).values())
    events = int(sink.query("SELECT count(*) FROM state_events")[0][0])
    assert committed - 3 <= events <= committed
    if point != "after-dead-letters":  # that one crashes at the third batch with a letter
        assert committed == (1_400 if point == "after-rows" else 2_100)
    assert committed < total

    recovering = ConsumerProcess(
        _args(kafka, group, topic, sink.url, *flags, *TINY_CACHE), tmp_path / "recovering.log"
    )
    consumers.append(recovering)
    _wait_caught_up(kafka, topic, partitions, sink, group)
    assert recovering.terminate() == 0
    counts = verify_state_sink(kafka.address, topic, partitions, sink.query, group)
    assert counts["records"] == total
    reads = [e for e in recovering.events() if e.get("event") == "consumer_stopped"]
    print(f"state kill -9 at {point} ({backend}): {counts}; {reads[-1] if reads else ''}")


def test_a_zombie_is_fenced_and_none_of_its_counts_land(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions = 3
    topic, group = unique_name("state-zombie"), unique_name("state-zombie-group")
    create_topic(kafka.address, topic, partitions)
    produce(kafka.address, topic, (chaos_event(i, 300) for i in range(6_000)))
    zombie = ConsumerProcess(
        _args(kafka, group, topic, sink.url, "--batch-max-records", "300"),
        tmp_path / "zombie.log",
        env={"CHAOS_SELF_STOP_AT": "0:700"},
    )
    consumers.append(zombie)
    wait_until(
        lambda: process_state(zombie.pid) == "T", timeout=60, what="the zombie to stop itself"
    )
    assert sink.checkpoints(group).get(0, 0) <= 700

    successor = ConsumerProcess(
        _args(kafka, group, topic, sink.url, *TINY_CACHE), tmp_path / "successor.log"
    )
    consumers.append(successor)
    _wait_caught_up(kafka, topic, partitions, sink, group)
    settled = sink.checkpoints(group)
    os.kill(zombie.pid, signal.SIGCONT)
    fenced = zombie.wait_for_event("partitions_fenced", timeout=60, what="the zombie's fencing")
    assert f"{topic}[0]" in fenced["partitions"]
    time.sleep(2)
    assert sink.checkpoints(group) == settled, "the zombie moved checkpoints"
    assert successor.terminate() == 0
    zombie.terminate()
    verify_state_sink(kafka.address, topic, partitions, sink.query, group)


def test_three_members_through_kill_join_and_leave_keep_every_count_exact(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions, total = 6, 40_000
    topic, group = unique_name("state-group"), unique_name("state-group")
    create_topic(kafka.address, topic, partitions)
    producer = PacedProducer(kafka.address, topic, total=total, rate=5_000, keys=4_000).start()

    def member(name: str) -> ConsumerProcess:
        process = ConsumerProcess(
            _args(kafka, group, topic, sink.url, *TINY_CACHE), tmp_path / f"{name}.log"
        )
        consumers.append(process)
        return process

    first, second, third = member("c1"), member("c2"), member("c3")
    for process in (first, second, third):
        process.wait_for_event("partitions_assigned", timeout=60, what="an assignment")
    time.sleep(3)
    first.kill()
    fourth = member("c4")
    time.sleep(4)
    assert second.terminate() == 0
    producer.join(timeout=120)
    _wait_caught_up(kafka, topic, partitions, sink, group)
    assert third.terminate() == 0
    assert fourth.terminate() == 0
    counts = verify_state_sink(kafka.address, topic, partitions, sink.query, group)
    assert counts["records"] == total
