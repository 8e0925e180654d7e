"""Upgrading in place: v1 checkpoints read by today's code, migration, adoption from other
consumers, export/import, state upgrades, the integrity audit. Real broker, both sinks."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from tests.fixtures.kafka_tools import create_topic, encode, end_offsets, unique_name
from tests.fixtures.pg import create_database, query
from tests.fixtures.processes import (
    FAST_GROUP_SETTINGS,
    OFFSETKEEPER,
    REPO,
    ConsumerProcess,
    run_args,
    run_cli,
)
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest

pytestmark = pytest.mark.integration

GOLDEN = REPO / "tests" / "fixtures" / "checkpoints"


def cli(kafka: Service, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A PATH-only environment: the CLI must not depend on anything else of ours.
    result = run_cli(
        kafka.address,
        *args[:2],
        "--log-format",
        "json",
        *args[2:],
        env={"PATH": str(Path(OFFSETKEEPER).parent)},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def golden_event(i: int) -> dict[str, Any]:
    return {
        "order_id": f"golden-{i}",
        "customer": f"c{i % 7}",
        "amount_cents": 1000 + i,
        "status": "created",
    }


def _golden_sink(kind: str, topic: str, tmp_path: Path, postgres_dsn: str | None) -> SinkUnderTest:
    """A copy of the v1 sink the v1 code wrote, pointed at this test's topic."""
    if kind == "sqlite":
        db = tmp_path / "v1.db"
        shutil.copy(GOLDEN / "v1-sink.db", db)
        with sqlite3.connect(db) as connection:
            for table in ("offsetkeeper_checkpoints", "offsetkeeper_leases"):
                connection.execute(f"UPDATE {table} SET topic = ?", (topic,))

        def run(sql: str) -> list[tuple[object, ...]]:
            with sqlite3.connect(db) as connection:
                return connection.execute(sql).fetchall()

        return SinkUnderTest(f"sqlite:///{db}", run)
    assert postgres_dsn is not None
    dsn = create_database(postgres_dsn)
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-f", str(GOLDEN / "v1-sink-postgres.sql")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with psycopg.connect(dsn, autocommit=True) as connection:
        for table in ("offsetkeeper_checkpoints", "offsetkeeper_leases"):
            connection.execute(f"UPDATE {table} SET topic = %s", (topic,))  # type: ignore[arg-type]
    return SinkUnderTest(dsn, lambda sql: query(dsn, sql))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_v1_sink_is_read_migrated_and_consumed_from_where_v1_stopped(
    kind: str,
    kafka: Service,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    topic = unique_name("golden")
    create_topic(kafka.address, topic, 2)
    producer = Producer({"bootstrap.servers": kafka.address})
    for i in range(50):  # the 30 the v1 code consumed, then 20 new ones
        event = golden_event(i)
        producer.produce(
            topic, key=event["order_id"].encode(), value=encode(event), partition=i % 2
        )
    producer.flush(30)
    postgres = request.getfixturevalue("postgres").address if kind == "postgresql" else None
    sink = _golden_sink(kind, topic, tmp_path, postgres)
    common = ["--sink", sink.url, "--group", "golden"]

    shown = json.loads(cli(kafka, "checkpoint", "show", *common, "--format", "json").stdout)
    assert [(c["partition"], c["next_offset"], c["format"]) for c in shown["checkpoints"]] == [
        (0, 15, 1),
        (1, 15, 1),
    ]
    dry = cli(kafka, "checkpoint", "migrate", "--sink", sink.url, "--dry-run").stdout
    assert "2 checkpoint(s) would be rewritten in format v3" in dry
    assert sink.query("SELECT DISTINCT format_version FROM offsetkeeper_checkpoints") == [(1,)]
    backup = tmp_path / "backup.json"
    migrated = cli(
        kafka, "checkpoint", "migrate", "--sink", sink.url, "--backup", str(backup)
    ).stdout
    assert f"written to {backup}" in migrated
    assert "migrated 2 checkpoint(s) to format v3" in migrated
    saved = json.loads(backup.read_text())
    assert sorted(c["next_offset"] for c in saved["checkpoints"]) == [15, 15]
    assert sink.query(
        "SELECT partition, next_offset, format_version, epoch, writer_version FROM"
        " offsetkeeper_checkpoints ORDER BY partition"
    ) == [(0, 15, 3, 0, "unknown"), (1, 15, 3, 0, "unknown")]

    consumer = ConsumerProcess(
        [
            "--app",
            "consumer.examples.orders:app",
            "--bootstrap-servers",
            kafka.address,
            "--group",
            "golden",
            "--topic",
            topic,
            *common[:2],
            "--stop-when-idle",
            "2",
            *FAST_GROUP_SETTINGS,
        ],
        tmp_path / "consumer.log",
    )
    consumers.append(consumer)
    assert consumer.wait(timeout=90) == 0
    stopped = [e for e in consumer.events() if e.get("event") == "consumer_stopped"][-1]
    assert stopped["records"] == 20, "today's code resumes exactly where v1 stopped"
    rows = sink.query("SELECT order_id, customer, amount_cents, status FROM orders")
    assert sorted(rows) == sorted(
        (e["order_id"], e["customer"], e["amount_cents"], e["status"])
        for e in map(golden_event, range(50))
    )


def test_a_newer_checkpoint_format_is_refused_and_left_untouched(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("future"), unique_name("future-group")
    create_topic(kafka.address, topic, 1)
    producer = Producer({"bootstrap.servers": kafka.address})
    producer.produce(topic, value=encode(golden_event(1)))
    producer.flush(10)
    args = run_args(
        "consumer.examples.orders:app",
        kafka.address,
        group,
        topic,
        sink.url,
        "--stop-when-idle",
        "2",
    )
    first = ConsumerProcess(args, tmp_path / "first.log")
    consumers.append(first)
    assert first.wait(timeout=60) == 0
    sink.query_write(  # as if a newer offsetkeeper had written it
        f"UPDATE offsetkeeper_checkpoints SET format_version = 4, next_offset = 0"
        f" WHERE group_id = '{group}'"
    )
    before = sink.query("SELECT * FROM offsetkeeper_checkpoints")
    second = ConsumerProcess(args, tmp_path / "second.log")
    consumers.append(second)
    assert second.wait(timeout=60) == 1
    output = second.log_path.read_text()
    assert "checkpoint format v4 is newer than this code knows" in output
    assert "reads up to v3" in output
    assert sink.query("SELECT * FROM offsetkeeper_checkpoints") == before
    refused = cli(kafka, "checkpoint", "migrate", "--sink", sink.url, check=False)
    assert refused.returncode == 1
    assert sink.query("SELECT * FROM offsetkeeper_checkpoints") == before


def test_state_upgrade_continues_the_totals(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("payments"), unique_name("totals")
    create_topic(kafka.address, topic, 3)
    customers = [f"cust-{i}" for i in range(40)]
    expected: dict[str, int] = {}

    def pay(start: int, count: int) -> None:
        producer = Producer({"bootstrap.servers": kafka.address, "linger.ms": 5})
        for i in range(start, start + count):
            customer = customers[i % len(customers)]
            amount = 100 + (i * 37) % 900
            expected[customer] = expected.get(customer, 0) + amount
            producer.produce(
                topic,
                key=customer.encode(),
                value=encode({"customer": customer, "amount_cents": amount}),
            )
        producer.flush(30)

    def run(app: str, name: str) -> ConsumerProcess:
        process = ConsumerProcess(
            run_args(
                app,
                kafka.address,
                group,
                topic,
                sink.url,
                "--stop-when-idle",
                "2",
                "--batch-max-records",
                "300",
            ),
            tmp_path / f"{name}.log",
        )
        consumers.append(process)
        assert process.wait(timeout=90) == 0, process.log_path.read_text()[-2000:]
        return process

    def versions() -> dict[int, int]:
        rows = sink.query(f"SELECT version FROM offsetkeeper_state WHERE group_id = '{group}'")
        counted: dict[int, int] = {}
        for (version,) in rows:
            counted[int(version)] = counted.get(int(version), 0) + 1  # type: ignore[call-overload]
        return counted

    pay(0, 3_000)
    run("tests.apps.totals_v1:app", "v1")
    assert dict(sink.query("SELECT customer, total_cents FROM customer_totals")) == expected
    assert versions() == {1: 40}
    assert sink.query("SELECT DISTINCT state_version FROM offsetkeeper_checkpoints") == [(None,)]

    # Upgraded lazily: only the 15 customers paid after the upgrade have v2 entries.
    pay(3_000, 15)
    run("consumer.examples.totals:app", "v2")
    rows = sink.query("SELECT customer, total_cents FROM customer_totals")
    assert dict(rows) == expected, "totals continue across the state upgrade"
    assert versions() == {1: 25, 2: 15}

    pay(3_015, 2_000)
    run("consumer.examples.totals:app", "v2-again")
    rows = sink.query("SELECT customer, total_cents, currency FROM customer_totals")
    assert {c: t for c, t, _ in rows} == expected
    assert {currency for _, _, currency in rows} == {"EUR"}
    assert versions() == {2: 40}

    _export_and_import_carry_the_state(kafka, sink, group, tmp_path)

    # Replaying offsets already counted adds nothing: the total lives in the state, which
    # moves with the offsets.
    killed = ConsumerProcess(
        run_args(
            "consumer.examples.totals:app",
            kafka.address,
            group,
            topic,
            sink.url,
            "--batch-max-records",
            "200",
        ),
        tmp_path / "killed.log",
        env={
            "OFFSETKEEPER_TEST_CRASH_POINT": "after-rows",
            "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "2",
        },
    )
    consumers.append(killed)
    pay(5_000, 1_500)
    assert killed.wait(timeout=90) == -9
    run("consumer.examples.totals:app", "after-crash")
    assert {
        c: t
        for c, t, _ in sink.query("SELECT customer, total_cents, currency FROM customer_totals")
    } == expected


def _export_and_import_carry_the_state(
    kafka: Service, sink: SinkUnderTest, group: str, tmp_path: Path
) -> None:
    """The group's state travels with export and import, into another group."""
    exported = tmp_path / "totals.json"
    export = ["--sink", sink.url, "--group", group]
    cli(kafka, "checkpoint", "export", *export, "--output", str(exported))
    assert len(json.loads(exported.read_text())["state_entries"]) == 40
    copy = unique_name("totals-copy")
    imported = ["--sink", sink.url, "--group", copy, "--input", str(exported)]
    cli(kafka, "checkpoint", "import", *imported)
    shown = json.loads(
        cli(
            kafka, "checkpoint", "show", "--sink", sink.url, "--group", copy, "--format", "json"
        ).stdout
    )
    assert sum(c["state_entries"] for c in shown["checkpoints"]) == 40
    assert sink.query(
        f"SELECT topic, partition, key, value, version FROM offsetkeeper_state"
        f" WHERE group_id = '{copy}' ORDER BY partition, key"
    ) == sink.query(
        f"SELECT topic, partition, key, value, version FROM offsetkeeper_state"
        f" WHERE group_id = '{group}' ORDER BY partition, key"
    )


def _plain_consumer_commits(
    kafka: Service, group: str, topic: str, offsets: dict[int, int]
) -> None:
    consumer = Consumer(
        {"bootstrap.servers": kafka.address, "group.id": group, "enable.auto.commit": False}
    )
    try:
        consumer.commit(
            offsets=[KafkaTopicPartition(topic, p, o) for p, o in offsets.items()],
            asynchronous=False,
        )
    finally:
        consumer.close()


def _produce_numbered(kafka: Service, topic: str, partitions: int, per_partition: int) -> None:
    producer = Producer({"bootstrap.servers": kafka.address})
    for p in range(partitions):
        for i in range(per_partition):
            event = golden_event(p * 1000 + i)
            producer.produce(
                topic, key=event["order_id"].encode(), value=encode(event), partition=p
            )
    producer.flush(30)


def test_adopt_from_a_kafka_group_an_offsets_file_and_a_spark_checkpoint(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic = unique_name("adopt")
    create_topic(kafka.address, topic, 3)
    _produce_numbered(kafka, topic, 3, 40)

    plain = unique_name("plain")
    _plain_consumer_commits(kafka, plain, topic, {0: 10, 1: 20, 2: 40})
    group = unique_name("adopted")
    dry = cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        group,
        "--from",
        "kafka-group",
        plain,
        "--dry-run",
    ).stdout
    assert f"{topic}[1]: - -> 20" in dry
    assert sink.checkpoints(group) == {}
    cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        group,
        "--from",
        "kafka-group",
        plain,
    )
    assert sink.checkpoints(group) == {0: 10, 1: 20, 2: 40}

    # The adopted group continues exactly from there: 30 + 20 + 0 records.
    consumer = ConsumerProcess(
        run_args(
            "consumer.examples.orders:app",
            kafka.address,
            group,
            topic,
            sink.url,
            "--stop-when-idle",
            "2",
        ),
        tmp_path / "adopted.log",
    )
    consumers.append(consumer)
    assert consumer.wait(timeout=90) == 0
    assert [e for e in consumer.events() if e.get("event") == "consumer_stopped"][-1][
        "records"
    ] == 50

    offsets_file = tmp_path / "offsets.json"
    offsets_file.write_text(json.dumps({topic: {"0": 5, "2": 7}}))
    file_group = unique_name("from-file")
    cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        file_group,
        "--from",
        "offsets-file",
        str(offsets_file),
    )
    assert sink.checkpoints(file_group) == {0: 5, 2: 7}

    from tests.fixtures.spark_checkpoint import write_spark_checkpoint  # noqa: PLC0415

    spark_dir = tmp_path / "spark-checkpoint"
    write_spark_checkpoint(
        spark_dir,
        batches=[
            {topic: {0: 3, 1: 4, 2: 5}},
            {topic: {0: 8, 1: 9, 2: 10}},
            {topic: {0: 30, 1: 30, 2: 30}},
        ],
        committed=1,
    )
    spark_group = unique_name("from-spark")
    cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        spark_group,
        "--from",
        "spark-checkpoint",
        str(spark_dir),
    )
    assert sink.checkpoints(spark_group) == {0: 8, 1: 9, 2: 10}, (
        "the uncommitted batch 2 is not adopted"
    )

    out_of_range = tmp_path / "bad.json"
    out_of_range.write_text(json.dumps({topic: {"1": 41}}))
    refused = cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        unique_name("bad"),
        "--from",
        "offsets-file",
        str(out_of_range),
        check=False,
    )
    assert refused.returncode == 1
    assert "outside the partition's log" in refused.stderr
    assert "partition=1" in refused.stderr
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({topic: {"9": 1}}))
    refused = cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        unique_name("bad"),
        "--from",
        "offsets-file",
        str(unknown),
        check=False,
    )
    assert "unknown partition" in refused.stderr


