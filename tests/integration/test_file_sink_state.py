"""Keyed state in `file:///DIR` through the real engine and a real broker: a non-idempotent
app (a count and a sum per key, `tests/apps/file_state_counts.py`) stays exact through kill -9
at every point of the commit sequence and at random instants, restarts, and partitions moving
between two members sharing the directory, while a reader in another thread checks that every
state it reads is the truth at the checkpoint beside it. Compaction runs all along (small
batches make many deltas), and the files it supersedes never outlive a new owner's acquire."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consumer import Checkpoint, TopicPartition
from sinks import FileSink, read_committed_rows
from sinks._file_documents import read_group_document
from sinks._file_layout import FileLayout
from tests.apps.file_state_counts import TOTALS, step
from tests.fixtures.chaos import PacedProducer, chaos_event
from tests.fixtures.kafka_tools import (
    create_topic,
    end_offsets,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 4
APP = "tests.apps.file_state_counts:app"
MAX_DELTAS = 32  # the file sink's default (sinks._file_state.DEFAULT_MAX_DELTAS)

Contents = dict[int, list[tuple[int, bytes | None, bytes | None]]]
Entries = dict[str, dict[str, int]]


def _args(kafka: Service, group: str, topic: str, root: Path, *, batch: int = 50) -> list[str]:
    return run_args(
        APP, kafka.address, group, topic, f"file://{root}", "--batch-max-records", str(batch)
    )


class Truth:
    """Each partition's expected entries below a given offset, folded from the topic."""

    def __init__(self, contents: Contents) -> None:
        self._events = {
            p: [json.loads(value or b"") for _offset, _key, value in records]
            for p, records in contents.items()
        }
        self._cache: dict[tuple[int, int], Entries] = {}

    def at(self, partition: int, next_offset: int) -> Entries:
        found = self._cache.get((partition, next_offset))
        if found is None:
            entries: dict[str, dict[str, int] | None] = {}
            for event in self._events[partition][:next_offset]:
                entries[event["key"]] = step(entries.get(event["key"]), event["version"])
            found = {key: value for key, value in entries.items() if value is not None}
            self._cache[partition, next_offset] = found
        return found


def _reader(root: Path) -> FileSink:
    sink = FileSink(root)
    sink.open_existing()
    return sink


def _checkpoints(root: Path, group: str) -> dict[int, Checkpoint]:
    return {tp.partition: cp for tp, cp in _reader(root).load_checkpoints(group).items()}


def _offsets(root: Path, group: str) -> dict[int, int]:
    return {p: cp.next_offset for p, cp in _checkpoints(root, group).items()}


def _state(reader: FileSink, group: str, topic: str, partition: int) -> Entries:
    entries = {}
    for entry in reader.scan_state(group, TopicPartition(topic, partition)):
        assert entry.version == 1
        entries[entry.key] = json.loads(entry.value)
    return entries


