"""Keyed state on the Kafka sink (`consumer.StateStore`) against a real broker: entries are
written to a compacted changelog topic in the batch's transaction, an aborted or fenced batch
leaves none, and a fresh sink (as a new process) restores exactly what was committed. Then the
engine: a non-idempotent stateful app (count and sum per key) stays exact through kill -9 at
the commit sequence's kill points and at random moments, and through a graceful restart; a
group of members over a paced stream through kill -9, a join and a graceful leave; and a
SIGSTOPped zombie member, fenced when it resumes (stopped before its transaction or inside it).
Every key's totals are checked in the state a fresh sink restores and in the committed output,
row by row, against the truth computed from the input topic."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from consumer import (
    Checkpoint,
    ConfigError,
    FencedError,
    StateChange,
    StateEntry,
    Table,
    TopicPartition,
)
from sinks import KafkaSink
from sinks._kafka_settings import parse_kafka_url
from sinks._kafka_state import Changelogs, changelog_topic
from tests.fixtures.chaos import PacedProducer, chaos_event
from tests.fixtures.kafka_sink import Isolation, committed_offsets, read_output
from tests.fixtures.kafka_tools import (
    create_topic,
    end_offsets,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import ConsumerProcess, process_state, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration]
fault = pytest.mark.fault

SOURCE_PARTITIONS = 3
TOTALS = Table(name="totals", columns={"key": "text", "n": "bigint"}, key=("key",))
# Short, so a transaction a test leaves open does not block readers for long.
TRANSACTION_TIMEOUT_MS = 5000


def _url(kafka: Service, output: str, options: str = "") -> str:
    return f"kafka://{kafka.address}/{output}?transaction_timeout_ms={TRANSACTION_TIMEOUT_MS}" + (
        f"&{options}" if options else ""
    )


def _topics(kafka: Service, prefix: str) -> tuple[str, str, str]:
    source, output, group = (
        unique_name(prefix),
        unique_name(f"{prefix}-out"),
        unique_name(f"{prefix}-group"),
    )
    create_topic(kafka.address, source, SOURCE_PARTITIONS)
    create_topic(kafka.address, output, 1)
    _wait_for_topics(kafka, source, output)
    return source, output, group


def _wait_for_topics(kafka: Service, *topics: str) -> None:
    """Until the broker's metadata shows the topics just created (a sink opened at once could
    find its output topic missing, on a broker that just started)."""
    admin = AdminClient({"bootstrap.servers": kafka.address})

    def shown() -> bool:
        listed = admin.list_topics(timeout=10).topics
        return all(t in listed and listed[t].error is None and listed[t].partitions for t in topics)

    wait_until(shown, timeout=30, interval=0.1, what=f"the metadata of {topics}")


def _sink(url: str, group: str, partitions: list[TopicPartition]) -> tuple[KafkaSink, Any]:
    """A sink opened and assigned `partitions` of `group`, as the engine does at start-up."""
    sink = KafkaSink(parse_kafka_url(url))
    sink.open([TOTALS])
    epochs = sink.acquire(group, partitions)
    sink.load_checkpoints(group, partitions)
    return sink, epochs


def _set(tp: TopicPartition, key: str, value: Any, version: int = 1) -> StateChange:
    return StateChange(tp, key, json.dumps(value).encode(), version)


def _delete(tp: TopicPartition, key: str) -> StateChange:
    return StateChange(tp, key, None, 1)


def _checkpoint(tp: TopicPartition, group: str, offset: int, **extra: Any) -> Checkpoint:
    return Checkpoint(
        group=group,
        topic=tp.topic,
        partition=tp.partition,
        next_offset=offset,
        updated_at=datetime.now(UTC),
        **extra,
    )


def _batch(
    sink: KafkaSink,
    group: str,
    epochs: Any,
    changes: list[StateChange],
    offsets: dict[TopicPartition, int],
    *,
    commit: bool = True,
) -> None:
    sink.begin()
    try:
        sink.write_rows(TOTALS, [{"key": c.key, "n": len(c.value or b"")} for c in changes])
        sink.write_state(group, changes)
        sink.save_checkpoints(
            group, [_checkpoint(tp, group, offset) for tp, offset in offsets.items()], epochs
        )
    except BaseException:
        sink.rollback()
        raise
    if commit:
        sink.commit()
    else:
        sink.rollback()


def _everything(sink: KafkaSink, group: str, tps: list[TopicPartition]) -> dict[int, list[Any]]:
    return {
        tp.partition: [(e.key, json.loads(e.value), e.version) for e in sink.scan_state(group, tp)]
        for tp in tps
    }


def _topic_config(kafka: Service, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": kafka.address})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def _changelog_contents(
    kafka: Service,
    changelog: str,
    partitions: int = SOURCE_PARTITIONS,
    isolation: str = "read_uncommitted",
) -> dict[int, list[tuple[bytes, Any]]]:
    """(key, value) of every record of the changelog (by default aborted ones included), per
    partition; read until each position reaches its end (markers take offsets too)."""
    reader = confluent_kafka.Consumer(
        {
            "bootstrap.servers": kafka.address,
            "group.id": unique_name("changelog-reader"),
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    try:
        wanted = [confluent_kafka.TopicPartition(changelog, p) for p in range(partitions)]
        ends = {tp.partition: reader.get_watermark_offsets(tp, timeout=10)[1] for tp in wanted}
        reader.assign([confluent_kafka.TopicPartition(changelog, p, 0) for p in ends])
        contents: dict[int, list[tuple[bytes, Any]]] = {p: [] for p in ends}
        deadline = time.monotonic() + 60
        while any(tp.offset < ends[tp.partition] for tp in reader.position(wanted)):
            assert time.monotonic() < deadline, f"could not read {changelog} to {ends}"
            for message in reader.consume(num_messages=1000, timeout=0.5):
                if message.error() is None:
                    contents[message.partition()].append((message.key(), message.value()))
        return contents
    finally:
        reader.close()


def test_committed_state_restores_exactly_in_a_fresh_sink_and_aborted_state_never(
    kafka: Service,
) -> None:
    source, output, group = _topics(kafka, "state-restore")
    tps = [TopicPartition(source, p) for p in range(SOURCE_PARTITIONS)]
    url = _url(kafka, output, "state_replication_factor=1&state_min_insync_replicas=1")
    first, epochs = _sink(url, group, tps)
    try:
        assert first.read_state(group, tps[0], ["a"]) == {}, "no changelog yet: no state"
        odd_key = 'we"ird key/é\u2603'
        _batch(
            first,
            group,
            epochs,
            [
                _set(tps[0], "a", {"count": 1, "sum": 10}),
                _set(tps[0], "b", {"count": 1, "sum": 5}),
                _set(tps[1], "a", [1, 2, 3], version=2),
                _set(tps[1], odd_key, "x"),
            ],
            {tps[0]: 10, tps[1]: 5},
        )
        assert first.read_state(group, tps[0], ["a", "b", "zz"]) == {
            "a": StateEntry("a", b'{"count": 1, "sum": 10}', 1),
            "b": StateEntry("b", b'{"count": 1, "sum": 5}', 1),
        }
        # Aborted: none of it may ever be seen, here or after a restore.
        _batch(
            first,
            group,
            epochs,
            [_set(tps[0], "a", {"count": 99, "sum": 99}), _set(tps[2], "ghost", 1)],
            {tps[0]: 20, tps[2]: 7},
            commit=False,
        )
        assert first.read_state(group, tps[0], ["a"])["a"].value == b'{"count": 1, "sum": 10}'
        # Committed: an update, a delete, a new entry; then a key deleted and set again.
        _batch(
            first,
            group,
            epochs,
            [
                _set(tps[0], "a", {"count": 2, "sum": 13}),
                _delete(tps[0], "b"),
                _set(tps[0], "c", None),
                _set(tps[1], "gone-then-back", 1),
            ],
            {tps[0]: 12, tps[1]: 6},
        )
        _batch(first, group, epochs, [_delete(tps[1], "gone-then-back")], {tps[1]: 7})
        _batch(first, group, epochs, [_set(tps[1], "gone-then-back", 2)], {tps[1]: 8})
        expected = {
            0: [("a", {"count": 2, "sum": 13}, 1), ("c", None, 1)],
            1: [("a", [1, 2, 3], 2), ("gone-then-back", 2, 1), (odd_key, "x", 1)],
            2: [],
        }
        assert _everything(first, group, tps) == expected
    finally:
        first.close()

    fresh, _ = _sink(url, group, tps)  # a new process: restored from the changelog
    try:
        assert _everything(fresh, group, tps) == expected
        assert fresh.read_state(group, tps[0], ["a", "b"]) == {
            "a": StateEntry("a", b'{"count": 2, "sum": 13}', 1)
        }
        sizes = {tp.partition: size for tp, size in fresh.state_sizes(group).items()}
        assert sizes == {0: (2, len(b'{"count": 2, "sum": 13}') + 4), 1: (3, 9 + 1 + 3)}
        assert fresh.state_sizes(group, [tps[2]]) == {}
    finally:
        fresh.close()
    assert committed_offsets(kafka.address, group, source, SOURCE_PARTITIONS) == {0: 12, 1: 8}

    changelog = changelog_topic("offsetkeeper-state", group, source)
    config = _topic_config(kafka, changelog)
    assert config["cleanup.policy"] == "compact"
    assert config["min.insync.replicas"] == "1"
    contents = _changelog_contents(kafka, changelog)
    keys = {p: {json.loads(key)[1] for key, _ in records} for p, records in contents.items()}
    # Partition p holds source partition p's entries; the aborted batch's records are in the log
    # (a read_uncommitted reader sees them) but were never restored.
    assert keys[0] == {"a", "b", "c"}
    assert keys[1] == {"a", odd_key, "gone-then-back"}
    # The aborted batch's record may not have reached the log before the abort.
    assert keys[2] <= {"ghost"}
    tombstones = [json.loads(key) for key, value in contents[0] if value is None]
    assert tombstones == [[0, "b"]]


def test_a_fenced_zombie_transaction_writes_no_state(kafka: Service) -> None:
    source, output, group = _topics(kafka, "state-zombie")
    tps = [TopicPartition(source, p) for p in range(SOURCE_PARTITIONS)]
    url = _url(kafka, output)
    # Without group metadata the sink commits as the group's single writer with the stable
    # transactional.id offsetkeeper-<group>: a newer sink fences the older one's producer.
    zombie, zombie_epochs = _sink(url, group, tps)
    try:
        _batch(zombie, group, zombie_epochs, [_set(tps[0], "k", {"count": 1})], {tps[0]: 1})
        zombie.begin()
        zombie.write_rows(TOTALS, [{"key": "k", "n": 2}])
        zombie.write_state(group, [_set(tps[0], "k", {"count": 2}), _set(tps[1], "z", 1)])
        zombie.save_checkpoints(
            group, [_checkpoint(tps[0], group, 2), _checkpoint(tps[1], group, 1)], zombie_epochs
        )

        successor, epochs = _sink(url, group, tps)  # takes the id over: the zombie is fenced
        try:
            with pytest.raises(FencedError):
                zombie.commit()
            zombie.rollback()
            assert _everything(successor, group, tps) == {
                0: [("k", {"count": 1}, 1)],
                1: [],
                2: [],
            }
            _batch(successor, group, epochs, [_set(tps[0], "k", {"count": 5})], {tps[0]: 3})
        finally:
            successor.close()
    finally:
        zombie.close()
    restored, _ = _sink(url, group, tps)
    try:
        assert _everything(restored, group, tps) == {0: [("k", {"count": 5}, 1)], 1: [], 2: []}
    finally:
        restored.close()
    assert committed_offsets(kafka.address, group, source, SOURCE_PARTITIONS) == {0: 3}


def _member(kafka: Service, group: str, source: str) -> confluent_kafka.Consumer:
    """A real member of `group`, assigned partitions of `source`."""
    member = confluent_kafka.Consumer(
        {
            "bootstrap.servers": kafka.address,
            "group.id": group,
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    member.subscribe([source])
    deadline = time.monotonic() + 60
    while not member.assignment():
        assert time.monotonic() < deadline, "the member was never assigned partitions"
        member.poll(0.2)
    return member


def test_a_member_evicted_from_the_group_commits_no_state(kafka: Service) -> None:
    source, output, group = _topics(kafka, "state-evicted")
    tps = [TopicPartition(source, p) for p in range(SOURCE_PARTITIONS)]
    old_member = _member(kafka, group, source)
    old_metadata = old_member.consumer_group_metadata()
    zombie = KafkaSink(parse_kafka_url(_url(kafka, output)))
    zombie.bind_group_metadata(lambda: old_metadata)  # what it held before it was evicted
    zombie.open([TOTALS])
    try:
        epochs = zombie.acquire(group, tps)
        zombie.begin()
        zombie.write_state(group, [_set(tps[0], "k", "stale")])
        old_member.close()  # leaves the group: its generation and member id are stale now
        new_member = _member(kafka, group, source)
        try:
            # The coordinator refuses the stale member's offsets: the batch is aborted.
            with pytest.raises(FencedError):
                zombie.save_checkpoints(group, [_checkpoint(tps[0], group, 1)], epochs)
            zombie.rollback()
        finally:
            new_member.close()
    finally:
        zombie.close()
    fresh, _ = _sink(_url(kafka, output), group, tps)
    try:
        assert _everything(fresh, group, tps) == {0: [], 1: [], 2: []}
    finally:
        fresh.close()
    assert committed_offsets(kafka.address, group, source, SOURCE_PARTITIONS) == {}


def test_a_changelog_that_is_not_compacted_or_too_small_is_refused(kafka: Service) -> None:
    source, output, _ = _topics(kafka, "state-refused")
    tp = TopicPartition(source, 2)
    admin = AdminClient({"bootstrap.servers": kafka.address})
    deleting, small = unique_name("state-deleting"), unique_name("state-small")
    admin.create_topics(
        [
            NewTopic(
                changelog_topic("offsetkeeper-state", deleting, source),
                num_partitions=SOURCE_PARTITIONS,
                replication_factor=1,
                config={"cleanup.policy": "compact,delete"},
            ),
            NewTopic(
                changelog_topic("offsetkeeper-state", small, source),
                num_partitions=1,
                replication_factor=1,
                config={"cleanup.policy": "compact"},
            ),
        ]
    )[changelog_topic("offsetkeeper-state", small, source)].result(timeout=30)
    time.sleep(1)
    for group, message in ((deleting, "cleanup.policy=compact"), (small, "fewer partitions")):
        sink, _ = _sink(_url(kafka, output), group, [tp])
        try:
            with pytest.raises(ConfigError, match=message):
                sink.read_state(group, tp, ["k"])
            sink.begin()
            with pytest.raises(ConfigError, match=message):
                sink.write_state(group, [_set(tp, "k", 1)])
            sink.rollback()
        finally:
            sink.close()


def test_members_creating_the_changelog_at_once_all_write_to_it(kafka: Service) -> None:
    """The first batches of a group's members create its changelog at the same moment: the
    losers of the race (TOPIC_ALREADY_EXISTS) must not read the broker's metadata, which may
    not show the topic yet, as "fewer partitions" (a ConfigError that stops a member)."""
    source, output, _ = _topics(kafka, "state-race")
    settings = parse_kafka_url(_url(kafka, output))
    failures: list[str] = []
    for _round in range(8):
        group = unique_name("state-race-group")
        barrier = threading.Barrier(SOURCE_PARTITIONS)

        def member(
            partition: int, group: str = group, barrier: threading.Barrier = barrier
        ) -> None:
            admin = AdminClient({"bootstrap.servers": kafka.address})
            changelogs = Changelogs(settings, sink="race")
            barrier.wait()
            try:
                changelogs.for_writing(admin, group, TopicPartition(source, partition))
            except Exception as exc:
                failures.append(f"{group} partition {partition}: {exc!r}")

        threads = [threading.Thread(target=member, args=(p,)) for p in range(SOURCE_PARTITIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, "\n".join(failures)


def test_the_legacy_state_blob_in_the_offset_metadata_is_written_as_given(
    kafka: Service,
) -> None:
    source, output, group = _topics(kafka, "state-legacy")
    tp = TopicPartition(source, 0)
    sink, epochs = _sink(_url(kafka, output), group, [tp])
    try:
        sink.begin()
        sink.save_checkpoints(
            group, [_checkpoint(tp, group, 4, state=b'{"a": 1}', state_version=2)], epochs
        )
        sink.commit()
        stored = sink.load_checkpoints(group, [tp])[tp]
        assert (stored.next_offset, stored.state, stored.state_version) == (4, b'{"a": 1}', 2)
    finally:
        sink.close()


# --- the engine: a non-idempotent stateful app through kill -9 and restarts -------------------

ENGINE_PARTITIONS = 4
ENGINE_KEYS = 150


def _totals_event(index: int) -> tuple[bytes, bytes]:
    key = f"k-{index % ENGINE_KEYS}"
    return key.encode(), json.dumps({"key": key, "amount": (index * 7919) % 1000 + 1}).encode()


def _totals_args(kafka: Service, group: str, topic: str, output: str, *extra: str) -> list[str]:
    return run_args(
        "tests.apps.kafka_state_totals:app",
        kafka.address,
        group,
        topic,
        _url(kafka, output),
        "--batch-max-records",
        "300",
        *extra,
    )


def _truth(kafka: Service, topic: str) -> dict[int, dict[str, tuple[int, int]]]:
    """Per partition, each key's (count, sum) computed from the input records."""
    truth: dict[int, dict[str, tuple[int, int]]] = {}
    for partition, records in partition_contents(kafka.address, topic, ENGINE_PARTITIONS).items():
        totals = truth.setdefault(partition, {})
        for _offset, _key, value in records:
            event = json.loads(value or b"")
            count, total = totals.get(event["key"], (0, 0))
            totals[event["key"]] = (count + 1, total + event["amount"])
    return truth


