"""The partition leader dies (kill -9) mid-run on a three-node cluster and comes back on its data.

For both client backends into PostgreSQL, and for the Kafka sink (confluent): topics with
replication factor 3 and min.insync.replicas 2, a paced stream with a few poison records
produced around each kill, and an app that is not idempotent on its own (a fresh random row id
per applied record). Checked row by row: every input record's output exactly once, every
checkpoint at the end offset, every poison record in the dead-letter topic. The short form kills
one leader; the long form (`ops/chaos`) several in a row, each once the restarted node is back
in sync. How long commits stalled around each kill is printed and written to the test's tmp dir
(`leader-kill-figures.json`).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException

from consumer.deadletters.writer import DeadLetterOrigin
from tests.chaos.conftest import long_form, scaled
from tests.fixtures.chaos import PacedProducer
from tests.fixtures.cluster import (
    MIN_INSYNC_REPLICAS,
    REPLICATION_FACTOR,
    KafkaCluster,
    kafka_cluster,
)
from tests.fixtures.dead_letters import offsetkeeper, read_topic
from tests.fixtures.kafka_sink import read_output
from tests.fixtures.kafka_tools import end_offsets, partition_contents, produce, unique_name
from tests.fixtures.pg import create_database, query
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.chaos]

PARTITIONS = 3  # input, output and dead-letter topics: each node leads one partition of each
RECORDS = int(scaled(3_000, 75_000))
RATE = scaled(150, 300)  # records per second: the short form produces for 20 s, the long 250 s
LEADER_KILLS = int(scaled(1, 4))
# When the kills come: the first once this share of the records is committed, the last (long
# form) at LAST_KILL_AT at the earliest. A kill cycle (election, restart, back in sync) takes
# 25-50 s on a busy 2-core machine: the long form's four fit well inside its 250 s stream.
FIRST_KILL_AT, LAST_KILL_AT = scaled(0.3, 0.2), 0.7
DOWN_FOR_S = scaled(3, 5)  # the killed node stays down at least this long (and until a new leader)
POISON_PER_MOMENT = 2  # poison records produced before, during and after each kill
APP = "tests.apps.random_row_ids:app"


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    sink: str  # "postgresql" or "kafka"
    # Whose partition leader dies, kill after kill in turn: "input", "output" (the Kafka sink's
    # topic) or "group" (the __consumer_offsets partition of the group: its coordinator, and
    # where the Kafka sink keeps its checkpoints).
    kill_leader_of: tuple[str, ...]


VARIANTS = [
    Variant("confluent-postgresql", "confluent", "postgresql", ("input", "group")),
    Variant("aiokafka-postgresql", "aiokafka", "postgresql", ("input", "group")),
    # After the coordinator's node is killed, librdkafka can crash reading offsets (#5040) and
    # block in send_offsets_to_transaction for good (#5456, #5511): the Kafka sink works around
    # both (sinks/_kafka_offset_reader.py, sinks/_kafka_producer.py); this variant proves it.
    Variant("confluent-kafka-sink", "confluent", "kafka", ("group", "output")),
]
OFFSETS_TOPIC = "__consumer_offsets"
OFFSETS_TOPIC_PARTITIONS = 3  # offsets.topic.num.partitions in ops/kafka-local


@dataclass
class Topics:
    source: str
    dead_letters: str
    output: str | None  # the Kafka sink's output topic
    group: str

    @property
    def replicated(self) -> list[str]:
        """The test's own topics: replication factor 3, min.insync.replicas 2."""
        return [t for t in (self.source, self.dead_letters, self.output) if t is not None]

    @property
    def internal(self) -> list[str]:
        """Kafka's topics the run depends on: group offsets, and the Kafka sink's
        transactions."""
        return ["__consumer_offsets"] + (["__transaction_state"] if self.output else [])


@dataclass
class KillFigures:
    """One leader kill. Times in seconds after the kill; a stall is the longest gap between
    two commits from the last commit before the kill until the node was back in sync."""

    node: int
    killed_leader_of: str  # the partition whose leader was killed
    coordinator: bool  # the node coordinated the group (and, for the Kafka sink, its offsets)
    led: list[str]  # the partitions the node led when it was killed
    killed_at: float  # wall clock (the consumer's log timestamps are wall clock too)
    records_produced_before: int
    records_committed_before: int
    leader_moved_after_s: float
    restart_took_s: float
    back_in_sync_after_s: float
    stall_s: float = 0.0  # of all commits
    stall_began_after_s: float = 0.0  # when that longest gap began
    partition_stalls_s: dict[int, float] = field(default_factory=dict)  # per input partition


