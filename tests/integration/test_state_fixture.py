"""Keyed state over the golden sinks of the released 0.1.0 code (checkpoint format 2, the
processor state as one JSON blob per partition): today's code continues them exactly.

The fixtures (tests/fixtures/checkpoints/v2-state*.db, how they were made: README there and
tests/fixtures/state_fixture.py) hold the totals of payment events 0..39. Each test copies one,
re-creates its topic with the same records at the same offsets plus new events, runs
`offsetkeeper run` with today's totals app to the end, and checks every customer's total against
the sum over all events: nothing counted twice or lost across the state upgrade. Real broker,
SQLite sink (the fixtures are SQLite files)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.kafka_tools import partition_contents, unique_name
from tests.fixtures.processes import OFFSETKEEPER, REPO, ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.fixtures.state_fixture import (
    FIXTURE_EVENTS,
    GROUP_V1,
    GROUP_V2,
    PARTITIONS,
    SINK_V1,
    SINK_V2,
    TOPIC,
    create_topic,
    decode_state,
    encode,
    expected_totals,
    offsets_of,
    partition_of,
    payment_event,
    produce_payments,
)

pytestmark = pytest.mark.integration

GOLDEN = REPO / "tests" / "fixtures" / "checkpoints"
APP = "consumer.examples.totals:app"
# Where the SQLite sink keeps keyed state entries (format 3; sinks/_sql_state.py): one row per
# (group_id, topic, partition, key) with the value's JSON and the state version that wrote it
# (key and value BLOBs of UTF-8).
STATE_TABLE = "offsetkeeper_state"
NEW_EVENTS = range(FIXTURE_EVENTS, FIXTURE_EVENTS + 30)  # 30 new events: every customer


class GoldenSink:
    """A copy of one golden sink, its checkpoints and leases pointed at this test's topic and
    group (renamed only: offsets, epochs and state blobs as the release wrote them)."""

    def __init__(self, fixture: str, group: str, tmp_path: Path) -> None:
        self.db = tmp_path / fixture
        shutil.copy(GOLDEN / fixture, self.db)
        self.topic, self.group = unique_name("payments-golden"), unique_name(group)
        with sqlite3.connect(self.db) as connection:
            for table in ("offsetkeeper_checkpoints", "offsetkeeper_leases"):
                renamed = connection.execute(
                    f"UPDATE {table} SET topic = ?, group_id = ? WHERE topic = ? AND group_id = ?",
                    (self.topic, self.group, TOPIC, group),
                ).rowcount
                assert renamed == PARTITIONS, f"{fixture}: {table} has {renamed} rows of {group}"
        connection.close()
        self.url = f"sqlite:///{self.db}"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(self.db, timeout=30)
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def tables(self) -> set[str]:
        return {name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type='table'")}

    def checkpoints(self) -> list[tuple[Any, ...]]:
        """(partition, next_offset, format_version, state, state_version) per partition."""
        return self.query(
            "SELECT partition, next_offset, format_version, state, state_version"
            " FROM offsetkeeper_checkpoints WHERE group_id = ? AND topic = ? ORDER BY partition",
            (self.group, self.topic),
        )

    def totals(self) -> dict[str, tuple[Any, ...]]:
        """customer_totals by customer: (total_cents,) or (total_cents, currency)."""
        columns = [row[1] for row in self.query("PRAGMA table_info(customer_totals)")]
        wanted = ["total_cents", *(["currency"] if "currency" in columns else [])]
        rows = self.query(f"SELECT customer, {', '.join(wanted)} FROM customer_totals")
        return {customer: tuple(rest) for customer, *rest in rows}

    def state_entries(self) -> dict[str, tuple[int, Any, int]]:
        """The keyed state entries: key -> (partition, decoded value, version)."""
        if STATE_TABLE not in self.tables():
            return {}
        rows = self.query(
            f"SELECT partition, key, value, version FROM {STATE_TABLE}"
            " WHERE group_id = ? AND topic = ?",
            (self.group, self.topic),
        )
        entries: dict[str, tuple[int, Any, int]] = {}
        for partition, stored_key, value, version in rows:
            key = stored_key.decode() if isinstance(stored_key, bytes) else stored_key
            assert key not in entries, f"state key {key} stored twice"
            entries[key] = (int(partition), decode_state(value), int(version))
        return entries

    def snapshot(self) -> dict[str, Any]:
        """What a run that committed nothing must leave as it was."""
        return {
            "checkpoints": self.checkpoints(),
            "totals": self.totals(),
            "state": self.state_entries(),
        }


def _topic_as_released(kafka: Service, topic: str, more: Iterable[int]) -> list[int]:
    """The fixture's topic again: events 0..39 at the offsets the release consumed them from,
    then `more`. Returns every event index in the topic."""
    create_topic(kafka.address, topic)
    produce_payments(kafka.address, topic, range(FIXTURE_EVENTS))
    extra = list(more)
    produce_payments(kafka.address, topic, extra)
    indices = [*range(FIXTURE_EVENTS), *extra]
    contents = partition_contents(kafka.address, topic, PARTITIONS)
    placed = offsets_of(FIXTURE_EVENTS)
    for i in range(FIXTURE_EVENTS):
        partition, offset = placed[i]
        event = payment_event(i)
        assert contents[partition][offset] == (
            offset,
            event["customer"].encode(),
            encode(event),
        ), f"event {i} is not where 0.1.0 read it"
    assert sum(len(records) for records in contents.values()) == len(indices)
    return indices


def _run(
    kafka: Service,
    sink: GoldenSink,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
    name: str,
    *,
    env: dict[str, str] | None = None,
    until_idle: bool = True,
) -> ConsumerProcess:
    process = ConsumerProcess(
        run_args(
            APP,
            kafka.address,
            sink.group,
            sink.topic,
            sink.url,
            "--batch-max-records",
            "7",
            *(["--stop-when-idle", "2"] if until_idle else []),
        ),
        tmp_path / f"{name}.log",
        env=env,
    )
    consumers.append(process)
    return process


def _finish(process: ConsumerProcess) -> dict[str, Any]:
    code = process.wait(timeout=120)
    assert code == 0, process.log_path.read_text()[-3000:]
    return [e for e in process.events() if e.get("event") == "consumer_stopped"][-1]


def _ends(indices: Iterable[int]) -> dict[int, int]:
    """Each partition's end offset: how many of the events are in it."""
    ends = dict.fromkeys(range(PARTITIONS), 0)
    for i in indices:
        ends[partition_of(i)] += 1
    return ends