def _progress(kafka: Service, group: str, topic: str) -> int:
    return sum(committed_offsets(kafka.address, group, topic, ENGINE_PARTITIONS).values())


def _crash_at_kill_points(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess], args: list[str]
) -> None:
    """after-rows: rows AND state changes produced in the open transaction, no offsets, no
    commit; after-commit: right after commit_transaction."""
    for point, batch in (("after-rows", 3), ("after-commit", 2), ("after-rows", 2)):
        crashing = ConsumerProcess(
            args,
            tmp_path / f"crash-{point}-{batch}.log",
            env={
                "OFFSETKEEPER_TEST_CRASH_POINT": point,
                "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": str(batch),
            },
        )
        consumers.append(crashing)
        assert crashing.wait(timeout=120) == -signal.SIGKILL, crashing.log_path.read_text()[-3000:]


def _kill_at_random_moments(
    kafka: Service,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
    args: list[str],
    where: tuple[str, str, int],
) -> None:
    group, topic, total = where
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill moments seed={seed}")
    for number, fraction in enumerate(sorted(rng.uniform(0.3, 0.75) for _ in range(2)), 1):
        process = ConsumerProcess(args, tmp_path / f"consumer-{number}.log")
        consumers.append(process)
        target = max(int(total * fraction), _progress(kafka, group, topic) + 600)
        wait_until(
            lambda target=target, process=process: (
                _progress(kafka, group, topic) >= target or not process.alive()
            ),
            timeout=120,
            interval=0.05,
            what=f"progress to {target} before kill {number}",
        )
        time.sleep(rng.uniform(0, 0.05))  # an arbitrary instant of the batch cycle
        assert process.alive(), f"consumer exited early:\n{process.log_path.read_text()[-3000:]}"
        process.kill()


