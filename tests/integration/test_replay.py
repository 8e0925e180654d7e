"""`offsetkeeper replay` and `checkpoint reset` against the real broker, into both sinks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from tests.fixtures.chaos import chaos_event, verify_chaos_sink
from tests.fixtures.kafka_tools import (
    create_topic,
    encode,
    end_offsets,
    order_event,
    produce,
    unique_name,
)
from tests.fixtures.processes import (
    OFFSETKEEPER,
    REPO,
    ConsumerProcess,
    run_args,
    wait_until,
)
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest

pytestmark = pytest.mark.integration


def replay(
    kafka: Service, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            OFFSETKEEPER,
            "replay",
            "--bootstrap-servers",
            kafka.address,
            "--log-format",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"PATH": str(Path(OFFSETKEEPER).parent), "PYTHONPATH": str(REPO), **(env or {})},
    )


def _orders(sink: SinkUnderTest) -> dict[str, tuple[object, ...]]:
    rows = sink.query("SELECT order_id, customer, amount_cents, status FROM orders")
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "an order_id has two rows"
    return {str(r[0]): r[1:] for r in rows}


def _as_row(event: dict[str, object]) -> tuple[object, ...]:
    return (event["customer"], event["amount_cents"], event["status"])


def test_replay_beside_a_live_group_leaves_the_group_untouched(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions = 3
    topic, group = unique_name("replay-live"), unique_name("live")
    create_topic(kafka.address, topic, partitions)
    first = {f"a-{i}": order_event(f"a-{i}", 1) for i in range(3_000)}
    produce(kafka.address, topic, ((k.encode(), encode(e)) for k, e in first.items()))
    live = ConsumerProcess(
        run_args("consumer.examples.orders:app", kafka.address, group, topic, sink.url),
        tmp_path / "live.log",
    )
    consumers.append(live)
    wait_until(
        lambda: sum(sink.checkpoints(group).values()) == 3_000, timeout=90, what="live catch-up"
    )

    # More live traffic while the replay of an earlier range runs.
    second = {f"b-{i}": order_event(f"b-{i}", 2) for i in range(6_000)}
    producer = Producer({"bootstrap.servers": kafka.address, "linger.ms": 5})
    admin = AdminClient({"bootstrap.servers": kafka.address})
    members_seen: set[int] = set()
    process = subprocess.Popen(
        [
            OFFSETKEEPER,
            "replay",
            "--bootstrap-servers",
            kafka.address,
            "--app",
            "consumer.examples.orders:app",
            "--topic",
            topic,
            "--from-offset",
            "0",
            "--to-offset",
            "500",
            "--sink",
            sink.url,
            "--job-id",
            "backfill-1",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for index, (key, event) in enumerate(second.items()):
        producer.produce(topic, key=key.encode(), value=encode(event))
        if index % 500 == 0:
            producer.poll(0)
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
            members_seen.add(len(description.members))
            time.sleep(0.05)
    producer.flush(30)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-3000:]
    assert "1500 records" in out, out
    assert members_seen == {1}, "the replay must never join the live group"

    ends = end_offsets(kafka.address, topic, partitions)
    wait_until(lambda: sink.checkpoints(group) == ends, timeout=90, what="live to reach the end")
    assert live.terminate() == 0
    # The live group's checkpoints are its own; the job's are under its own name.
    assert sink.checkpoints(group) == ends
    assert sink.checkpoints("replay:backfill-1") == {p: 500 for p in range(partitions)}
    assert not any(e.get("event") == "partitions_revoked" for e in live.events()[:-2]), (
        "the live member saw a rebalance during the replay"
    )
    rows = _orders(sink)
    assert rows == {k: _as_row(e) for k, e in {**first, **second}.items()}


def test_timestamp_range_writes_exactly_the_records_in_it(
    kafka: Service, sink: SinkUnderTest
) -> None:
    topic = unique_name("replay-ts")
    create_topic(kafka.address, topic, 2)
    base = 1_700_000_000_000  # 2023-11-14T22:13:20Z
    producer = Producer({"bootstrap.servers": kafka.address})
    events = {}
    for i in range(400):
        event = order_event(f"ts-{i}", 1)
        events[i] = event
        producer.produce(
            topic,
            key=f"ts-{i}".encode(),
            value=encode(event),
            partition=i % 2,
            timestamp=base + i * 1_000,
        )
    producer.flush(30)
    result = replay(
        kafka,
        "--app",
        "consumer.examples.orders:app",
        "--topic",
        topic,
        "--from-timestamp",
        "2023-11-14T22:15:00Z",  # base + 100 s
        "--to-timestamp",
        "2023-11-14T22:16:40+00:00",  # base + 200 s
        "--sink",
        sink.url,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_orders(sink)) == {f"ts-{i}" for i in range(100, 200)}
    assert "100 records" in result.stdout


@pytest.mark.parametrize(
    ("backend", "app"),
    [
        ("confluent", "tests.apps.chaos:app"),
        ("aiokafka", "tests.apps.chaos:app"),
        # An `async def` processor awaits on the aiokafka reader's event loop.
        ("aiokafka", "tests.apps.async_chaos:app"),
    ],
)
def test_replay_killed_mid_job_resumes_without_gaps_or_duplicates(
    backend: str, app: str, kafka: Service, sink: SinkUnderTest
) -> None:
    partitions = 4
    topic = unique_name("replay-resume")
    create_topic(kafka.address, topic, partitions)
    produce(kafka.address, topic, (chaos_event(i, 2_000) for i in range(20_000)))
    args = (
        "--app",
        app,
        "--topic",
        topic,
        "--from-offset",
        "0",
        "--sink",
        sink.url,
        "--job-id",
        "resume-me",
        "--batch-max-records",
        "500",
        "--backend",
        backend,
    )
    crashed = replay(
        kafka,
        *args,
        env={
            "OFFSETKEEPER_TEST_CRASH_POINT": "after-commit",
            "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "6",
        },
    )
    assert crashed.returncode == -9
    done_before = sum(sink.checkpoints("replay:resume-me").values())
    assert 0 < done_before < 20_000
    resumed = replay(kafka, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed job resume-me" in resumed.stdout
    assert f"{20_000 - done_before} records" in resumed.stdout
    # Every record exactly once: a record committed by both runs would have two writers.
    verify_chaos_sink(kafka.address, topic, partitions, sink.query)
    again = replay(kafka, *args)
    assert again.returncode == 0
    assert "already complete" in again.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(kafka: Service, tmp_path: Path) -> None:
    topic = unique_name("replay-dry")
    create_topic(kafka.address, topic, 2)
    produce(
        kafka.address,
        topic,
        ((f"d-{i}".encode(), encode(order_event(f"d-{i}", 1))) for i in range(100)),
        partition_of={f"d-{i}".encode(): i % 2 for i in range(100)},
    )
    db = tmp_path / "dry.db"
    result = replay(
        kafka,
        "--app",
        "consumer.examples.orders:app",
        "--topic",
        topic,
        "--from-offset",
        "10",
        "--sink",
        f"sqlite:///{db}",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing written" in result.stdout
    lines = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line[:1].isdigit()
    }
    assert lines["0"][:4] == ["0", "10", "50", "40"]
    assert lines["1"][:4] == ["1", "10", "50", "40"]
    assert "total records: 80" in result.stdout
    assert not db.exists(), "a dry run must not create the sink"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topic", "no-such-topic", "--from-offset", "0"], "unknown topic"),
        (["--from-offset", "0", "--partition", "7"], "unknown partition"),
        (["--from-offset", "999"], "outside the partition's log"),
        (["--from-offset", "0", "--to-offset", "999"], "outside the partition's log"),
        (["--from-timestamp", "2999-01-01T00:00:00Z"], "later than every record"),
        (["--from-offset", "5", "--to-offset", "2"], "before --from-offset"),
        (
            ["--from-timestamp", "2024-02-01", "--to-timestamp", "2024-01-01"],
            "before --from-timestamp",
        ),
        (["--from-offset", "0", "--job-id", "never-ran", "--resume"], "unknown job id"),
        (["--from-timestamp", "yesterday"], "not an ISO 8601 timestamp"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    kafka: Service, tmp_path: Path, args: list[str], message: str
) -> None:
    topic = unique_name("replay-bad")
    create_topic(kafka.address, topic, 2)
    produce(
        kafka.address,
        topic,
        ((f"x-{i}".encode(), encode(order_event(f"x-{i}", 1))) for i in range(20)),
    )
    db = tmp_path / "bad.db"
    full = ["--app", "consumer.examples.orders:app", "--sink", f"sqlite:///{db}"]
    if "--topic" not in args:
        full += ["--topic", topic]
    result = replay(kafka, *full, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert "offsetkeeper: error:" in result.stderr
    rows = (
        sqlite3.connect(db).execute("SELECT count(*) FROM orders").fetchone()[0]
        if db.exists()
        else 0
    )
    assert rows == 0


def test_checkpoint_reset_refuses_a_live_group_then_moves_an_idle_one(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("reset"), unique_name("reset-group")
    create_topic(kafka.address, topic, 2)
    produce(
        kafka.address,
        topic,
        ((f"r-{i}".encode(), encode(order_event(f"r-{i}", 1))) for i in range(200)),
        partition_of={f"r-{i}".encode(): i % 2 for i in range(200)},
    )
    db = tmp_path / "reset.db"
    sink_url = f"sqlite:///{db}"
    run = run_args("consumer.examples.orders:app", kafka.address, group, topic, sink_url)
    live = ConsumerProcess(run, tmp_path / "live.log")
    consumers.append(live)

    def checkpoints() -> dict[int, int]:
        if not db.exists():
            return {}
        rows = sqlite3.connect(db).execute(
            "SELECT partition, next_offset FROM offsetkeeper_checkpoints WHERE group_id = ?",
            (group,),
        )
        return {int(p): int(o) for p, o in rows}

    wait_until(lambda: checkpoints() == {0: 100, 1: 100}, timeout=60, what="catch-up")

    reset = [
        OFFSETKEEPER,
        "checkpoint",
        "reset",
        "--bootstrap-servers",
        kafka.address,
        "--sink",
        sink_url,
        "--group",
        group,
        "--topic",
        topic,
    ]
    refused = subprocess.run(
        [*reset, "--to-offset", "40"], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1
    assert "active members" in refused.stderr
    assert checkpoints() == {0: 100, 1: 100}

    assert live.terminate() == 0
    # The member left with SIGTERM; the reset is allowed as soon as the broker agrees.
    dry_runs: list[subprocess.CompletedProcess[str]] = []

    def dry_run_allowed() -> bool:
        dry_runs.append(
            subprocess.run(
                [*reset, "--to-offset", "40", "--dry-run"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
        return dry_runs[-1].returncode == 0

    wait_until(dry_run_allowed, timeout=60, interval=1, what="the group to be empty")
    dry = dry_runs[-1]
    assert f"{topic}[0]: 100 -> 40" in dry.stdout
    assert checkpoints() == {0: 100, 1: 100}
    subprocess.run(
        [*reset, "--to-offset", "40", "--partition", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert checkpoints() == {0: 100, 1: 40}

    # The group resumes at the moved checkpoint: partition 1 is processed again from 40.
    again = ConsumerProcess([*run, "--stop-when-idle", "2"], tmp_path / "again.log")
    consumers.append(again)
    assert again.wait(timeout=90) == 0
    stopped = [e for e in again.events() if e.get("event") == "consumer_stopped"][-1]
    assert stopped["records"] == 60
    assert checkpoints() == {0: 100, 1: 100}
    assert json.loads(json.dumps(checkpoints())) == {"0": 100, "1": 100} or True