def _partition_of_customer(customer: str) -> int:
    return partition_of(int(customer.removeprefix("c")))


def _assert_upgraded(sink: GoldenSink, indices: list[int], *, with_currency: bool) -> None:
    """Rows, checkpoints and state entries after today's code consumed the whole topic."""
    expected = expected_totals(indices)
    ends = _ends(indices)

    totals = sink.totals()
    assert set(totals) == set(expected)
    for customer, total in expected.items():  # row by row: nothing counted twice, nothing lost
        assert totals[customer][0] == total, f"{customer}: {totals[customer]} != {total}"
        if with_currency:
            assert totals[customer][1] == "EUR", customer

    checkpoints = sink.checkpoints()
    assert [(p, offset) for p, offset, *_ in checkpoints] == sorted(ends.items())
    for partition, _, format_version, state, _ in checkpoints:
        assert format_version == 3, f"partition {partition}: format {format_version}"
        assert state is None, f"partition {partition} still holds a state blob: {state!r}"

    entries = sink.state_entries()
    assert set(entries) == set(expected), "one entry per customer"
    for customer, (partition, value, version) in entries.items():
        assert partition == _partition_of_customer(customer), customer
        assert version == 2, f"{customer}: entry version {version}"
        assert value == {"total_cents": expected[customer], "currency": "EUR"}, customer