def _assert_exact(root: Path, group: str, topic: str, truth: Truth) -> int:
    """With no writer running: each partition's state is the truth at its checkpoint, and the
    last committed row of each key shows the same totals. Returns the records committed."""
    offsets = _offsets(root, group)
    reader = _reader(root)
    expected_rows: dict[str, tuple[int, int]] = {}
    for partition in range(PARTITIONS):
        expected = truth.at(partition, offsets.get(partition, 0))
        actual = _state(reader, group, topic, partition)
        wrong = sorted(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        assert not wrong, (
            f"partition {partition} at {offsets.get(partition)}: {len(wrong)} keys differ, e.g. "
            + ", ".join(f"{k}: {actual.get(k)} != truth {expected.get(k)}" for k in wrong[:3])
        )
        sizes = reader.state_sizes(group, [TopicPartition(topic, partition)])
        count = sum(1 for _ in expected)
        assert sizes.get(TopicPartition(topic, partition), (0, 0))[0] == count
        for key, value in expected.items():
            expected_rows[key] = (value["count"], value["sum"])
    last_rows = {
        row["event_key"]: (row["count"], row["total"])
        for row in read_committed_rows(root, TOTALS, group)
    }
    deleted = {key for key, value in last_rows.items() if value == (0, 0)}
    assert {k: v for k, v in last_rows.items() if k not in deleted} == expected_rows
    return sum(offsets.values())


def _state_files(root: Path, group: str) -> tuple[set[str], set[str]]:
    """(every file in the group's state directory, the files its manifests list)."""
    layout = FileLayout(root)
    document = read_group_document(layout.checkpoint_path(group))
    listed = set() if document is None else {n for m in document.state.values() for n in m.files}
    return {p.name for p in layout.state_dir(group).iterdir()}, listed


@dataclass
class StateWatcher:
    """A reader in a thread: reads the checkpoints, every partition's state, and the
    checkpoints again; when no commit came between, the state must be the truth at them (a
    mix of two batches, or a delta of an uncommitted one, would show). Its file reads race
    the writers' compactions, which the reader must survive."""

    root: Path
    group: str
    topic: str
    truth: Truth
    checked: int = 0
    raced: int = 0
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StateWatcher:
        self._thread = threading.Thread(target=self._run, name="state-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # a reader failure is a finding
                self.violations.append(f"reader failed: {type(exc).__name__}: {exc}")
            self._stop.wait(0.005)

    def poll(self) -> None:
        before = _checkpoints(self.root, self.group)
        reader = _reader(self.root)
        states = {p: _state(reader, self.group, self.topic, p) for p in range(PARTITIONS)}
        if _checkpoints(self.root, self.group) != before:
            self.raced += 1
            return
        for partition, entries in states.items():
            cp = before.get(partition)
            expected = self.truth.at(partition, 0 if cp is None else cp.next_offset)
            if entries != expected:
                self.violations.append(
                    f"partition {partition} at {cp and cp.next_offset}: state is not the truth"
                )
        self.checked += 1


def _wait_for_progress(
    root: Path, group: str, target: int, process: ConsumerProcess, timeout: float = 120
) -> None:
    wait_until(
        lambda: sum(_offsets(root, group).values()) >= target or not process.alive(),
        timeout=timeout,
        interval=0.02,
        what=f"progress to {target}",
    )


def test_counts_and_sums_stay_exact_through_kill_9_and_restarts(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    total = 12_000
    topic, group = unique_name("file-state"), unique_name("file-state-crash")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 300) for i in range(total)))
    contents = partition_contents(kafka.address, topic, PARTITIONS)
    truth = Truth(contents)
    root = tmp_path / "out"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill moments seed={seed}")
    watcher = StateWatcher(root, group, topic, truth).start()
    try:
        runs = 0
        # Mid-batch (outputs and state files written, nothing committed), inside the file
        # sink's commit (files renamed, document not replaced), and after the commit.
        for point in ("after-rows", "file-after-data", "after-commit"):
            runs += 1
            before = sum(_offsets(root, group).values())
            process = ConsumerProcess(
                _args(kafka, group, topic, root),
                tmp_path / f"consumer-{runs}.log",
                env={
                    "OFFSETKEEPER_TEST_CRASH_POINT": point,
                    "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": str(rng.randint(3, 12)),
                },
            )
            consumers.append(process)
            assert process.wait(timeout=120) == -9, process.log_path.read_text()[-3000:]
            if point == "file-after-data":
                on_disk, listed = _state_files(root, group)
                assert on_disk - listed, "the kill inside the commit left no state file behind"
            committed = _assert_exact(root, group, topic, truth)
            assert committed > before or point == "after-rows", f"no progress before {point}"
            print(f"kill at {point}: {committed} records committed and exact")
        # Kills at random instants of the batch cycle, each after progress of its own.
        for fraction in sorted(rng.uniform(0.3, 0.85) for _ in range(3)):
            runs += 1
            process = ConsumerProcess(
                _args(kafka, group, topic, root), tmp_path / f"consumer-{runs}.log"
            )
            consumers.append(process)
            target = max(int(total * fraction), sum(_offsets(root, group).values()) + 1000)
            _wait_for_progress(root, group, target, process)
            time.sleep(rng.uniform(0, 0.05))
            assert process.alive(), process.log_path.read_text()[-3000:]
            process.kill()
            committed = _assert_exact(root, group, topic, truth)
            print(f"random kill: {committed} records committed and exact")

        final = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "consumer-final.log")
        consumers.append(final)
        ends = end_offsets(kafka.address, topic, PARTITIONS)
        wait_until(lambda: _offsets(root, group) == ends, timeout=120, what="the end offsets")
        assert final.terminate() == 0
        watcher.poll()
    finally:
        watcher.stop()
    assert not watcher.violations, watcher.violations[:5]
    assert watcher.checked > 0, "the reader never read a quiet moment"
    print(f"reader: {watcher.checked} consistent reads, {watcher.raced} raced a commit")
    assert _assert_exact(root, group, topic, truth) == total
    _assert_compacted_and_clean(root, group)


def _assert_compacted_and_clean(root: Path, group: str) -> None:
    """Every partition was compacted and lists a bounded number of deltas; every file of the
    state directory is listed (the last owner's acquire removed what kills left behind)."""
    on_disk, listed = _state_files(root, group)
    assert on_disk == listed, f"files no manifest lists: {sorted(on_disk - listed)[:5]}"
    document = read_group_document(FileLayout(root).checkpoint_path(group))
    assert document is not None
    assert len(document.state) == PARTITIONS
    for manifest in document.state.values():
        assert manifest.files[0].endswith(".base.jsonl"), manifest
        assert manifest.deltas <= MAX_DELTAS
        assert manifest.seq > MAX_DELTAS
    assert {cp.state for cp in document.checkpoints.values()} == {None}


def test_partitions_moving_between_two_members_and_back_keep_exact_state(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    """A takes every partition; B joins and takes some; B is killed and A takes them back:
    A must read them again (B changed them), not reuse what it held before."""
    total = 9_000
    topic, group = unique_name("file-state-two"), unique_name("file-state-two")
    create_topic(kafka.address, topic, PARTITIONS)
    root = tmp_path / "out"
    producer = PacedProducer(kafka.address, topic, total, rate=600, keys=200).start()
    first = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "first.log")
    consumers.append(first)
    _wait_for_progress(root, group, 800, first, timeout=60)
    second = ConsumerProcess(_args(kafka, group, topic, root), tmp_path / "second.log")
    consumers.append(second)
    wait_until(
        lambda: any(epoch >= 2 for epoch in _epochs(root, group).values()),
        timeout=60,
        what="a partition committed by the second member",
    )
    progress = sum(_offsets(root, group).values())
    _wait_for_progress(root, group, progress + 600, second, timeout=60)
    assert second.alive(), second.log_path.read_text()[-3000:]
    second.kill()  # its partitions go back to the first member after the session timeout
    producer.join(timeout=120)
    ends = end_offsets(kafka.address, topic, PARTITIONS)
    wait_until(lambda: _offsets(root, group) == ends, timeout=120, what="the end offsets")
    assert first.terminate() == 0
    contents = partition_contents(kafka.address, topic, PARTITIONS)
    assert _assert_exact(root, group, topic, Truth(contents)) == total
    back = [p for p, epoch in _epochs(root, group).items() if epoch >= 3]
    assert back, "no partition went back to the first member"
    print(f"partitions that moved and came back: {back}")


def _epochs(root: Path, group: str) -> Mapping[int, int]:
    return {p: cp.epoch for p, cp in _checkpoints(root, group).items()}
