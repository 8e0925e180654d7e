"""Pipelined commits (consumer.engine.loop): batch N commits on the committer thread while the
engine processes batch N+1. A sink whose commit can be held open shows what happens while a
batch is in flight: the next batch is processed meanwhile, a revocation waits for it, a fence
or a refusal found in flight is recovered without losing or repeating a record, a stop
commits it, and the sink is never used by two threads at once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumer import (
    App,
    ConfigError,
    Record,
    Row,
    RowsOrigin,
    RowsRefusedError,
    SinkError,
    SourcePosition,
    Table,
    TopicPartition,
)
from consumer.engine.batch import BadRecordPolicy
from consumer.engine.group import EXIT_OK, EXIT_PARTITIONS_STOPPED, Engine, EngineSettings
from sinks import SqliteSink
from tests.fixtures.apps import EVENTS, event
from tests.fixtures.fake_backend import Assign, Call, FakeBackend, FakeClock, Fetch, Revoke, Step
from tests.fixtures.sqlite_db import checkpoints, table_rows
from tests.unit.test_engine import RecordingDeadLetters

GROUP = "pipeline-group"
TOPIC = "events"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)
HOLD_LIMIT_S = 10.0


class GatedSink(SqliteSink):
    """SQLite whose next commit can be held (`hold_next`, before its transaction begins) until
    `release()`; it refuses any
    batch holding `amount == 666`, and records every use of the sink from a thread other
    than the one inside a transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold_next = False
        self.holding = threading.Event()
        self._released = threading.Event()
        self._in_transaction: int | None = None
        self.violations: list[str] = []
        self.interrupted = False
        self.commit_threads: set[str] = set()

    def release(self) -> None:
        self._released.set()

    def interrupt(self) -> None:
        """As a database cancels the statement: the held call fails."""
        self.interrupted = True
        self._released.set()

    def _check(self, call: str) -> None:
        owner = self._in_transaction
        if owner is not None and owner != threading.get_ident():
            self.violations.append(call)

    def acquire(self, group: str, partitions: Sequence[TopicPartition]) -> dict[Any, int]:
        self._check("acquire")
        return super().acquire(group, partitions)

    def load_checkpoints(self, group: str, partitions: Any = None) -> dict[Any, Any]:
        self._check("load_checkpoints")
        return super().load_checkpoints(group, partitions)

    def begin(self) -> None:
        self._check("begin")
        if self.hold_next:  # held before its transaction starts: SQLite has one writer
            self.hold_next = False
            self.holding.set()
            if not self._released.wait(HOLD_LIMIT_S):
                raise AssertionError("the held commit was never released")
            if self.interrupted:
                raise SinkError("canceling statement due to user request (injected)")
        self._in_transaction = threading.get_ident()
        super().begin()

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        super().write_rows(table, rows, origin)
        if any(row.get("amount") == 666 for row in rows):
            raise RowsRefusedError("check constraint violated (injected)", field="amount")

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        super().write_guarded_rows(table, rows, positions, overwrite_newer=overwrite_newer)
        if any(row.get("amount") == 666 for row in rows):
            raise RowsRefusedError("check constraint violated (injected)", field="amount")

    def commit(self) -> None:
        self.commit_threads.add(threading.current_thread().name)
        super().commit()
        self._in_transaction = None

    def rollback(self) -> None:
        super().rollback()
        self._in_transaction = None


@dataclass
class Run:
    db: Path
    backend: FakeBackend
    sink: GatedSink
    engine: Engine
    seen: list[tuple[int, int]]

    def rows(self) -> list[tuple[int, int]]:
        found = table_rows(self.db, "events", order_by="source_partition, source_offset")
        return [(row["source_partition"], row["source_offset"]) for row in found]

    def checkpoints(self) -> dict[int, int]:
        return {p: o for (_t, p), o in checkpoints(self.db, GROUP).items()}


def _app(seen: list[tuple[int, int]], on_record: Callable[[Record], None]) -> App:
    app = App(name="pipeline", tables=(EVENTS,), decode="json")

    @app.process
    def event_row(record: Record) -> Row:
        seen.append((record.partition, record.offset))
        on_record(record)
        value: Any = record.value
        return Row(
            "events",
            {
                "id": value["id"],
                "amount": value["amount"],
                "source_partition": record.partition,
                "source_offset": record.offset,
            },
        )

    return app


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Run]:
    def build(
        script: Sequence[Step],
        on_record: Callable[[Record], None] = lambda _record: None,
        *,
        bad_records: BadRecordPolicy | None = None,
    ) -> Run:
        db = tmp_path / "pipeline.db"
        clock = FakeClock()
        backend = FakeBackend(script, clock=clock)
        sink = GatedSink(db)
        seen: list[tuple[int, int]] = []
        engine = Engine(
            _app(seen, on_record),
            EngineSettings(
                group=GROUP,
                topics=(TOPIC,),
                batch_max_records=4,
                stop_when_idle_s=1.0,
                bad_records=bad_records or BadRecordPolicy(),
            ),
            backend,
            sink,
            clock=clock.now,
            sleep=clock.sleep,
            dead_letters=RecordingDeadLetters(db) if bad_records else None,
        )
        return Run(db, backend, sink, engine, seen)

    return build


def _append(run: Run, tp: TopicPartition, count: int, amounts: Mapping[int, int] = {}) -> None:
    run.backend.append(tp, *(event(f"{tp.partition}-{i}", amounts.get(i, i)) for i in range(count)))