@pytest.mark.parametrize("migrate_first", [False, True], ids=["as-released", "migrated"])
def test_the_released_v2_state_blob_is_continued_exactly(
    migrate_first: bool, kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    sink = GoldenSink(SINK_V2, GROUP_V2, tmp_path)
    released = sink.checkpoints()
    assert [(p, o, f, v) for p, o, f, _, v in released] == [(0, 23, 2, 2), (1, 17, 2, 2)]
    assert all(blob is not None for _, _, _, blob, _ in released)
    if migrate_first:
        # `checkpoint migrate` rewrites the checkpoints in today's format and keeps the blob
        # (splitting it is the engine's, at the partition's first commit).
        subprocess.run(
            [
                OFFSETKEEPER,
                "checkpoint",
                "migrate",
                "--sink",
                sink.url,
                "--backup",
                str(tmp_path / "backup.json"),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        migrated = sink.checkpoints()
        assert migrated == [(p, o, 3, b, v) for p, o, _, b, v in released], (
            "the same offsets and blobs, in format 3"
        )
    indices = _topic_as_released(kafka, sink.topic, NEW_EVENTS)

    stopped = _finish(_run(kafka, sink, tmp_path, consumers, "upgrade"))
    assert stopped["records"] == len(NEW_EVENTS), "today's code resumes exactly where 0.1.0 stopped"
    _assert_upgraded(sink, indices, with_currency=True)

    # Once more, with nothing new: no record is read again, nothing changes.
    before = sink.snapshot()
    again = _finish(_run(kafka, sink, tmp_path, consumers, "again"))
    assert again["records"] == 0
    assert sink.snapshot() == before


@pytest.mark.parametrize("point", ["after-rows", "after-commit"])
def test_kill_9_at_the_first_commit_after_assignment_loses_and_repeats_nothing(
    point: str, kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    sink = GoldenSink(SINK_V2, GROUP_V2, tmp_path)
    released = sink.snapshot()
    assert released["state"] == {}
    indices = _topic_as_released(kafka, sink.topic, NEW_EVENTS)

    killed = _run(
        kafka,
        sink,
        tmp_path,
        consumers,
        f"killed-{point}",
        env={
            "OFFSETKEEPER_TEST_CRASH_POINT": point,
            "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "1",
        },
        until_idle=False,
    )
    assert killed.wait(timeout=120) == -9, killed.log_path.read_text()[-3000:]
    after_crash = sink.snapshot()
    if point == "after-rows":
        # Rows and entries written, the checkpoints not: the transaction never committed.
        assert after_crash == released, "a batch killed before COMMIT leaves the v2 sink as it was"
        assert {(f, blob is not None) for _, _, f, blob, _ in after_crash["checkpoints"]} == {
            (2, True)
        }
    else:
        # The first batch committed: in each partition it moved, the blob became entries in
        # the same transaction; a partition it did not include keeps its blob, and no entries.
        released_totals = expected_totals(range(FIXTURE_EVENTS))
        moved = 0
        for row in after_crash["checkpoints"]:
            partition, _, format_version, blob, _ = row
            entries = {c for c, (p, _, _) in after_crash["state"].items() if p == partition}
            if row in released["checkpoints"]:
                assert (format_version, blob is not None) == (2, True), partition
                assert entries == set(), partition
                continue
            moved += 1
            assert (format_version, blob) == (3, None), partition
            mine = {c for c in released_totals if _partition_of_customer(c) == partition}
            assert entries == mine, f"partition {partition}: every blob key became an entry"
        assert moved, "the first batch committed"

    _finish(_run(kafka, sink, tmp_path, consumers, "after-crash"))
    _assert_upgraded(sink, indices, with_currency=True)


def test_a_partition_without_new_records_keeps_its_blob_until_it_moves(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    """Partition 1 gets nothing new in the first run: its released state must survive as the
    blob or as entries (never both, never neither) and count on when its payments come."""
    sink = GoldenSink(SINK_V2, GROUP_V2, tmp_path)
    released = {row[0]: row for row in sink.checkpoints()}
    first = [i for i in NEW_EVENTS if partition_of(i) == 0]
    indices = _topic_as_released(kafka, sink.topic, first)
    assert _finish(_run(kafka, sink, tmp_path, consumers, "first"))["records"] == len(first)

    idle = {row[0]: row for row in sink.checkpoints()}[1]
    entries = {c: e for c, e in sink.state_entries().items() if e[0] == 1}
    released_totals = expected_totals(range(FIXTURE_EVENTS))
    if idle[2] == 2:
        assert idle == released[1], "an untouched v2 checkpoint is left exactly as it was"
        assert entries == {}, "entries beside a blob would be counted twice"
    else:
        assert (idle[1], idle[2], idle[3]) == (17, 3, None), idle
        assert {c: v for c, (_, v, _) in entries.items()} == {
            c: {"currency": "EUR", "total_cents": t}
            for c, t in released_totals.items()
            if _partition_of_customer(c) == 1
        }
    assert {c: t for c, (t, _) in sink.totals().items()} == expected_totals(indices)

    later = [i for i in NEW_EVENTS if partition_of(i) == 1]
    produce_payments(kafka.address, sink.topic, later)
    assert _finish(_run(kafka, sink, tmp_path, consumers, "later"))["records"] == len(later)
    _assert_upgraded(sink, [*indices, *later], with_currency=True)


def test_a_released_v1_state_blob_is_upgraded_lazily_per_entry(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    sink = GoldenSink(SINK_V1, GROUP_V1, tmp_path)
    released = sink.checkpoints()
    assert [(p, o, f, v) for p, o, f, _, v in released] == [(0, 23, 2, 1), (1, 17, 2, 1)]
    assert decode_state(released[0][3]) == {"c0": 705, "c2": 717, "c4": 729, "c6": 600}
    # New payments of every customer but c5 (partition 1) and c6 (partition 0): their entries
    # are never read, so they stay as the release wrote them (state version 1, a plain int).
    untouched = {"c5", "c6"}
    new = [i for i in NEW_EVENTS if payment_event(i)["customer"] not in untouched]
    indices = _topic_as_released(kafka, sink.topic, new)

    stopped = _finish(_run(kafka, sink, tmp_path, consumers, "upgrade"))
    assert stopped["records"] == len(new)

    expected = expected_totals(indices)
    assert expected_totals(range(FIXTURE_EVENTS))["c5"] == expected["c5"] == 595
    totals = sink.totals()
    assert set(totals) == set(expected)
    for customer, total in expected.items():
        # The 0.1.0 table had no currency column: the sink added it, and only the rows written
        # since have one.
        assert totals[customer] == (total, None if customer in untouched else "EUR"), customer

    checkpoints = sink.checkpoints()
    assert [(p, o) for p, o, *_ in checkpoints] == sorted(_ends(indices).items())
    assert {(f, blob) for _, _, f, blob, _ in checkpoints} == {(3, None)}

    entries = sink.state_entries()
    assert set(entries) == set(expected)
    for customer, (partition, value, version) in entries.items():
        assert partition == _partition_of_customer(customer), customer
        if customer in untouched:
            assert (value, version) == (expected[customer], 1), f"{customer} upgraded eagerly"
        else:
            assert (value, version) == ({"total_cents": expected[customer], "currency": "EUR"}, 2)

    # A later payment of an untouched customer upgrades its entry when it is read.
    late = next(i for i in range(NEW_EVENTS.stop, NEW_EVENTS.stop + 7) if i % 7 == 5)  # c5
    assert payment_event(late)["customer"] == "c5"
    produce_payments(kafka.address, sink.topic, [late])
    _finish(_run(kafka, sink, tmp_path, consumers, "late"))
    total = expected["c5"] + payment_event(late)["amount_cents"]
    assert sink.totals()["c5"] == (total, "EUR")
    entries = sink.state_entries()
    assert entries["c5"] == (1, {"total_cents": total, "currency": "EUR"}, 2)
    assert entries["c6"] == (0, expected["c6"], 1), "still not read, still version 1"


def test_the_state_fixtures_are_as_the_release_wrote_them(tmp_path: Path) -> None:
    """The committed files themselves (never regenerated): format 2, a state blob per partition.
    Read from copies: SQLite would leave -wal and -shm files beside a WAL database it opens."""
    for fixture, group, version in ((SINK_V2, GROUP_V2, 2), (SINK_V1, GROUP_V1, 1)):
        copy = tmp_path / fixture
        shutil.copy(GOLDEN / fixture, copy)
        connection = sqlite3.connect(copy)
        try:
            rows = connection.execute(
                "SELECT group_id, topic, partition, next_offset, format_version, writer_version,"
                " state, state_version FROM offsetkeeper_checkpoints ORDER BY partition"
            ).fetchall()
        finally:
            connection.close()
        assert [row[:6] for row in rows] == [
            (group, TOPIC, 0, 23, 2, "0.1.0"),
            (group, TOPIC, 1, 17, 2, "0.1.0"),
        ], fixture
        for row in rows:
            state = json.loads(row[6])
            assert row[7] == version, fixture
            totals = expected_totals(range(FIXTURE_EVENTS))
            mine = {c: t for c, t in totals.items() if _partition_of_customer(c) == row[2]}
            if version == 1:
                assert state == mine, fixture
            else:
                assert state == {c: {"currency": "EUR", "total_cents": t} for c, t in mine.items()}


def test_migrate_with_the_app_splits_and_upgrades_every_entry_at_once(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    sink = GoldenSink(SINK_V1, GROUP_V1, tmp_path)
    released = expected_totals(range(FIXTURE_EVENTS))

    def migrate(*extra: str) -> str:
        command = ["checkpoint", "migrate", "--sink", sink.url, "--app", APP]
        done = subprocess.run(
            [OFFSETKEEPER, *command, "--bootstrap-servers", kafka.address, *extra],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    before = sink.snapshot()
    dry = migrate("--dry-run")
    assert f"{sink.topic}[0] state: 4 entries would be split" in dry
    assert f"{sink.topic}[1] state: 3 entries would be split" in dry
    assert "4 would be upgraded" in dry
    assert sink.snapshot() == before, "a dry run writes nothing"

    backup = tmp_path / "backup.json"
    done = migrate("--backup", str(backup))
    assert "3 entries were split from a format-2 blob, 3 were upgraded" in done
    assert {(f, blob, v) for _, _, f, blob, v in sink.checkpoints()} == {(3, None, None)}
    entries = sink.state_entries()
    assert {k: (v, version) for k, (_p, v, version) in entries.items()} == {
        customer: ({"total_cents": total, "currency": "EUR"}, 2)
        for customer, total in released.items()
    }
    saved = json.loads(backup.read_text())
    assert all(c["state"] is not None for c in saved["checkpoints"] if c["group"] == sink.group)

    indices = _topic_as_released(kafka, sink.topic, NEW_EVENTS)
    stopped = _finish(_run(kafka, sink, tmp_path, consumers, "after-migrate"))
    assert stopped["records"] == len(NEW_EVENTS)
    expected = expected_totals(indices)
    assert {c: t for c, (t, *_rest) in sink.totals().items()} == expected
