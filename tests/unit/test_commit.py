"""consumer.engine.commit: the commit sequence against a real SqliteSink, and the crash switch."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from consumer import FencedError, RowsOrigin, SinkError, SourcePosition, Table, TopicPartition
from consumer.decoding.decoders import decoder_for
from consumer.engine.batch import PartitionWork, process_partition
from consumer.engine.commit import CommittedBatch, commit_batch
from consumer.engine.crash import CRASH_AFTER_ENV, CRASH_POINT_ENV, CrashInjector
from sinks import SqliteSink
from tests.fixtures.apps import EVENTS, event, events_app
from tests.fixtures.fake_backend import raw
from tests.fixtures.sqlite_db import checkpoints, table_rows

GROUP = "g"
P0 = TopicPartition("events", 0)
P1 = TopicPartition("events", 1)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "commit.db"


@pytest.fixture
def sink(db: Path) -> Iterator[SqliteSink]:
    opened = SqliteSink(db)
    opened.open([EVENTS])
    yield opened
    opened.close()


def _work(tp: TopicPartition, values: Sequence[Any], first_offset: int = 0) -> PartitionWork:
    records = [raw(tp.topic, tp.partition, first_offset + i, v) for i, v in enumerate(values)]
    return process_partition(events_app(), decoder_for("json"), tp, records)


def _ids(db: Path) -> list[tuple[str, int]]:
    return [(r["id"], r["amount"]) for r in table_rows(db, "events", order_by="id")]


def test_commit_batch_writes_merged_rows_and_checkpoints_in_one_transaction(
    sink: SqliteSink, db: Path
) -> None:
    taken = sink.acquire(GROUP, [P0, P1])
    works = [
        _work(P0, [event("a", 1), event("b", 1), event("a", 2)], first_offset=10),
        _work(P1, [event("c", 5)]),
    ]

    committed = commit_batch(sink, group=GROUP, works=works, epochs=taken, crash=CrashInjector())

    assert committed == CommittedBatch(next_offsets={P0: 13, P1: 1}, records=4, rows=3)
    assert _ids(db) == [("a", 2), ("b", 1), ("c", 5)]
    assert checkpoints(db, GROUP) == {("events", 0): 13, ("events", 1): 1}


def test_a_partition_without_progress_gets_no_checkpoint(sink: SqliteSink, db: Path) -> None:
    taken = sink.acquire(GROUP, [P0, P1])
    stuck = _work(P0, [b"{broken", event("z", 1)], first_offset=4)
    moving = _work(P1, [event("c", 5)])
    assert stuck.error is not None

    committed = commit_batch(
        sink, group=GROUP, works=[stuck, moving], epochs=taken, crash=CrashInjector()
    )

    assert committed.next_offsets == {P1: 1}
    assert committed.records == 1
    assert checkpoints(db, GROUP) == {("events", 1): 1}
    assert _ids(db) == [("c", 5)]


class _FailingWrites(SqliteSink):
    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        super().write_rows(table, rows, origin)
        raise SinkError("write failed after the rows went in (injected)")

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        super().write_guarded_rows(table, rows, positions, overwrite_newer=overwrite_newer)
        raise SinkError("write failed after the rows went in (injected)")


def test_a_failure_after_rows_rolls_the_whole_batch_back(db: Path) -> None:
    sink = _FailingWrites(db)
    sink.open([EVENTS])
    taken = sink.acquire(GROUP, [P0])

    with pytest.raises(SinkError, match="injected"):
        commit_batch(
            sink,
            group=GROUP,
            works=[_work(P0, [event("a", 1)])],
            epochs=taken,
            crash=CrashInjector(),
        )
    sink.close()

    assert _ids(db) == []
    assert checkpoints(db, GROUP) == {}


def test_fencing_rolls_the_whole_batch_back(sink: SqliteSink, db: Path) -> None:
    taken = sink.acquire(GROUP, [P0, P1])
    sink.acquire(GROUP, [P1])  # a newer owner of partition 1

    with pytest.raises(FencedError) as caught:
        commit_batch(
            sink,
            group=GROUP,
            works=[_work(P0, [event("a", 1)]), _work(P1, [event("b", 1)])],
            epochs=taken,
            crash=CrashInjector(),
        )

    assert caught.value.partitions == frozenset({("events", 1)})
    assert _ids(db) == []
    assert checkpoints(db, GROUP) == {}


@pytest.mark.parametrize(
    ("point", "after", "expected"),
    [
        (None, None, CrashInjector(point=None, after_batches=1)),
        ("after-rows", "3", CrashInjector(point="after-rows", after_batches=3)),
        ("after-commit", None, CrashInjector(point="after-commit", after_batches=1)),
        ("sometime", "2", CrashInjector(point=None, after_batches=2)),
        ("", None, CrashInjector(point=None, after_batches=1)),
    ],
)
def test_crash_injector_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    point: str | None,
    after: str | None,
    expected: CrashInjector,
) -> None:
    if point is not None:
        monkeypatch.setenv(CRASH_POINT_ENV, point)
    if after is not None:
        monkeypatch.setenv(CRASH_AFTER_ENV, after)
    assert CrashInjector.from_environment() == expected


@pytest.mark.parametrize("point", ["after-rows", "after-commit"])
def test_crash_injector_kills_at_its_point_of_the_nth_batch(
    monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    injector = CrashInjector(point=point, after_batches=3)

    for batch in range(1, 4):
        injector.at("after-rows")
        injector.at("after-commit")
        assert len(kills) == (1 if batch == 3 else 0), f"batch {batch}"

    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_crash_injector_switched_off_never_kills(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    injector = CrashInjector.from_environment()

    for _ in range(5):
        injector.at("after-rows")
        injector.at("after-commit")

    assert kills == []