def test_export_import_round_trip_and_import_refuses_a_live_group(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("export"), unique_name("exported")
    create_topic(kafka.address, topic, 2)
    _produce_numbered(kafka, topic, 2, 25)
    offsets_file = tmp_path / "offsets.json"
    offsets_file.write_text(json.dumps({topic: {"0": 11, "1": 22}}))
    cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        group,
        "--from",
        "offsets-file",
        str(offsets_file),
    )

    exported = tmp_path / "export.json"
    cli(
        kafka,
        "checkpoint",
        "export",
        "--sink",
        sink.url,
        "--group",
        group,
        "--output",
        str(exported),
    )
    document = json.loads(exported.read_text())
    assert document["format_version"] == 3
    assert {(c["partition"], c["next_offset"]) for c in document["checkpoints"]} == {
        (0, 11),
        (1, 22),
    }

    copy = unique_name("copy")
    cli(
        kafka, "checkpoint", "import", "--sink", sink.url, "--group", copy, "--input", str(exported)
    )
    assert sink.checkpoints(copy) == {0: 11, 1: 22}

    live = ConsumerProcess(
        run_args("consumer.examples.orders:app", kafka.address, copy, topic, sink.url),
        tmp_path / "live.log",
    )
    consumers.append(live)
    from tests.fixtures.processes import wait_until  # noqa: PLC0415

    wait_until(lambda: sink.checkpoints(copy) == {0: 25, 1: 25}, timeout=60, what="live catch-up")
    refused = cli(
        kafka,
        "checkpoint",
        "import",
        "--sink",
        sink.url,
        "--group",
        copy,
        "--input",
        str(exported),
        check=False,
    )
    assert refused.returncode == 1
    assert "active members" in refused.stderr
    assert sink.checkpoints(copy) == {0: 25, 1: 25}
    assert live.terminate() == 0