@fault
def test_a_stateful_app_counts_each_record_once_through_kill_9_and_restarts(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 12_000
    topic, output, group = (
        unique_name("state-engine"),
        unique_name("state-engine-out"),
        unique_name("state-engine"),
    )
    create_topic(kafka.address, topic, ENGINE_PARTITIONS)
    create_topic(kafka.address, output, 2)
    produce(kafka.address, topic, (_totals_event(i) for i in range(total)))
    args = _totals_args(kafka, group, topic, output)

    _crash_at_kill_points(kafka, tmp_path, consumers, args)
    # A graceful restart: the next process restores the state from the changelog.
    graceful = ConsumerProcess(args, tmp_path / "graceful.log")
    consumers.append(graceful)
    before = _progress(kafka, group, topic)
    wait_until(
        lambda: _progress(kafka, group, topic) >= before + 900 or not graceful.alive(),
        timeout=120,
        what="progress before the graceful restart",
    )
    assert graceful.terminate() == 0, graceful.log_path.read_text()[-3000:]
    _kill_at_random_moments(kafka, tmp_path, consumers, args, (group, topic, total))

    final = ConsumerProcess(
        _totals_args(kafka, group, topic, output, "--stop-when-idle", "3"), tmp_path / "final.log"
    )
    consumers.append(final)
    assert final.wait(timeout=240) == 0, final.log_path.read_text()[-3000:]
    ends = end_offsets(kafka.address, topic, ENGINE_PARTITIONS)
    assert committed_offsets(kafka.address, group, topic, ENGINE_PARTITIONS) == ends
    truth = _truth(kafka, topic)
    assert sum(count for keys in truth.values() for count, _ in keys.values()) == total

    # The state, restored by a fresh sink as a new process would: every key exact.
    tps = [TopicPartition(topic, p) for p in range(ENGINE_PARTITIONS)]
    fresh, _ = _sink(_url(kafka, output), group, tps)
    try:
        restored = {
            tp.partition: {
                entry.key: (json.loads(entry.value)["count"], json.loads(entry.value)["sum"])
                for entry in fresh.scan_state(group, tp)
            }
            for tp in tps
        }
    finally:
        fresh.close()
    assert restored == truth

    # The outputs: the last committed row of each key holds its exact totals.
    latest: dict[str, tuple[int, int]] = {}
    for message in read_output(kafka.address, output, 2, isolation="read_committed"):
        latest[message.row["event_key"]] = (message.row["count"], message.row["sum"])
    assert latest == {key: totals for keys in truth.values() for key, totals in keys.items()}
    changelog = changelog_topic("offsetkeeper-state", group, topic)
    written, committed = (
        sum(len(records) for records in _changelog_contents(kafka, changelog, 4, i).values())
        for i in ("read_uncommitted", "read_committed")
    )
    # Aborted records show only when the killed producer had sent them before the kill
    # (after-rows kills right after produce(), often before the batch left the client).
    print(f"changelog records: {committed} committed, {written - committed} aborted")
    assert written >= committed


# --- the engine: a group of members, and a zombie, over a paced stream ------------------------

CHAOS_APP = "tests.apps.kafka_state_chaos:app"
CHAOS_OUTPUT_PARTITIONS = 2

Totals = dict[str, tuple[int, int]]


def _chaos_args(kafka: Service, group: str, topic: str, output: str, *extra: str) -> list[str]:
    return run_args(
        CHAOS_APP,
        kafka.address,
        group,
        topic,
        _url(kafka, output),
        "--backend",
        "confluent",
        *extra,
    )


def _chaos_topics(kafka: Service, prefix: str, partitions: int) -> tuple[str, str, str]:
    topic, output, group = (
        unique_name(prefix),
        unique_name(f"{prefix}-out"),
        unique_name(f"{prefix}-group"),
    )
    create_topic(kafka.address, topic, partitions)
    create_topic(kafka.address, output, CHAOS_OUTPUT_PARTITIONS)
    _wait_for_topics(kafka, topic, output)
    return topic, output, group


def _wait_caught_up(kafka: Service, group: str, topic: str, partitions: int) -> dict[int, int]:
    ends = end_offsets(kafka.address, topic, partitions)
    wait_until(
        lambda: committed_offsets(kafka.address, group, topic, partitions) == ends,
        timeout=120,
        interval=0.5,
        what=f"the group's committed offsets to reach the end offsets {ends}",
    )
    return ends


def _restored_totals(kafka: Service, output: str, group: str, tps: list[TopicPartition]) -> Totals:
    """Every key's (count, sum) in the state a fresh sink (a new process) restores."""
    fresh, _ = _sink(_url(kafka, output), group, tps)
    try:
        restored: Totals = {}
        for tp in tps:
            for entry in fresh.scan_state(group, tp):
                value = json.loads(entry.value)
                assert entry.key not in restored, f"key {entry.key} in two partitions' state"
                restored[entry.key] = (value["count"], value["sum"])
        return restored
    finally:
        fresh.close()


def _verify_chaos_totals(
    kafka: Service,
    topic: str,
    partitions: int,
    output: str,
    group: str,
    writers: dict[int, str],
) -> dict[str, int]:
    """Against the truth computed from the input topic: the state a fresh sink restores, and
    the read_committed output row by row (each row holds its key's totals up to the record it
    names; the last row of each key, the key's totals). A wrong row is reported with the
    record and the member (`writers`: pid -> name) that wrote it."""
    truth: Totals = {}
    upto: dict[tuple[int, int], tuple[str, int, int]] = {}  # (partition, offset) -> totals then
    for partition, records in partition_contents(kafka.address, topic, partitions).items():
        for offset, _key, value in records:
            event = json.loads(value or b"")
            count, total = truth.get(event["key"], (0, 0))
            truth[event["key"]] = (count + 1, total + event["version"])
            upto[(partition, offset)] = (event["key"], count + 1, total + event["version"])

    def who(writer: str) -> str:
        pid = int(writer.split("-", 1)[0])
        return f"{writers.get(pid, '?')} (pid {pid})"

    rows = [
        m
        for m in read_output(
            kafka.address, output, CHAOS_OUTPUT_PARTITIONS, isolation="read_committed"
        )
        if m.table == "kafka_state_chaos"
    ]
    wrong = []
    latest: Totals = {}
    for message in rows:
        row = message.row
        coordinates = (row["source_partition"], row["source_offset"])
        expected = upto.get(coordinates)
        if expected != (row["event_key"], row["count"], row["sum"]):
            wrong.append(
                f"{row['event_key']} at {topic}[{coordinates[0]}]@{coordinates[1]} by "
                f"{who(row['writer'])}: (count, sum) {(row['count'], row['sum'])}, truth "
                f"{expected[1:] if expected else None} (output partition {message.partition} "
                f"offset {message.offset})"
            )
        latest[row["event_key"]] = (row["count"], row["sum"])
    assert not wrong, f"{len(wrong)} committed rows off the truth, first ones:\n" + "\n".join(
        wrong[:10]
    )
    assert latest == truth, "the last committed row of a key does not hold its totals"

    restored = _restored_totals(
        kafka, output, group, [TopicPartition(topic, p) for p in range(partitions)]
    )
    off = {k: (restored.get(k), v) for k, v in truth.items() if restored.get(k) != v}
    assert not off, f"{len(off)} keys' restored state off (state, truth): {list(off.items())[:5]}"
    assert restored.keys() == truth.keys(), "the state holds keys the input never had"
    changelog = changelog_topic("offsetkeeper-state", group, topic)
    written, committed = (
        sum(len(r) for r in _changelog_contents(kafka, changelog, partitions, i).values())
        for i in ("read_uncommitted", "read_committed")
    )
    return {
        "records": len(upto),
        "keys": len(truth),
        "committed_rows": len(rows),
        "writers": len({m.row["writer"] for m in rows}),
        "changelog_committed": committed,
        "changelog_aborted": written - committed,
    }


@fault
def test_three_members_through_kill_9_join_and_leave_keep_every_count_exact(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions, total, keys = 6, 30_000, 3_000
    topic, output, group = _chaos_topics(kafka, "state-members", partitions)
    writers: dict[int, str] = {}

    def member(name: str) -> ConsumerProcess:
        process = ConsumerProcess(
            _chaos_args(kafka, group, topic, output, "--batch-max-records", "500"),
            tmp_path / f"{name}.log",
        )
        consumers.append(process)
        writers[process.pid] = name
        return process

    started = time.monotonic()

    def progress(what: str) -> int:
        done = sum(committed_offsets(kafka.address, group, topic, partitions).values())
        elapsed = time.monotonic() - started
        print(f"{elapsed:5.1f}s {what}: {producer.produced} produced, {done} committed")
        return done

    first, second, third = member("c1"), member("c2"), member("c3")
    for process in (first, second, third):
        process.wait_for_event("partitions_assigned", timeout=60, what="an assignment")
    # The stream runs while members die, join and leave.
    producer = PacedProducer(kafka.address, topic, total=total, rate=1_500, keys=keys).start()
    wait_until(
        lambda: progress("before kill -9") >= 3_000, timeout=60, interval=0.5, what="progress"
    )
    first.kill()  # kill -9 mid-stream: its open transaction is aborted at its timeout
    fourth = member("c4")
    fourth.wait_for_event("partitions_assigned", timeout=60, what="the new member's assignment")
    # The graceful leave while the member has work: the stream runs, or the group lags.
    assert progress("c4 assigned") < total or producer.produced < total
    assert second.terminate() == 0, second.log_path.read_text()[-3000:]
    progress("c2 left")
    producer.join(timeout=120)
    _wait_caught_up(kafka, group, topic, partitions)
    progress("caught up")
    for process in (third, fourth):
        assert process.alive(), process.log_path.read_text()[-3000:]
        assert process.terminate() == 0, process.log_path.read_text()[-3000:]
    counts = _verify_chaos_totals(kafka, topic, partitions, output, group, writers)
    print(f"three members, kill -9, join, leave: {counts} in {time.monotonic() - started:.1f}s")
    assert counts["records"] == total
    assert counts["writers"] >= 3, "the members did not share the stream; the test is weak"


@fault
@pytest.mark.parametrize(
    "stop",
    [
        # While processing partition 0, offset 700: mid-batch, before its transaction begins,
        # holding the state of two committed batches of each partition.
        {"CHAOS_SELF_STOP_AT": "0:700"},
        # In its third batch with state, the rows and state changes produced (in the log) in
        # the open transaction, before its offsets are added: the broker aborts it at its
        # timeout, and the successor's restore must wait for that and skip them.
        {"CHAOS_SELF_STOP_IN_TRANSACTION": "3"},
    ],
    ids=["while-processing", "in-open-transaction"],
)
def test_a_zombie_member_is_fenced_and_none_of_its_counts_land(
    stop: dict[str, str], kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions, keys = 3, 300
    topic, output, group = _chaos_topics(kafka, "state-zombie-engine", partitions)
    produce(kafka.address, topic, (chaos_event(i, keys) for i in range(6_000)))
    writers: dict[int, str] = {}
    started = time.monotonic()
    args = _chaos_args(kafka, group, topic, output, "--batch-max-records", "300")
    zombie = ConsumerProcess(args, tmp_path / "zombie.log", env=stop)
    consumers.append(zombie)
    writers[zombie.pid] = "zombie"
    wait_until(
        lambda: process_state(zombie.pid) == "T", timeout=60, what="the zombie to stop itself"
    )
    frozen = committed_offsets(kafka.address, group, topic, partitions)
    assert sum(frozen.values()) > 0, "the zombie committed nothing before it stopped"
    assert frozen.get(0, 0) <= 700, f"offset 700 of partition 0 committed already: {frozen}"

    successor = ConsumerProcess(args, tmp_path / "successor.log")
    consumers.append(successor)
    writers[successor.pid] = "successor"
    ends = _wait_caught_up(kafka, group, topic, partitions)

    os.kill(zombie.pid, signal.SIGCONT)
    fenced = zombie.wait_for_event("partitions_fenced", timeout=60, what="the zombie's fencing")
    # The batch fenced is the stale one: each of its partitions from where the zombie stood.
    assert fenced["partitions"], fenced
    assert fenced["next_offsets"] == {
        name: frozen.get(int(name.rsplit("[", 1)[1][:-1]), 0) for name in fenced["partitions"]
    }, (fenced, frozen)
    # Refused before anything of it committed: the sink logs the refusal (the coordinator's
    # UNKNOWN_MEMBER_ID, or a membership librdkafka already reset), then the engine drops the
    # partitions.
    order = [
        e["event"]
        for e in zombie.events()
        if e.get("event") in ("kafka_commit_fenced", "partitions_fenced")
    ]
    assert order[:2] == ["kafka_commit_fenced", "partitions_fenced"], order
    time.sleep(2)  # whatever the zombie still does, let it happen before we look
    assert committed_offsets(kafka.address, group, topic, partitions) == ends, (
        "the zombie moved the group's offsets"
    )

    def stale(isolation: Isolation) -> int:
        """The zombie's outputs of records at or past where it stood when it stopped."""
        return sum(
            1
            for m in read_output(
                kafka.address, output, CHAOS_OUTPUT_PARTITIONS, isolation=isolation
            )
            if m.row["writer"].startswith(f"{zombie.pid}-")
            and m.row["source_offset"] >= frozen.get(m.row["source_partition"], 0)
        )

    assert stale("read_committed") == 0, "outputs of the zombie's stale batch became visible"
    if "CHAOS_SELF_STOP_IN_TRANSACTION" in stop:
        assert stale("read_uncommitted") > 0, "the zombie's open transaction wrote nothing"

    # The fenced member is a member again, with no state in hand: more records, shared by
    # both, each partition's state restored from its changelog wherever it moves.
    produce(kafka.address, topic, (chaos_event(i, keys) for i in range(6_000, 9_000)))
    _wait_caught_up(kafka, group, topic, partitions)
    assert successor.terminate() == 0, successor.log_path.read_text()[-3000:]
    assert zombie.terminate() == 0, zombie.log_path.read_text()[-3000:]
    counts = _verify_chaos_totals(kafka, topic, partitions, output, group, writers)
    events = [e["event"] for e in zombie.events() if "fence" in e.get("event", "")]
    print(f"zombie fenced ({events}): {counts} in {time.monotonic() - started:.1f}s")
    assert counts["records"] == 9_000
    if "CHAOS_SELF_STOP_IN_TRANSACTION" in stop:
        assert counts["changelog_aborted"] > 0, "the zombie's state changes never reached the log"
