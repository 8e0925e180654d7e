"""Exactly once into `file:///DIR` across kill -9 (random moments and inside the file sink's
commit) and a rebalance between two members, with a reader polling the committed files all along."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from consumer import TopicPartition
from sinks import FileSink, committed_files
from tests.apps.chaos import EVENTS, LATEST
from tests.fixtures.chaos import PacedProducer, chaos_event, verify_chaos_sink
from tests.fixtures.file_sink import CommittedFileWatcher, committed_as_sqlite, last_row_per_key
from tests.fixtures.kafka_tools import (
    create_topic,
    end_offsets,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import OFFSETKEEPER, ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 4
CHAOS_APP = "tests.apps.chaos:app"


def _args(kafka: Service, group: str, topic: str, root: Path, *, batch: int = 300) -> list[str]:
    return run_args(
        CHAOS_APP,
        kafka.address,
        group,
        topic,
        f"file://{root}",
        "--batch-max-records",
        str(batch),
    )


def _checkpoints(root: Path, group: str) -> dict[int, int]:
    sink = FileSink(root)
    sink.open_existing()
    return {tp.partition: cp.next_offset for tp, cp in sink.load_checkpoints(group).items()}


def _committed(root: Path, group: str) -> int:
    return sum(_checkpoints(root, group).values())


def _assert_output_matches_checkpoints(
    root: Path, group: str, contents: dict[int, list[tuple[int, bytes | None, bytes | None]]]
) -> int:
    """The committed events are exactly the records below each checkpoint, each once, with
    their content. Returns how many."""
    checkpoints = _checkpoints(root, group)
    expected = {
        (partition, offset): json.loads(value or b"")
        for partition, records in contents.items()
        for offset, _key, value in records
        if offset < checkpoints.get(partition, 0)
    }
    db = committed_as_sqlite(root, group, (EVENTS,))
    rows = db.execute(
        "SELECT source_partition, source_offset, event_key, version FROM chaos_events"
    ).fetchall()
    actual = {(p, o): {"key": k, "version": v} for p, o, k, v in rows}
    assert len(actual) == len(rows), "a record is committed twice"
    assert actual.keys() == expected.keys(), (
        f"missing {sorted(expected.keys() - actual.keys())[:3]},"
        f" beyond the checkpoints {sorted(actual.keys() - expected.keys())[:3]}"
    )
    for where, event in expected.items():
        assert actual[where] == event, f"committed row for {where} differs from the record"
    return len(actual)


def _files_beyond_checkpoints(root: Path, group: str) -> list[str]:
    """Data files a crash left after renaming and before checkpointing (never readable)."""
    checkpoints = _checkpoints(root, group)
    names = []
    for table in (EVENTS, LATEST):
        for path in (root / table.name / group).glob("*.jsonl"):
            _topic, partition, _first, last = path.stem.split("+")
            if int(last) >= checkpoints.get(int(partition), 0):
                names.append(path.name)
    return names


def _verify_everything(kafka: Service, topic: str, root: Path, group: str) -> dict[str, int]:
    db = committed_as_sqlite(root, group, (EVENTS, LATEST))
    last_row_per_key(db, LATEST)  # the file sink is a log: the last row per key is the value
    return verify_chaos_sink(
        kafka.address, topic, PARTITIONS, lambda sql: db.execute(sql).fetchall()
    )


def test_kill_9_anywhere_never_shows_a_reader_a_partial_or_duplicate_file(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 24_000
    topic, group = unique_name("chaos-file"), unique_name("file-crash")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 5_000) for i in range(total)))
    contents = partition_contents(kafka.address, topic, PARTITIONS)
    root = tmp_path / "out"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill moments seed={seed}")
    watcher = CommittedFileWatcher(root, EVENTS, group).start()
    try:
        runs = 0
        # Kills inside the commit sequence, each a few batches into a restarted consumer.
        for point in ("file-after-data", "after-rows", "after-commit"):
            runs += 1
            before = _committed(root, group)
            process = ConsumerProcess(
                _args(kafka, group, topic, root),
                tmp_path / f"consumer-{runs}.log",
                env={
                    "OFFSETKEEPER_TEST_CRASH_POINT": point,
                    "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": str(rng.randint(2, 6)),
                },
            )
            consumers.append(process)
            assert process.wait(timeout=120) == -9, process.log_path.read_text()[-3000:]
            leftovers = _files_beyond_checkpoints(root, group)
            if point == "file-after-data":
                assert leftovers, "the kill inside the commit left no renamed file behind"
            committed = _assert_output_matches_checkpoints(root, group, contents)
            assert committed > before, f"no progress before the {point} kill"
            print(f"kill at {point}: {committed} records committed, leftovers {len(leftovers)}")
        # Kills at random instants of the batch cycle, each after progress of its own.
        for fraction in sorted(rng.uniform(0.4, 0.85) for _ in range(2)):
            runs += 1
            process = ConsumerProcess(
                _args(kafka, group, topic, root), tmp_path / f"consumer-{runs}.log"
            )
            consumers.append(process)
            target = max(int(total * fraction), _committed(root, group) + 1500)
            wait_until(
                lambda target=target, process=process: (
                    _committed(root, group) >= target or not process.alive()
                ),
                timeout=120,
                interval=0.02,
                what=f"progress to {target}",
            )
            time.sleep(rng.uniform(0, 0.05))
            assert process.alive(), process.log_path.read_text()[-3000:]
            process.kill()
            committed = _assert_output_matches_checkpoints(root, group, contents)
            print(f"random kill: {committed} records committed")

        final = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "consumer-final.log")
        consumers.append(final)
        ends = end_offsets(kafka.address, topic, PARTITIONS)
        wait_until(lambda: _checkpoints(root, group) == ends, timeout=120, what="the end offsets")
        assert final.terminate() == 0
        watcher.poll()  # one last look after everything is committed
    finally:
        watcher.stop()
    assert not watcher.violations, watcher.violations[:5]
    assert len(watcher.seen_records) == total, "the reader did not see every record"
    print(f"reader: {watcher.polls} polls, {len(watcher.seen_files)} committed files")
    report = _verify_everything(kafka, topic, root, group)
    assert report["records"] == total
    assert _files_beyond_checkpoints(root, group) == []  # the last restart cleaned up
    assert not list(root.rglob(".*.tmp")), "a temp file outlived its batch"


def test_two_members_rebalancing_into_one_directory_commit_each_record_once(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 12_000
    topic, group = unique_name("chaos-file-two"), unique_name("file-two")
    create_topic(kafka.address, topic, PARTITIONS)
    root = tmp_path / "out"
    producer = PacedProducer(kafka.address, topic, total, rate=1500, keys=3_000).start()
    watcher = CommittedFileWatcher(root, EVENTS, group).start()
    try:
        first = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "first.log")
        consumers.append(first)
        wait_until(lambda: _committed(root, group) >= 1000, timeout=60, what="first progress")
        second = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "second.log")
        consumers.append(second)
        # Both members own partitions: the group rebalanced and both committed into the dir.
        wait_until(
            lambda: len(_writers(root, group)) >= 2, timeout=60, what="both members committing"
        )
        assert first.terminate() == 0  # the second member takes every partition over
        producer.join(timeout=60)
        ends = end_offsets(kafka.address, topic, PARTITIONS)
        wait_until(lambda: _checkpoints(root, group) == ends, timeout=90, what="the end offsets")
        assert second.terminate() == 0
        watcher.poll()
    finally:
        watcher.stop()
    assert not watcher.violations, watcher.violations[:5]
    report = _verify_everything(kafka, topic, root, group)
    assert report["records"] == total
    assert report["writers"] >= 2
    print(f"two members: {report}, reader: {watcher.polls} polls")


def _writers(root: Path, group: str) -> set[str]:
    db = committed_as_sqlite(root, group, (EVENTS,))
    return {str(w) for (w,) in db.execute("SELECT DISTINCT writer FROM chaos_events")}


def _offsetkeeper(kafka: Service, root: Path, group: str, *args: str) -> str:
    done = subprocess.run(
        [
            OFFSETKEEPER,
            "checkpoint",
            *args,
            "--bootstrap-servers",
            kafka.address,
            "--sink",
            f"file://{root}",
            "--group",
            group,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_checkpoint_reset_back_to_a_file_boundary_rewrites_the_rest_once(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    """`checkpoint reset` on a file sink: the files beyond the new offset stop being committed
    at once, the next consumer deletes them and writes the range again; every assignment (and
    the reset) bumps the partition's fencing epoch."""
    topic, group = unique_name("chaos-file-reset"), unique_name("file-reset")
    create_topic(kafka.address, topic, 2)
    produce(kafka.address, topic, (chaos_event(i, 100) for i in range(400)))
    contents = partition_contents(kafka.address, topic, 2)
    root = tmp_path / "out"

    def run(name: str) -> None:
        process = ConsumerProcess(
            [*_args(kafka, group, topic, root, batch=50), "--stop-when-idle", "2"],
            tmp_path / f"{name}.log",
        )
        consumers.append(process)
        assert process.wait(timeout=90) == 0, process.log_path.read_text()[-3000:]

    run("first")
    ends = end_offsets(kafka.address, topic, 2)
    assert _checkpoints(root, group) == ends
    shown = json.loads(_offsetkeeper(kafka, root, group, "show", "--format", "json"))
    assert {(c["partition"], c["lag"]) for c in shown["checkpoints"]} == {(0, 0), (1, 0)}

    p0_files = [f for f in committed_files(root, EVENTS, group) if f.partition == 0]
    assert len(p0_files) >= 3, "the test needs several files to reset between"
    boundary = p0_files[1].first_offset
    _offsetkeeper(
        kafka,
        root,
        group,
        "reset",
        "--topic",
        topic,
        "--partition",
        "0",
        "--to-offset",
        str(boundary),
    )
    assert _checkpoints(root, group) == {0: boundary, 1: ends[1]}
    assert [f.path for f in committed_files(root, EVENTS, group) if f.partition == 0] == [
        p0_files[0].path
    ]
    assert _assert_output_matches_checkpoints(root, group, contents) == boundary + ends[1]

    run("second")
    assert _checkpoints(root, group) == ends
    assert _assert_output_matches_checkpoints(root, group, contents) == 400
    assert _files_beyond_checkpoints(root, group) == []
    leases = json.loads((root / "_offsetkeeper" / "leases" / f"{group}.json").read_text())
    # p0: first run, reset, second run; p1: the two runs.
    assert {(e["partition"], e["epoch"]) for e in leases["epochs"]} == {(0, 3), (1, 2)}
    sink = FileSink(root)
    sink.open_existing()
    assert sink.load_checkpoints(group)[TopicPartition(topic, 0)].epoch == 3