def test_verify_reports_checkpoints_outside_the_log(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path
) -> None:
    topic, group = unique_name("verify"), unique_name("verified")
    create_topic(kafka.address, topic, 3)
    _produce_numbered(kafka, topic, 3, 30)
    offsets_file = tmp_path / "offsets.json"
    offsets_file.write_text(json.dumps({topic: {"0": 5, "1": 30, "2": 12}}))
    cli(
        kafka,
        "checkpoint",
        "adopt",
        "--sink",
        sink.url,
        "--group",
        group,
        "--from",
        "offsets-file",
        str(offsets_file),
    )
    healthy = cli(kafka, "checkpoint", "verify", "--sink", sink.url, "--group", group)
    assert "3 checkpoint(s), all within their logs" in healthy.stdout

    # Retention deletes records of partition 0 below offset 20 before they were consumed ...
    admin = AdminClient({"bootstrap.servers": kafka.address})
    futures = admin.delete_records([KafkaTopicPartition(topic, 0, 20)])
    for future in futures.values():
        future.result(timeout=30)
    # ... and partition 2's checkpoint claims more than the log ever had.
    sink.query_write(
        "UPDATE offsetkeeper_checkpoints SET next_offset = 99"
        f" WHERE group_id = '{group}' AND partition = 2"
    )
    report = cli(kafka, "checkpoint", "verify", "--sink", sink.url, "--group", group, check=False)
    assert report.returncode == 4
    assert (
        f"{topic}[0] next_offset 5 (log 20..30): below the log start: 15 records" in report.stdout
    )
    assert f"{topic}[2] next_offset 99 (log 0..30): beyond the log end" in report.stdout
    assert f"{topic}[1]" not in report.stdout
    assert end_offsets(kafka.address, topic, 3) == {0: 30, 1: 30, 2: 30}