def test_the_next_batch_is_processed_while_the_one_before_commits(
    make: Callable[..., Run],
) -> None:
    checked: list[dict[int, int]] = []

    def at_record(record: Record) -> None:
        if record.offset == 4:  # the first record of batch 2, while batch 1's commit is held
            assert run.sink.holding.wait(HOLD_LIMIT_S)
            checked.append(run.checkpoints())
            run.sink.release()

    run = make([Assign([P0])], at_record)
    run.sink.hold_next = True
    _append(run, P0, 10)

    assert run.engine.run() == EXIT_OK

    assert checked == [{}], "batch 2 was processed while batch 1 was not yet committed"
    assert run.rows() == [(0, i) for i in range(10)]
    assert run.seen == [(0, i) for i in range(10)], "each record processed once"
    assert run.checkpoints() == {0: 10}
    assert run.sink.commit_threads == {"offsetkeeper-commit_0"}
    assert run.sink.violations == []


def test_a_revocation_waits_for_the_batch_in_flight(make: Callable[..., Run]) -> None:
    at_revocation: list[dict[int, int]] = []
    run = make(
        [
            Assign([P0, P1]),
            Fetch(),
            Call(lambda: threading.Timer(0.3, run.sink.release).start()),
            Revoke([P1]),
            Call(lambda: at_revocation.append(run.checkpoints())),
        ]
    )
    run.sink.hold_next = True
    _append(run, P0, 6)
    _append(run, P1, 2)

    assert run.engine.run() == EXIT_OK

    # The first batch (held for 0.3 s) held P1's two records: committed before P1 went.
    assert at_revocation
    assert at_revocation[0].get(1) == 2
    assert run.rows() == [*((0, i) for i in range(6)), (1, 0), (1, 1)]
    assert run.checkpoints() == {0: 6, 1: 2}
    assert run.sink.violations == []


def test_a_batch_fenced_in_flight_drops_the_partition_and_the_batch_after_it(
    make: Callable[..., Run],
) -> None:
    def at_record(record: Record) -> None:
        if (record.partition, record.offset) == (0, 2):  # batch 2, batch 1 held
            assert run.sink.holding.wait(HOLD_LIMIT_S)
            rival = SqliteSink(run.db)
            rival.open([EVENTS])
            assert rival.acquire(GROUP, [P1]) == {P1: 2}
            rival.close()
            run.sink.release()

    run = make([Assign([P0, P1])], at_record)
    run.sink.hold_next = True
    _append(run, P0, 6)
    _append(run, P1, 6)

    assert run.engine.run() == EXIT_OK

    # Batch 1 (p0 0-1, p1 0-1) was fenced for P1: P0's part committed again without it; P1's
    # part of batch 2, processed meanwhile, was dropped with the partition.
    assert run.rows() == [(0, i) for i in range(6)]
    assert run.checkpoints() == {0: 6}
    assert run.backend.pause_calls == [[P1]]
    assert run.sink.violations == []


@pytest.mark.parametrize("action", ["dead-letter", "stop"])
def test_a_batch_refused_in_flight_is_isolated_and_the_next_batch_follows_it(
    make: Callable[..., Run], action: str
) -> None:
    run = make([Assign([P0])], bad_records=BadRecordPolicy(action=action))  # type: ignore[arg-type]
    _append(run, P0, 12, amounts={2: 666})

    code = run.engine.run()

    if action == "dead-letter":
        assert code == EXIT_OK
        assert run.rows() == [(0, i) for i in range(12) if i != 2]
        assert run.checkpoints() == {0: 12}
    else:
        # Batch 2 (offsets 4-7) was processed while batch 1 was in flight and is dropped:
        # the partition stopped at offset 2.
        assert code == EXIT_PARTITIONS_STOPPED
        assert run.rows() == [(0, 0), (0, 1)]
        assert run.checkpoints() == {0: 2}
    assert run.sink.violations == []


def test_a_stop_request_commits_the_batch_in_flight(make: Callable[..., Run]) -> None:
    def at_record(record: Record) -> None:
        if record.offset == 5:
            run.engine.request_stop()

    run = make([Assign([P0])], at_record)
    _append(run, P0, 20)

    assert run.engine.run() == EXIT_OK

    assert run.rows() == [(0, i) for i in range(8)], "both processed batches committed"
    assert run.checkpoints() == {0: 8}


def test_a_failing_driver_cuts_the_batch_in_flight_short_and_it_is_not_retried(
    make: Callable[..., Run],
) -> None:
    def at_record(record: Record) -> None:
        if record.offset == 4:  # batch 2 while batch 1 is held: a failure of the setup
            assert run.sink.holding.wait(HOLD_LIMIT_S)
            raise ConfigError("the app's configuration broke (injected)")

    run = make([Assign([P0])], at_record)
    run.sink.hold_next = True
    _append(run, P0, 10)

    with pytest.raises(ConfigError):
        run.engine.run()

    assert run.sink.interrupted, "the batch in flight was interrupted, not waited out"
    assert run.checkpoints() == {}
    assert run.rows() == []


class _Aborted(BaseException):
    """What the shutdown's abort is: raised in the main thread wherever it waits."""


def test_an_abort_while_waiting_for_the_batch_in_flight_interrupts_it(
    make: Callable[..., Run],
) -> None:
    main = threading.get_ident()

    def abort(_signum: int, _frame: object) -> None:
        raise _Aborted

    def at_record(record: Record) -> None:
        if record.offset == 4:  # batch 2; the engine will wait for the held batch 1 next
            assert run.sink.holding.wait(HOLD_LIMIT_S)
            threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
            run.engine.request_stop()

    previous = signal.signal(signal.SIGUSR1, abort)
    try:
        run = make([Assign([P0])], at_record)
        run.sink.hold_next = True
        _append(run, P0, 10)
        began = time.monotonic()
        with pytest.raises(_Aborted):
            run.engine.run()
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert time.monotonic() - began < HOLD_LIMIT_S / 2, "the abort waited the batch out"
    assert run.sink.interrupted
    assert run.checkpoints() == {}
