"""Exactly once into a Kafka topic (`kafka://` sink): kill -9 at the commit sequence's kill points
and at random moments, and a zombie member whose late commit the group coordinator fences. A
read_committed reader of the output topic is checked record by record against the input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_sink import committed_offsets, read_output, verify_chaos_output
from tests.fixtures.kafka_tools import create_topic, end_offsets, produce, unique_name
from tests.fixtures.processes import (
    OFFSETKEEPER,
    REPO,
    ConsumerProcess,
    process_state,
    run_args,
    wait_until,
)
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

INPUT_PARTITIONS = 4
OUTPUT_PARTITIONS = 3
# Short, so a transaction left open by kill -9 stops blocking readers and the next owner soon.
TRANSACTION_TIMEOUT_MS = 5000


def _sink_url(kafka: Service, output: str) -> str:
    return f"kafka://{kafka.address}/{output}?transaction_timeout_ms={TRANSACTION_TIMEOUT_MS}"


def _args(kafka: Service, group: str, topic: str, output: str, *extra: str) -> list[str]:
    return run_args(
        "tests.apps.chaos:app",
        kafka.address,
        group,
        topic,
        _sink_url(kafka, output),
        "--batch-max-records",
        "300",
        *extra,
    )


def _topics(kafka: Service, prefix: str, records: int) -> tuple[str, str, str]:
    topic, output, group = unique_name(prefix), unique_name(f"{prefix}-out"), unique_name(prefix)
    create_topic(kafka.address, topic, INPUT_PARTITIONS)
    create_topic(kafka.address, output, OUTPUT_PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 2_000) for i in range(records)))
    return topic, output, group


def _committed(kafka: Service, group: str, topic: str) -> dict[int, int]:
    return committed_offsets(kafka.address, group, topic, INPUT_PARTITIONS)


def test_kill_9_at_the_kill_points_and_at_random_moments_outputs_each_record_once(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 24_000
    topic, output, group = _topics(kafka, "kafka-sink-crash", total)

    # The commit sequence's kill points: outputs produced inside the open transaction (no
    # offsets, no commit yet), and right after commit_transaction.
    for point, batch in (("after-rows", 3), ("after-commit", 2)):
        crashing = ConsumerProcess(
            _args(kafka, group, topic, output),
            tmp_path / f"crash-{point}.log",
            env={
                "OFFSETKEEPER_TEST_CRASH_POINT": point,
                "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": str(batch),
            },
        )
        consumers.append(crashing)
        assert crashing.wait(timeout=120) == -signal.SIGKILL, crashing.log_path.read_text()[-3000:]
        print(f"crash at {point} (batch {batch}): committed {_committed(kafka, group, topic)}")

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill moments seed={seed}")
    for kill_number, fraction in enumerate(sorted(rng.uniform(0.15, 0.7) for _ in range(2)), 1):
        process = ConsumerProcess(
            _args(kafka, group, topic, output), tmp_path / f"consumer-{kill_number}.log"
        )
        consumers.append(process)
        target = max(int(total * fraction), sum(_committed(kafka, group, topic).values()) + 1000)
        wait_until(
            lambda target=target, process=process: (
                sum(_committed(kafka, group, topic).values()) >= target or not process.alive()
            ),
            timeout=120,
            interval=0.05,
            what=f"progress to {target} before kill {kill_number}",
        )
        time.sleep(rng.uniform(0, 0.05))  # an arbitrary instant of the batch cycle
        assert process.alive(), f"consumer exited early:\n{process.log_path.read_text()[-3000:]}"
        process.kill()
        print(f"kill {kill_number}: committed {sum(_committed(kafka, group, topic).values())}")

    final = ConsumerProcess(
        _args(kafka, group, topic, output, "--stop-when-idle", "3"), tmp_path / "final.log"
    )
    consumers.append(final)
    assert final.wait(timeout=180) == 0, final.log_path.read_text()[-3000:]
    assert _committed(kafka, group, topic) == end_offsets(kafka.address, topic, INPUT_PARTITIONS)
    counts = verify_chaos_output(kafka.address, topic, INPUT_PARTITIONS, output, OUTPUT_PARTITIONS)
    print(f"kafka sink after 4 crashes: {counts}")
    assert counts["records"] == total
    assert counts["writers"] >= 3, "the crashed processes committed nothing; the test is weak"


def test_zombie_member_is_fenced_and_its_stale_batch_is_never_visible(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, output, group = _topics(kafka, "kafka-sink-zombie", 6_000)
    # The zombie stops itself while processing partition 0, offset 700: mid-batch, uncommitted.
    zombie = ConsumerProcess(
        _args(kafka, group, topic, output),
        tmp_path / "zombie.log",
        env={"CHAOS_SELF_STOP_AT": "0:700"},
    )
    consumers.append(zombie)
    wait_until(
        lambda: process_state(zombie.pid) == "T", timeout=60, what="the zombie to stop itself"
    )
    frozen = _committed(kafka, group, topic)
    assert frozen.get(0, 0) <= 700, "offset 700 of partition 0 must not be committed yet"

    successor = ConsumerProcess(_args(kafka, group, topic, output), tmp_path / "successor.log")
    consumers.append(successor)
    ends = end_offsets(kafka.address, topic, INPUT_PARTITIONS)
    wait_until(
        lambda: _committed(kafka, group, topic) == ends,
        timeout=120,
        what="the successor to take over and catch up",
    )

    os.kill(zombie.pid, signal.SIGCONT)
    fenced = zombie.wait_for_event(
        "partitions_fenced", timeout=60, what="the zombie's fencing log line"
    )
    assert f"{topic}[0]" in fenced["partitions"]
    time.sleep(2)  # let anything the zombie might still do happen before we look
    assert _committed(kafka, group, topic) == ends, "the zombie moved the group's offsets"
    zombie_rows = [
        m
        for m in read_output(kafka.address, output, OUTPUT_PARTITIONS, isolation="read_committed")
        if m.table == "chaos_events"
        and m.row["writer"].startswith(f"{zombie.pid}-")
        and m.row["source_partition"] == 0
        and m.row["source_offset"] >= frozen.get(0, 0)
    ]
    assert zombie_rows == [], "outputs of the zombie's stale batch became visible"
    assert successor.terminate() == 0
    zombie.terminate()
    counts = verify_chaos_output(kafka.address, topic, INPUT_PARTITIONS, output, OUTPUT_PARTITIONS)
    print(f"kafka sink zombie: {counts}")


def _offsetkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OFFSETKEEPER, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_replay_job_outputs_its_range_once_and_keeps_its_checkpoint_in_kafka(
    kafka: Service,
) -> None:
    topic, output, _group = _topics(kafka, "kafka-sink-replay", 2_000)
    replay = (
        "replay",
        "--bootstrap-servers",
        kafka.address,
        "--app",
        "tests.apps.chaos:app",
        "--topic",
        topic,
        "--from-offset",
        "100",
        "--to-offset",
        "300",
        "--sink",
        _sink_url(kafka, output),
        "--job-id",
        "backfill-1",
    )
    first = _offsetkeeper(*replay)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _offsetkeeper(*replay)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout

    events = [
        m
        for m in read_output(kafka.address, output, OUTPUT_PARTITIONS, isolation="read_committed")
        if m.table == "chaos_events"
    ]
    coordinates = sorted((m.row["source_partition"], m.row["source_offset"]) for m in events)
    assert coordinates == [(p, o) for p in range(INPUT_PARTITIONS) for o in range(100, 300)]
    assert committed_offsets(kafka.address, "replay:backfill-1", topic, INPUT_PARTITIONS) == {
        p: 300 for p in range(INPUT_PARTITIONS)
    }
    shown = _offsetkeeper(
        "checkpoint",
        "show",
        "--bootstrap-servers",
        kafka.address,
        "--sink",
        _sink_url(kafka, output),
        "--group",
        "replay:backfill-1",
        "--format",
        "json",
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    report = json.loads(shown.stdout)
    assert {(c["partition"], c["next_offset"], c["format"]) for c in report["checkpoints"]} == {
        (p, 300, 3) for p in range(INPUT_PARTITIONS)
    }


def test_the_offset_reader_child_reads_what_the_admin_client_reads_and_survives_sigsegv(
    kafka: Service,
) -> None:
    """The Kafka sink reads committed offsets in a child process (librdkafka#5040 crashes the
    admin client on a moving coordinator): against the real broker its answers are the admin
    client's own, and a child dead of SIGSEGV between two reads is replaced on the next one."""
    from confluent_kafka import (  # noqa: PLC0415
        Consumer,
        ConsumerGroupTopicPartitions,
        TopicPartition,
    )
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    from consumer import TopicPartition as ConsumerTopicPartition  # noqa: PLC0415
    from sinks._kafka_groups import committed_checkpoints  # noqa: PLC0415
    from sinks._kafka_offset_reader import IsolatedOffsetReader  # noqa: PLC0415

    topic, group = unique_name("offset-reader"), unique_name("offset-reader")
    create_topic(kafka.address, topic, 3)
    committer = Consumer({"bootstrap.servers": kafka.address, "group.id": group})
    committer.commit(
        offsets=[
            TopicPartition(topic, 0, 17, metadata="plain metadata"),
            TopicPartition(topic, 2, 5),
        ],
        asynchronous=False,
    )
    committer.close()
    config = {"bootstrap.servers": kafka.address}
    reader = IsolatedOffsetReader(config, sink="kafka://test")
    try:
        via_child = reader.list_offsets(
            group, [(topic, 0), (topic, 1), (topic, 2)], require_stable=True, timeout_s=15
        )
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(3)])
        admin = AdminClient(config)  # held: a client collected meanwhile never answers
        direct = (
            admin.list_consumer_group_offsets([request], require_stable=True)[group]
            .result(30)
            .topic_partitions
        )
        assert [(a.topic, a.partition, a.offset, a.metadata, a.error) for a in via_child] == [
            (d.topic, d.partition, d.offset, d.metadata, d.error) for d in direct
        ]
        assert [a.offset for a in via_child] == [17, -1001, 5]
        assert via_child[0].metadata == "plain metadata"

        first = reader.child_pid
        assert first is not None
        os.kill(first, signal.SIGSEGV)
        whole_group = reader.list_offsets(group, None, require_stable=False, timeout_s=15)
        assert sorted((a.partition, a.offset) for a in whole_group) == [(0, 17), (2, 5)]
        assert reader.child_pid not in (None, first)
        assert reader.crashes == 1
        # The sink's checkpoint read on assignment goes through it: a plain consumer's
        # offsets are adopted as format-1 checkpoints.
        checkpoints = committed_checkpoints(
            reader, group, [ConsumerTopicPartition(topic, p) for p in range(3)], wait_s=5
        )
        assert {tp.partition: c.next_offset for tp, c in checkpoints.items()} == {0: 17, 2: 5}
    finally:
        reader.close()