@dataclass
class LeaderKillRun:
    """What one test's kills act on and collect."""

    cluster: KafkaCluster
    variant: Variant
    topics: Topics
    consumer: ConsumerProcess
    producer: PacedProducer
    background: ThreadPoolExecutor
    poison: list[tuple[bytes, bytes]] = field(default_factory=list)

    def killed_partition(self, number: int) -> tuple[str, int]:
        """The topic partition whose leader the kill `number` (from 0) kills."""
        target = self.variant.kill_leader_of[number % len(self.variant.kill_leader_of)]
        if target == "group":
            return OFFSETS_TOPIC, _offsets_partition(self.topics.group)
        topic = self.topics.output if target == "output" else self.topics.source
        assert topic is not None
        return topic, number % PARTITIONS


def _offsets_partition(group: str) -> int:
    """The __consumer_offsets partition of `group`, as Kafka picks it:
    `Utils.abs(groupId.hashCode()) % partitions`, where Utils.abs is the absolute value (0 for
    Integer.MIN_VALUE), not the sign bit cleared: for a negative hash the two differ."""
    code = 0
    for char in group:
        code = (31 * code + ord(char)) & 0xFFFFFFFF
    signed = code - (1 << 32) if code & 0x80000000 else code
    positive = 0 if signed == -(1 << 31) else abs(signed)
    return positive % OFFSETS_TOPIC_PARTITIONS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with kafka_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    """Produces poison records in the background while a leader is being elected."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="poison") as executor:
        yield executor


def _sink_url(variant: Variant, cluster: KafkaCluster, topics: Topics, request: Any) -> str:
    if variant.sink == "kafka":
        return f"kafka://{cluster.bootstrap}/{topics.output}"
    postgres: Service = request.getfixturevalue("postgres")
    return create_database(postgres.address)


def _consumer_args(variant: Variant, cluster: KafkaCluster, topics: Topics, sink: str) -> list[str]:
    return [
        "--backend",
        variant.backend,
        *run_args(
            APP,
            cluster.bootstrap,
            topics.group,
            topics.source,
            sink,
            "--batch-max-records",
            "200",
            "--on-bad-record",
            "dead-letter",
            "--dead-letter-topic",
            topics.dead_letters,
            "--bad-record-backoff",
            "0.05",
            "--log-level",
            "debug",  # one batch_committed event per commit: the stall is measured from them
        ),
    ]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_leader_killed_mid_run_outputs_every_record_once_and_keeps_every_dead_letter(
    variant: Variant,
    cluster: KafkaCluster,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    background: ThreadPoolExecutor,
    consumers: list[ConsumerProcess],
) -> None:
    prefix = f"leader-kill-{variant.name}"
    topics = Topics(
        unique_name(prefix),
        unique_name(f"{prefix}-dlq"),
        unique_name(f"{prefix}-out") if variant.sink == "kafka" else None,
        unique_name(prefix),
    )
    for topic in topics.replicated:
        cluster.create_topic(topic, PARTITIONS)
    sink = _sink_url(variant, cluster, topics, request)
    consumer = ConsumerProcess(
        _consumer_args(variant, cluster, topics, sink), tmp_path / "consumer.log"
    )
    consumers.append(consumer)
    started = time.monotonic()
    consumer.wait_started()
    producer = PacedProducer(cluster.bootstrap, topics.source, RECORDS, RATE)
    run = LeaderKillRun(cluster, variant, topics, consumer, producer.start(), background)
    kills = [_kill_leader_mid_run(run, number) for number in range(LEADER_KILLS)]
    producer.join(timeout=RECORDS / RATE + 300)
    run.poison += _produce_poison(cluster, topics, "end", partition=0)
    _wait_caught_up(cluster, topics, consumer)
    duration = time.monotonic() - started
    assert consumer.terminate() == 0, consumer.log_path.read_text()[-3000:]
    counts = _verify(variant, cluster, topics, sink, {key for key, _value in run.poison})
    figures = _figures(variant, consumer, kills, counts, duration)
    print(json.dumps(figures, indent=2))
    (tmp_path / "leader-kill-figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert counts["distinct_records"] == RECORDS + len(run.poison), "a produced record is lost"


# --- the kill ----------------------------------------------------------------------------------


def _kill_leader_mid_run(run: LeaderKillRun, number: int) -> KillFigures:
    """Wait until the consumer commits steadily, kill -9 the leader of one partition (another
    partition each time), keep the node down a while, restart it, wait until it is in sync."""
    cluster, topics, consumer = run.cluster, run.topics, run.consumer
    topic, partition = run.killed_partition(number)
    poisoned = number % PARTITIONS
    run.poison += _produce_poison(cluster, topics, f"before-{number}", poisoned)
    share = FIRST_KILL_AT + (LAST_KILL_AT - FIRST_KILL_AT) * number / max(1, LEADER_KILLS - 1)
    target = int(RECORDS * share)
    wait_until(
        lambda: not consumer.alive() or _committing(consumer, target),
        timeout=RECORDS / RATE + 120,
        interval=0.05,
        what=f"the consumer to commit {target} records, its last commit fresh",
    )
    assert consumer.alive(), consumer.log_path.read_text()[-3000:]
    node, coordinator = _target_node(cluster, topics, topic, partition)
    led = _led_by(cluster, topics, node)
    produced, committed = run.producer.produced, _records_committed(consumer)
    assert produced < RECORDS, "the stream ended before the kill: it would not be mid-run"
    killed_at = cluster.kill(node)
    during: Future[list[tuple[bytes, bytes]]] = run.background.submit(
        _produce_poison, cluster, topics, f"during-{number}", poisoned
    )
    cluster.wait_leader_other_than(topic, partition, node, timeout=120)
    leader_moved = time.time() - killed_at
    time.sleep(max(0.0, DOWN_FOR_S - leader_moved))
    restarting = time.time()
    cluster.restart(node)
    restart_took = time.time() - restarting
    cluster.wait_in_sync([*topics.replicated, *topics.internal], timeout=180)
    run.poison += during.result(timeout=120)
    run.poison += _produce_poison(cluster, topics, f"after-{number}", poisoned)
    return KillFigures(
        node=node,
        killed_leader_of=f"{topic}[{partition}]",
        coordinator=coordinator,
        led=led,
        killed_at=killed_at,
        records_produced_before=produced,
        records_committed_before=committed,
        leader_moved_after_s=round(leader_moved, 2),
        restart_took_s=round(restart_took, 2),
        back_in_sync_after_s=round(time.time() - killed_at, 2),
    )


def _target_node(
    cluster: KafkaCluster, topics: Topics, topic: str, partition: int
) -> tuple[int, bool]:
    """The node to kill (the partition's leader) and whether it coordinates the group. The
    leader of the group's offsets partition is its coordinator, once the two answers agree:
    just after leadership moved (a restarted node taking its preferred partitions back) they
    may not yet."""
    found: list[tuple[int, bool]] = []

    def settled() -> bool:
        leader = cluster.leader(topic, partition)
        try:
            coordinator = cluster.group_coordinator(topics.group)
        except (KafkaException, TimeoutError):
            return False
        if leader is None or (topic == OFFSETS_TOPIC and leader != coordinator):
            return False
        found.append((leader, leader == coordinator))
        return True

    wait_until(settled, timeout=60, interval=0.5, what=f"the leader of {topic}[{partition}]")
    return found[-1]


def _led_by(cluster: KafkaCluster, topics: Topics, node: int) -> list[str]:
    return [
        f"{topic}[{partition}]"
        for topic in [*topics.replicated, *topics.internal]
        for partition, replicas in sorted(cluster.describe(topic).items())
        if replicas.leader == node
    ]


def _produce_poison(
    cluster: KafkaCluster, topics: Topics, moment: str, partition: int
) -> list[tuple[bytes, bytes]]:
    """Records the app refuses, on `partition`: one not JSON at all (a decode error), one JSON
    without a version (the app's InvalidRecordError). Returns their (key, value) pairs."""
    records = [
        (f"poison-{moment}-{index}".encode(), b"\xffnot json" if index % 2 else b'{"key": "x"}')
        for index in range(POISON_PER_MOMENT)
    ]
    produce(
        cluster.bootstrap,
        topics.source,
        records,
        partition_of={key: partition for key, _value in records},
    )
    return records


# --- the consumer's commits, from its log --------------------------------------------------------


def _commits(consumer: ConsumerProcess) -> list[dict[str, Any]]:
    return [e for e in consumer.events() if e.get("event") == "batch_committed"]


def _commit_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _partition_of(logged: str) -> int:
    """The partition of a logged topic partition, `topic[3]`."""
    return int(logged.rsplit("[", 1)[1].rstrip("]"))


def _commit_partitions(event: dict[str, Any]) -> set[int]:
    return {_partition_of(tp) for tp in event.get("offsets", {})}


def _records_committed(consumer: ConsumerProcess) -> int:
    return sum(int(event["records"]) for event in _commits(consumer))


def _committing(consumer: ConsumerProcess, target: int) -> bool:
    """At least `target` records committed, the last commit under a second ago."""
    commits = _commits(consumer)
    return (
        sum(int(event["records"]) for event in commits) >= target
        and time.time() - _commit_time(commits[-1]) < 1.0
    )


def _next_offsets_logged(consumer: ConsumerProcess) -> dict[int, int]:
    """Each partition's next offset after the commits the consumer logged."""
    next_offsets: dict[int, int] = {}
    for event in _commits(consumer):
        for tp, (_first, last) in event.get("offsets", {}).items():
            partition = _partition_of(tp)
            next_offsets[partition] = max(next_offsets.get(partition, 0), int(last) + 1)
    return next_offsets


def _wait_caught_up(cluster: KafkaCluster, topics: Topics, consumer: ConsumerProcess) -> None:
    ends = end_offsets(cluster.bootstrap, topics.source, PARTITIONS)
    wait_until(
        lambda: not consumer.alive() or _next_offsets_logged(consumer) == ends,
        timeout=300,
        what=f"the consumer to commit up to the end offsets {ends}",
    )
    assert consumer.alive(), f"the consumer exited:\n{consumer.log_path.read_text()[-3000:]}"


# --- row by row ----------------------------------------------------------------------------------


def _verify(
    variant: Variant, cluster: KafkaCluster, topics: Topics, sink: str, poison_keys: set[bytes]
) -> dict[str, int]:
    """Every input record's output exactly once (poison records none), every checkpoint at its
    partition's end offset, every poison record in the dead-letter topic."""
    _assert_replicated(cluster, [*topics.replicated, *topics.internal])
    expected: dict[tuple[int, int], tuple[str, int]] = {}
    poison: dict[tuple[int, int], bytes | None] = {}
    # What each record was produced as (a poison key, a valid record's version): the input
    # producers are idempotent, yet a leader kill may still make one write a record twice.
    produced: Counter[bytes | int] = Counter()
    for partition, records in partition_contents(
        cluster.bootstrap, topics.source, PARTITIONS
    ).items():
        for offset, key, value in records:
            if key in poison_keys:
                poison[(partition, offset)] = value
                produced[key] += 1
            else:
                event = json.loads(value or b"")
                expected[(partition, offset)] = (event["key"], event["version"])
                produced[event["version"]] += 1
    rows = _output_rows(variant, cluster, topics, sink)
    applied = Counter((row[0], row[1]) for row in rows)
    for partition, offset, event_key, version in rows:
        assert expected.get((partition, offset)) == (event_key, version), (
            f"output for {topics.source}[{partition}]@{offset} is not that input record"
        )
    duplicated = {c: n for c, n in applied.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} records applied twice, e.g. {list(duplicated)[:5]}"
    missing = sorted(expected.keys() - applied.keys())
    assert not missing, f"{len(missing)} records never applied, e.g. {missing[:5]}"
    _verify_checkpoints(cluster, topics, sink)
    dead_letters = _verify_dead_letters(cluster, topics, poison)
    return {
        "records": len(expected) + len(poison),
        "distinct_records": len(produced),
        "input_duplicates": sum(produced.values()) - len(produced),
        "rows": len(rows),
        "poison": len(poison),
        "dead_letters": dead_letters,
        "dead_letter_repeats": dead_letters - len(poison),
    }


def _assert_replicated(cluster: KafkaCluster, topics: list[str]) -> None:
    """Each topic (the test's and Kafka's internal ones) has 3 replicas per partition and
    min.insync.replicas 2, so an acknowledged write outlives the loss of any one node."""
    for topic in topics:
        assert cluster.topic_config(topic, "min.insync.replicas") == str(MIN_INSYNC_REPLICAS)
        described = cluster.describe(topic)
        assert described, f"{topic} has no partitions"
        assert {len(p.replicas) for p in described.values()} == {REPLICATION_FACTOR}, topic


def _output_rows(
    variant: Variant, cluster: KafkaCluster, topics: Topics, sink: str
) -> list[tuple[int, int, str, int]]:
    """(source partition, source offset, key, version) of every committed output row."""
    if variant.sink == "postgresql":
        found = query(
            sink,
            "SELECT source_partition, source_offset, event_key, version FROM applied_records",
        )
        return [(int(p), int(o), str(k), int(v)) for p, o, k, v in found]
    assert topics.output is not None
    messages = read_output(cluster.bootstrap, topics.output, PARTITIONS, isolation="read_committed")
    assert {m.table for m in messages} <= {"applied_records"}
    return [
        (m.row["source_partition"], m.row["source_offset"], m.row["event_key"], m.row["version"])
        for m in messages
    ]


def _verify_checkpoints(cluster: KafkaCluster, topics: Topics, sink: str) -> None:
    """What the sink holds as the group's checkpoints (`offsetkeeper checkpoint show`) is each
    partition's end offset."""
    shown = offsetkeeper(
        "checkpoint",
        "show",
        "--bootstrap-servers",
        cluster.bootstrap,
        "--sink",
        sink,
        "--group",
        topics.group,
        "--format",
        "json",
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    stored = {
        c["partition"]: c["next_offset"]
        for c in json.loads(shown.stdout)["checkpoints"]
        if c["topic"] == topics.source
    }
    assert stored == end_offsets(cluster.bootstrap, topics.source, PARTITIONS)


def _verify_dead_letters(
    cluster: KafkaCluster, topics: Topics, poison: dict[tuple[int, int], bytes | None]
) -> int:
    """Every poison record is in the dead-letter topic, byte for byte, and nothing else is.
    Dead letters are at least once (README): a repeat is counted, not refused."""
    letters = read_topic(cluster.bootstrap, topics.dead_letters)
    origins: Counter[tuple[int, int]] = Counter()
    for letter in letters:
        origin = DeadLetterOrigin.from_headers(letter.header_list)
        assert origin is not None, f"a dead letter without our headers: {letter}"
        assert origin.topic == topics.source, origin
        coordinates = (origin.partition, origin.offset)
        assert coordinates in poison, f"dead letter for a record that is not poison: {origin}"
        assert letter.value == poison[coordinates], f"dead letter {coordinates} changed its value"
        origins[coordinates] += 1
    lost = sorted(poison.keys() - origins.keys())
    assert not lost, f"{len(lost)} poison records are not in {topics.dead_letters}: {lost}"
    return len(letters)


# --- figures -------------------------------------------------------------------------------------


def _figures(
    variant: Variant,
    consumer: ConsumerProcess,
    kills: list[KillFigures],
    counts: dict[str, int],
    duration: float,
) -> dict[str, Any]:
    commits = [(_commit_time(e), _commit_partitions(e)) for e in _commits(consumer)]
    times = [moment for moment, _partitions in commits]
    for kill in kills:
        _measure_stall(kill, commits)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return {
        "variant": variant.name,
        "backend": variant.backend,
        "sink": variant.sink,
        "form": "long" if long_form() else "short",
        **counts,
        "rate_per_s": RATE,
        "commits": len(commits),
        "median_commit_gap_s": round(statistics.median(gaps), 3) if gaps else None,
        "run_s": round(duration, 1),
        "kills": [asdict(kill) for kill in kills],
        "recovery_events": _recovery_events(consumer),
    }


# Events of every run; the others say how the consumer got through the kill (a retry, a
# rebalance, a fenced commit, a new transactional producer...).
_ROUTINE_EVENTS = frozenset(
    {
        "batch_committed",
        "record_retry",
        "record_dead_lettered",
        "consumer_starting",
        "consumer_stopped",
        "dead_letters_enabled",
        "kafka_sink_opened",
        "shutdown_requested",
    }
)


def _recovery_events(consumer: ConsumerProcess) -> dict[str, int]:
    found = Counter(str(e.get("event")) for e in consumer.events())
    return {name: n for name, n in sorted(found.items()) if name not in _ROUTINE_EVENTS}


def _measure_stall(kill: KillFigures, commits: list[tuple[float, set[int]]]) -> None:
    """The longest gap between commits (and, per input partition, between commits that hold
    its records) from the last one before the kill to the first one after the node was back
    in sync."""
    settled = kill.killed_at + kill.back_in_sync_after_s
    kill.stall_s, began = _longest_gap([t for t, _ in commits], kill.killed_at, settled)
    kill.stall_began_after_s = round(began - kill.killed_at, 3)
    for partition in range(PARTITIONS):
        times = [t for t, parts in commits if partition in parts]
        kill.partition_stalls_s[partition] = _longest_gap(times, kill.killed_at, settled)[0]


def _longest_gap(times: list[float], killed_at: float, settled: float) -> tuple[float, float]:
    """The longest gap between consecutive `times` that ends after `killed_at` and begins
    before `settled`, and when it began."""
    gaps = [(b - a, a) for a, b in itertools.pairwise(times) if b > killed_at and a < settled]
    longest, began = max(gaps, default=(0.0, killed_at))
    return round(longest, 3), began
