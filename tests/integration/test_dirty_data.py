"""Dirty data end to end, over SQLite and PostgreSQL: an app that passes values through
unchecked (tests/apps/passthrough.py) over three partitions of good orders mixed with every
kind of bad record (tests/fixtures/dirty_orders.py), one of which passes the row check but
violates a CHECK constraint of the output table, so the sink refuses its batch and the engine
splits it. Under dead-letter: exit 0, every good row once, each bad record dead-lettered once
with its field (or stored exactly, where the sink can store it). Under stop: the bad record's
partition stops at it (exit 2), the others finish. A kill -9 in the middle of a split loses and
repeats nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinks._postgres import PostgresSink
from tests.apps.passthrough import ORDERS
from tests.fixtures.dead_letters import read_topic
from tests.fixtures.dirty_orders import (
    CHECK_CONSTRAINT,
    DIRTY,
    Dirty,
    Produced,
    check_letters,
    check_rows,
    produce_orders,
)
from tests.fixtures.kafka_tools import create_topic, unique_name
from tests.fixtures.processes import ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest
from tests.integration.test_dead_letters import DEAD_LETTER_FLAGS

pytestmark = pytest.mark.integration

APP = "tests.apps.passthrough:app"
PARTITIONS = 3
BY_NAME = {dirty.name: dirty for dirty in DIRTY}


def _kind(sink: SinkUnderTest) -> str:
    return "sqlite" if sink.url.startswith("sqlite:") else "postgresql"


def _add_check_constraint(sink: SinkUnderTest) -> str:
    """The output table with `CHECK (amount >= 0)`, made before the run; the sink's kind.

    SQLite cannot add a constraint to a table: the table is made first, as the sink would make
    it plus the CHECK, and the sink's CREATE TABLE IF NOT EXISTS keeps it. PostgreSQL: the
    sink makes the table, then ALTER TABLE adds the constraint."""
    kind = _kind(sink)
    if kind == "sqlite":
        sink.query_write(
            "CREATE TABLE passthrough_orders (order_id TEXT, writer TEXT,"
            " source_partition INTEGER, source_offset INTEGER, amount INTEGER, note TEXT,"
            " price REAL, attrs TEXT, paid INTEGER, CHECK (amount >= 0),"
            " PRIMARY KEY (order_id, writer))"
        )
    else:
        made = PostgresSink(sink.url)
        made.open([ORDERS])
        made.close()
        sink.query_write(
            f"ALTER TABLE passthrough_orders ADD CONSTRAINT {CHECK_CONSTRAINT} CHECK (amount >= 0)"
        )
    return kind


def _check_constraint_kept(sink: SinkUnderTest) -> None:
    if _kind(sink) == "sqlite":
        (definition,) = sink.query(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'passthrough_orders'"
        )
        assert "CHECK (amount >= 0)" in str(definition[0])
    else:
        assert sink.query(f"SELECT 1 FROM pg_constraint WHERE conname = '{CHECK_CONSTRAINT}'") == [
            (1,)
        ]


def _topic(kafka: Service, name: str, good: int, dirty: list[tuple[int, int, Dirty]]) -> Produced:
    topic = unique_name(name)
    create_topic(kafka.address, topic, PARTITIONS)
    return produce_orders(kafka.address, topic, partitions=PARTITIONS, good=good, dirty=dirty)


def _tail(process: ConsumerProcess) -> str:
    return process.log_path.read_text(errors="replace")[-4000:]


def test_every_kind_of_bad_record_is_dead_lettered_once_and_every_good_row_lands_once(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    kind = _add_check_constraint(sink)
    dirty = [(i % PARTITIONS, 40 + 83 * i, record) for i, record in enumerate(DIRTY)]
    produced = _topic(kafka, "dirty", 3000, dirty)
    group = unique_name("dirty")
    process = ConsumerProcess(
        run_args(APP, kafka.address, group, produced.topic, sink.url, *DEAD_LETTER_FLAGS),
        tmp_path / "run.log",
    )
    consumers.append(process)

    assert process.wait(timeout=300) == 0, _tail(process)

    counts = check_rows(sink.query, produced, kind)
    letters = check_letters(
        read_topic(kafka.address, f"{group}.dlq"), produced, kind, exactly_once=True
    )
    assert sink.checkpoints(group) == produced.ends()
    _check_constraint_kept(sink)
    events = [e["event"] for e in process.events()]
    assert "rows_refused_isolating" in events, "the CHECK violation was found by splitting"
    assert events.count("record_dead_lettered") == letters
    print(  # the figures of the run, for the report (pytest -s)
        json.dumps(
            {
                "sink": kind,
                "records": len(produced.values),
                "good": len(produced.good),
                "dirty": len(produced.dirty),
                "dirty_stored": len(produced.dirty) - len(produced.refused(kind)),
                "rows": counts["rows"],
                "letters": letters,
                "exit": 0,
            }
        )
    )


def test_under_stop_the_bad_records_partition_stops_at_it_and_the_others_finish(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    kind = _add_check_constraint(sink)
    # Partition 0 is clean; 1 holds a record only the sink refuses (found by the split), 2 one
    # the row check refuses.
    dirty = [(1, 120, BY_NAME["CHECK violation"]), (2, 200, BY_NAME["amount 10**30"])]
    produced = _topic(kafka, "dirty-stop", 900, dirty)
    group = unique_name("dirty-stop")
    process = ConsumerProcess(
        run_args(
            APP,
            kafka.address,
            group,
            produced.topic,
            sink.url,
            "--bad-record-retries",
            "0",
            "--stop-when-idle",
            "3",
        ),
        tmp_path / "run.log",
    )
    consumers.append(process)

    assert process.wait(timeout=300) == 2, _tail(process)

    stops = {coordinates[0]: coordinates[1] for coordinates in produced.dirty}
    expected = {0: produced.ends()[0], **stops}
    assert sink.checkpoints(group) == expected
    counts = check_rows(sink.query, produced, kind, below=expected)
    assert counts["rows"] == sum(expected.values()), "every record before the stops"
    stopped = {
        (e["partition"], e["offset"]): e["field"]
        for e in process.events()
        if e["event"] == "partition_stopped"
    }
    assert stopped == {(1, stops[1]): "amount", (2, stops[2]): "amount"}


@pytest.mark.fault
def test_a_kill_while_a_refused_batch_is_split_loses_and_repeats_nothing(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    kind = _add_check_constraint(sink)
    dirty = [(1, 150, BY_NAME["CHECK violation"]), (2, 300, BY_NAME["amount 10**30"])]
    produced = _topic(kafka, "dirty-kill", 1200, dirty)
    group = unique_name("dirty-kill")
    args = run_args(APP, kafka.address, group, produced.topic, sink.url, *DEAD_LETTER_FLAGS)
    crashed = ConsumerProcess(
        args, tmp_path / "crash.log", env={"OFFSETKEEPER_TEST_CRASH_POINT": "after-split-part"}
    )
    consumers.append(crashed)
    assert crashed.wait(timeout=300) == -9, _tail(crashed)
    assert "rows_refused_isolating" in [e["event"] for e in crashed.events()]
    at_crash = sink.checkpoints(group)
    assert at_crash, "a part of the refused batch committed before the kill"
    assert at_crash != produced.ends(), "the kill came before the split was done"

    restarted = ConsumerProcess(args, tmp_path / "restart.log")
    consumers.append(restarted)
    assert restarted.wait(timeout=300) == 0, _tail(restarted)

    counts = check_rows(sink.query, produced, kind)
    letters = read_topic(kafka.address, f"{group}.dlq")
    distinct = check_letters(letters, produced, kind, exactly_once=False)
    assert distinct == len(dirty)
    assert sink.checkpoints(group) == produced.ends()
    print(
        json.dumps(
            {
                "sink": kind,
                "records": len(produced.values),
                "checkpoints_at_crash": at_crash,
                "rows": counts["rows"],
                "writers": counts["writers"],
                "letters": len(letters),
                "distinct_letters": distinct,
            }
        )
    )
