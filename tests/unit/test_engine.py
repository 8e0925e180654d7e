"""consumer.engine.group with the in-memory FakeBackend and a real SqliteSink on tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import (
    App,
    Checkpoint,
    CheckpointError,
    ConfigError,
    DecodeError,
    FencedError,
    InvalidRecordError,
    KafkaError,
    KeyedState,
    Record,
    RecordsLostError,
    Row,
    RowsOrigin,
    RowsRefusedError,
    SinkError,
    SinkFullError,
    SourcePosition,
    StateSchema,
    Table,
    TopicPartition,
)
from consumer.engine.batch import BadRecordPolicy, DeadLetter
from consumer.engine.data_loss import DataLossPolicy
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.group import (
    EXIT_OK,
    EXIT_PARTITIONS_STOPPED,
    Engine,
    EngineSettings,
    ResetPolicy,
)
from sinks import SqliteSink
from tests.fixtures.apps import EVENTS, event, events_app
from tests.fixtures.fake_backend import (
    Assign,
    Call,
    Deliver,
    FakeBackend,
    FakeClock,
    Fetch,
    Idle,
    Lose,
    Revoke,
    Step,
)
from tests.fixtures.flaky_sink import FlakySink
from tests.fixtures.sqlite_db import checkpoints, epochs, table_rows

GROUP = "test-group"
TOPIC = "events"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)
P2 = TopicPartition(TOPIC, 2)


@dataclass
class Harness:
    """One engine over a fake backend and a real SQLite file, plus what it saw."""

    db: Path
    clock: FakeClock
    backend: FakeBackend
    sink: SqliteSink
    engine: Engine
    seen: list[tuple[int, int]] = field(default_factory=list)

    def run(self) -> int:
        return self.engine.run()

    def rows(self) -> list[dict[str, Any]]:
        return table_rows(self.db, "events", order_by="source_partition, source_offset")

    def checkpoints(self) -> dict[int, int]:
        return {p: offset for (t, p), offset in checkpoints(self.db, GROUP).items() if t == TOPIC}


Make = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    """Build a Harness: `make(script, reset_policy=..., batch_max_records=..., ...)`."""

    def build(
        script: Sequence[Step] = (),
        *,
        reset_policy: ResetPolicy = "earliest",
        batch_max_records: int = 100,
        stop_when_idle_s: float | None = 1.0,
        sink: SqliteSink | None = None,
        on_commit_advisory: Callable[[Mapping[TopicPartition, int]], None] | None = None,
        sink_retry_deadline_s: float = 120.0,
        bad_records: BadRecordPolicy | None = None,
        dead_letters: DeadLetterWriter | None = None,
        on_data_loss: DataLossPolicy = "stop",
        app: App | None = None,
    ) -> Harness:
        db = tmp_path / "engine.db"
        clock = FakeClock()
        backend = FakeBackend(script, clock=clock, on_commit_advisory=on_commit_advisory)
        seen: list[tuple[int, int]] = []
        real_sink = sink or SqliteSink(db)
        engine = Engine(
            app or events_app(seen),
            EngineSettings(
                group=GROUP,
                topics=(TOPIC,),
                reset_policy=reset_policy,
                batch_max_records=batch_max_records,
                poll_timeout_s=0.5,
                stop_when_idle_s=stop_when_idle_s,
                sink_retry_deadline_s=sink_retry_deadline_s,
                bad_records=bad_records or BadRecordPolicy(),
                on_data_loss=on_data_loss,
            ),
            backend,
            real_sink,
            clock=clock.now,
            sleep=clock.sleep,
            dead_letters=dead_letters,
        )
        return Harness(db, clock, backend, real_sink, engine, seen)

    return build


def _row(event_id: str, amount: int, partition: int, offset: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "amount": amount,
        "source_partition": partition,
        "source_offset": offset,
    }


def _store_checkpoints(db: Path, next_offsets: Mapping[TopicPartition, int]) -> None:
    """What an earlier run of the group left in the sink."""
    earlier = SqliteSink(db)
    earlier.open([EVENTS])
    taken = earlier.acquire(GROUP, list(next_offsets))
    earlier.begin()
    earlier.save_checkpoints(
        GROUP,
        [
            Checkpoint(GROUP, tp.topic, tp.partition, offset, datetime.now(tz=UTC))
            for tp, offset in next_offsets.items()
        ],
        taken,
    )
    earlier.commit()
    earlier.close()


def _events(log_events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in log_events if e["event"] == name]


# -- start positions ------------------------------------------------------------------------------


def test_fresh_partitions_start_by_the_reset_policy_and_everything_commits(make: Make) -> None:
    h = make([Assign([P0, P1])])
    h.backend.append(P0, event("a", 1), event("b", 2), event("c", 3))
    h.backend.append(P1, event("x", 10), event("y", 20))

    assert h.run() == EXIT_OK

    assert h.backend.subscribed == [TOPIC]
    # The policy is resolved to the exact offset (the log start) at assignment.
    assert h.backend.start_positions == [{P0: 0, P1: 0}]
    assert h.rows() == [
        _row("a", 1, 0, 0),
        _row("b", 2, 0, 1),
        _row("c", 3, 0, 2),
        _row("x", 10, 1, 0),
        _row("y", 20, 1, 1),
    ]
    assert h.checkpoints() == {0: 3, 1: 2}
    assert sorted(h.seen) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], "each record once"
    assert h.engine.records_committed == 5
    assert h.backend.closed


def test_partitions_start_at_the_stored_checkpoint(make: Make) -> None:
    h = make([Assign([P0, P1])])
    _store_checkpoints(h.db, {P0: 2})
    h.backend.append(P0, *(event(f"p0-{i}", i) for i in range(5)))
    h.backend.append(P1, event("p1-0", 0))

    assert h.run() == EXIT_OK

    assert h.backend.start_positions == [{P0: 2, P1: 0}]
    assert h.seen == [(0, 2), (0, 3), (0, 4), (1, 0)]
    assert h.rows() == [
        _row("p0-2", 2, 0, 2),
        _row("p0-3", 3, 0, 3),
        _row("p0-4", 4, 0, 4),
        _row("p1-0", 0, 1, 0),
    ]
    assert h.checkpoints() == {0: 5, 1: 1}


def test_reset_policy_latest_skips_what_was_there_before_assignment(make: Make) -> None:
    h = make(
        [
            Assign([P0]),
            Call(lambda: h.backend.append(P0, event("new-1", 1), event("new-2", 2))),
        ],
        reset_policy="latest",
    )
    h.backend.append(P0, event("old-1", 1), event("old-2", 2))

    assert h.run() == EXIT_OK

    # "latest" is resolved to the log end at assignment: 2 records were there before.
    assert h.backend.start_positions == [{P0: 2}]
    assert h.rows() == [_row("new-1", 1, 0, 2), _row("new-2", 2, 0, 3)]
    assert h.checkpoints() == {0: 4}


def test_reset_policy_latest_with_nothing_new_still_stops_when_idle(make: Make) -> None:
    # A partition started at the log end with no new record is caught up: run() must end.
    h = make([Assign([P0])], reset_policy="latest")
    h.backend.append(P0, event("old-1", 1), event("old-2", 2))

    assert h.run() == EXIT_OK

    assert h.rows() == []
    assert h.checkpoints() == {}


def test_reset_policy_error_refuses_a_partition_without_checkpoint(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])], reset_policy="error")
    _store_checkpoints(h.db, {P0: 1})
    h.backend.append(P0, event("a", 1), event("b", 2))
    h.backend.append(P1, event("x", 1))

    with pytest.raises(CheckpointError) as caught:
        h.run()

    error = caught.value
    assert error.context["topic"] == TOPIC
    assert error.context["partition"] == 1
    assert error.context["group"] == GROUP
    assert "partition=1" in str(error)
    assert "reset policy is 'error'" in str(error)
    assert h.seen == [], "nothing may be processed"
    assert h.rows() == []
    assert h.checkpoints() == {0: 1}
    assert h.backend.closed, "the backend is closed on the way out"
    assert _events(log_events, "consumer_stopped"), "the stop is logged even on failure"


def test_reset_policy_error_is_fine_when_every_partition_has_a_checkpoint(make: Make) -> None:
    h = make([Assign([P0])], reset_policy="error")
    _store_checkpoints(h.db, {P0: 1})
    h.backend.append(P0, event("a", 1), event("b", 2))

    assert h.run() == EXIT_OK
    assert h.backend.start_positions == [{P0: 1}]
    assert h.rows() == [_row("b", 2, 0, 1)]


def test_assignment_bumps_the_partition_epochs(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])])
    _store_checkpoints(h.db, {P0: 0})  # took epoch 1 of partition 0

    assert h.run() == EXIT_OK

    assert epochs(h.db, GROUP) == {(TOPIC, 0): 2, (TOPIC, 1): 1}
    assigned = _events(log_events, "partitions_assigned")
    assert assigned == [
        {
            "event": "partitions_assigned",
            "log_level": "info",
            "partitions": {"events[0]": 0, "events[1]": 0},
            "epochs": {"events[0]": 2, "events[1]": 1},
        }
    ]


# -- batches and commits ----------------------------------------------------------------------


def test_each_batch_commits_rows_and_checkpoints_before_the_advisory_commit(make: Make) -> None:
    at_advisory: list[tuple[dict[TopicPartition, int], dict[int, int], int]] = []

    def probe(next_offsets: Mapping[TopicPartition, int]) -> None:
        # What any other reader of the sink sees when Kafka is told: it must already be durable.
        at_advisory.append((dict(next_offsets), h.checkpoints(), len(h.rows())))

    h = make([Assign([P0, P1])], batch_max_records=3, on_commit_advisory=probe)
    h.backend.append(P0, *(event(f"a{i}", i) for i in range(4)))
    h.backend.append(P1, *(event(f"b{i}", i) for i in range(3)))

    assert h.run() == EXIT_OK

    # Fetches interleave the partitions: (p0 0, p1 0, p0 1), (p0 2, p1 1, p0 3), (p1 2).
    assert h.backend.advisory_commits == [{P0: 2, P1: 1}, {P0: 4, P1: 2}, {P1: 3}]
    assert at_advisory == [
        ({P0: 2, P1: 1}, {0: 2, 1: 1}, 3),
        ({P0: 4, P1: 2}, {0: 4, 1: 2}, 6),
        ({P1: 3}, {0: 4, 1: 3}, 7),
    ]
    assert h.engine.batches_committed == 3
    assert h.engine.records_committed == 7
    assert h.rows() == [
        *(_row(f"a{i}", i, 0, i) for i in range(4)),
        *(_row(f"b{i}", i, 1, i) for i in range(3)),
    ]


def test_the_last_row_per_key_in_a_batch_wins(make: Make) -> None:
    h = make([Assign([P0])])
    h.backend.append(P0, event("a", 1), event("b", 1), event("a", 2), event("a", 3))

    assert h.run() == EXIT_OK

    assert table_rows(h.db, "events", order_by="id") == [_row("a", 3, 0, 3), _row("b", 1, 0, 1)]
    assert h.checkpoints() == {0: 4}


def test_a_later_batch_overwrites_an_earlier_row_with_the_same_key(make: Make) -> None:
    h = make([Assign([P0, P1])], batch_max_records=2)
    h.backend.append(P0, event("k", 1), event("k", 2))
    h.backend.append(P1, event("k", 100))

    assert h.run() == EXIT_OK

    # Batches: (p0 0, p1 0) then (p0 1): the row from p0 offset 1 is the last write of "k".
    assert table_rows(h.db, "events", order_by="id") == [_row("k", 2, 0, 1)]
    assert h.checkpoints() == {0: 2, 1: 1}


def test_records_below_the_stored_position_are_never_processed_twice(make: Make) -> None:
    h = make([Assign([P0])])
    _store_checkpoints(h.db, {P0: 3})
    records = h.backend.append(P0, *(event(f"e{i}", i) for i in range(6)))
    # A fetch that raced the seek hands out the whole log from offset 0 ...
    h.backend.then(Deliver(records))
    # ... and afterwards the position-based fetch returns 3..5 again.

    assert h.run() == EXIT_OK

    assert h.seen == [(0, 3), (0, 4), (0, 5)]
    assert h.rows() == [_row("e3", 3, 0, 3), _row("e4", 4, 0, 4), _row("e5", 5, 0, 5)]
    assert h.checkpoints() == {0: 6}
    assert h.engine.records_committed == 3


def test_a_redelivered_batch_after_commit_is_ignored(make: Make) -> None:
    h = make([Assign([P0]), Fetch()])
    records = h.backend.append(P0, event("a", 1), event("b", 2))
    h.backend.then(Deliver(records))

    assert h.run() == EXIT_OK

    assert h.seen == [(0, 0), (0, 1)]
    assert h.engine.batches_committed == 1
    assert h.backend.advisory_commits == [{P0: 2}]


# -- bad records ------------------------------------------------------------------------------


def test_a_bad_record_stops_only_its_partition(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])], batch_max_records=4)
    h.backend.append(P0, event("a", 1), event("b", 2))
    h.backend.append(P0, b'{"id": "broken", ')  # offset 2: truncated JSON
    late = h.backend.append(P0, event("c", 3))  # offset 3: after the bad record
    h.backend.append(P1, *(event(f"x{i}", i) for i in range(6)))
    # Even if a fetch hands out the stopped partition's later records, they are not processed.
    h.backend.append(P1, event("x6", 6))
    h.backend.then(Fetch(), Fetch(), Deliver([*late, *h.backend.records(P1)[4:]]))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.rows() == [
        _row("a", 1, 0, 0),
        _row("b", 2, 0, 1),
        *(_row(f"x{i}", i, 1, i) for i in range(7)),
    ]
    assert h.checkpoints() == {0: 2, 1: 7}, "partition 0 resumes at the bad record"
    assert (0, 3) not in h.seen
    assert [p for p, _o in h.seen].count(0) == 2
    assert h.backend.pause_calls == [[P0]]
    assert set(h.engine.stopped_partitions) == {P0}
    assert isinstance(h.engine.stopped_partitions[P0], DecodeError)

    stopped = _events(log_events, "partition_stopped")
    assert len(stopped) == 1
    assert stopped[0]["log_level"] == "error"
    assert stopped[0]["topic"] == TOPIC
    assert stopped[0]["partition"] == 0
    assert stopped[0]["offset"] == 2
    assert stopped[0]["committed_up_to"] == 2
    assert stopped[0]["error_type"] == "DecodeError"
    assert "not valid JSON" in stopped[0]["error"]
    final = _events(log_events, "consumer_stopped")[-1]
    assert final["stopped_partitions"] == ["events[0]"]


def test_an_invalid_record_is_logged_with_its_field(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])])
    h.backend.append(P0, event("a", 1), {"fail": "invalid"}, event("c", 3))
    h.backend.append(P1, event("x", 1))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.rows() == [_row("a", 1, 0, 0), _row("x", 1, 1, 0)]
    assert h.checkpoints() == {0: 1, 1: 1}
    error = h.engine.stopped_partitions[P0]
    assert isinstance(error, InvalidRecordError)
    assert (error.topic, error.partition, error.offset, error.field) == (TOPIC, 0, 1, "amount")
    [stopped] = _events(log_events, "partition_stopped")
    assert stopped["field"] == "amount"
    assert stopped["error_type"] == "InvalidRecordError"
    assert stopped["offset"] == 1


def test_a_processor_bug_stops_the_partition_as_a_record_error(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0])])
    h.backend.append(P0, event("a", 1), {"fail": "crash"})

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.rows() == [_row("a", 1, 0, 0)]
    assert h.checkpoints() == {0: 1}
    [stopped] = _events(log_events, "partition_stopped")
    assert stopped["error_type"] == "RecordError"
    assert "ZeroDivisionError" in stopped["error"]
    assert stopped["offset"] == 1


def test_a_bad_first_record_commits_nothing_for_its_partition(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])])
    h.backend.append(P0, b"not json", event("b", 2))
    h.backend.append(P1, event("x", 1))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.rows() == [_row("x", 1, 1, 0)]
    assert h.checkpoints() == {1: 1}, "no checkpoint: a restart starts at the bad record again"
    assert h.seen == [(1, 0)]
    assert h.backend.advisory_commits == [{P1: 1}]
    [stopped] = _events(log_events, "partition_stopped")
    assert stopped["offset"] == 0


def test_a_restart_after_a_bad_record_stops_at_it_again(make: Make) -> None:
    first = make([Assign([P0])])
    first.backend.append(P0, event("a", 1), b"{", event("c", 3))
    assert first.run() == EXIT_PARTITIONS_STOPPED

    again = make([Assign([P0])])
    again.backend.append(P0, event("a", 1), b"{", event("c", 3))
    assert again.run() == EXIT_PARTITIONS_STOPPED

    assert again.backend.start_positions == [{P0: 1}]
    assert again.seen == [], "the committed record is not processed again"
    assert again.rows() == [_row("a", 1, 0, 0)]
    assert again.checkpoints() == {0: 1}


# -- rebalances -------------------------------------------------------------------------------


def test_revoked_partitions_are_forgotten_and_their_later_records_ignored(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1]), Fetch(per_partition=2), Revoke([P1])])
    h.backend.append(P0, *(event(f"a{i}", i) for i in range(4)))
    h.backend.append(P1, *(event(f"b{i}", i) for i in range(4)))
    # A stale fetch after the revocation still carries partition 1's next records.
    h.backend.then(Deliver(h.backend.records(P1)[2:] + h.backend.records(P0)[2:3]))

    assert h.run() == EXIT_OK

    assert h.rows() == [
        *(_row(f"a{i}", i, 0, i) for i in range(4)),
        _row("b0", 0, 1, 0),
        _row("b1", 1, 1, 1),
    ]
    assert h.checkpoints() == {0: 4, 1: 2}
    assert all(not (p == 1 and o >= 2) for p, o in h.seen)
    assert all(P1 not in c for c in h.backend.advisory_commits[1:])
    assert _events(log_events, "partitions_revoked")[0]["partitions"] == ["events[1]"]


def test_a_reassigned_partition_resumes_at_its_checkpoint_with_a_new_epoch(make: Make) -> None:
    h = make([Assign([P0]), Fetch(per_partition=2), Revoke([P0]), Idle(), Assign([P0])])
    h.backend.append(P0, *(event(f"a{i}", i) for i in range(5)))

    assert h.run() == EXIT_OK

    assert h.backend.start_positions == [{P0: 0}, {P0: 2}]
    assert h.seen == [(0, i) for i in range(5)]
    assert h.rows() == [_row(f"a{i}", i, 0, i) for i in range(5)]
    assert epochs(h.db, GROUP) == {(TOPIC, 0): 2}


def test_lost_partitions_are_dropped_without_commit(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1]), Fetch(per_partition=1), Lose([P0])])
    h.backend.append(P0, event("a0", 0), event("a1", 1))
    h.backend.append(P1, event("b0", 0), event("b1", 1))
    h.backend.then(Deliver(h.backend.records(P0)[1:]))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a0", 0, 0, 0), _row("b0", 0, 1, 0), _row("b1", 1, 1, 1)]
    assert h.checkpoints() == {0: 1, 1: 2}
    assert _events(log_events, "partitions_lost")[0]["partitions"] == ["events[0]"]


# -- fencing ----------------------------------------------------------------------------------


def test_a_fenced_partition_is_dropped_while_the_others_commit(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    def newer_owner_takes_p1() -> None:
        rival = SqliteSink(h.db)
        rival.open([EVENTS])
        assert rival.acquire(GROUP, [P1]) == {P1: 2}
        rival.close()

    h = make(
        [
            Assign([P0, P1, P2]),
            Fetch(per_partition=2),
            Idle(),  # the first batch settles before the rival comes
            Call(newer_owner_takes_p1),
            Fetch(per_partition=2),
        ]
    )
    for tp, prefix in ((P0, "a"), (P1, "b"), (P2, "c")):
        h.backend.append(tp, *(event(f"{prefix}{i}", i) for i in range(5)))

    assert h.run() == EXIT_OK

    assert h.rows() == [
        *(_row(f"a{i}", i, 0, i) for i in range(5)),
        _row("b0", 0, 1, 0),
        _row("b1", 1, 1, 1),
        *(_row(f"c{i}", i, 2, i) for i in range(5)),
    ]
    assert h.checkpoints() == {0: 5, 1: 2, 2: 5}
    assert epochs(h.db, GROUP) == {(TOPIC, 0): 1, (TOPIC, 1): 2, (TOPIC, 2): 1}
    assert h.backend.pause_calls == [[P1]]
    assert h.backend.advisory_commits == [
        {P0: 2, P1: 2, P2: 2},
        {P0: 4, P2: 4},
        {P0: 5, P2: 5},
    ]
    fenced = _events(log_events, "partitions_fenced")
    assert len(fenced) == 1
    assert fenced[0]["partitions"] == ["events[1]"]
    assert not _events(log_events, "sink_retry"), "fencing is final, never retried"
    assert P1 not in h.engine.stopped_partitions


def test_when_every_partition_of_a_batch_is_fenced_nothing_commits(make: Make) -> None:
    def newer_owner_takes_all() -> None:
        rival = SqliteSink(h.db)
        rival.open([EVENTS])
        rival.acquire(GROUP, [P0, P1])
        rival.close()

    h = make([Assign([P0, P1]), Call(newer_owner_takes_all), Fetch()])
    h.backend.append(P0, event("a", 1))
    h.backend.append(P1, event("b", 1))

    assert h.run() == EXIT_OK

    assert h.rows() == []
    assert h.checkpoints() == {}
    assert h.backend.advisory_commits == []
    assert h.engine.batches_committed == 0
    assert sorted(tp for call in h.backend.pause_calls for tp in call) == [P0, P1]


# -- sink failures and the advisory commit ---------------------------------------------------------


def test_a_transient_sink_failure_is_retried_and_the_advisory_follows_the_commit(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    flaky = FlakySink(tmp_path / "engine.db", failures=2)
    h = make([Assign([P0])], sink=flaky)
    h.backend.append(P0, event("a", 1), event("b", 2))

    assert h.run() == EXIT_OK

    assert flaky.commit_attempts == 3
    assert [e["attempt"] for e in _events(log_events, "sink_retry")] == [1, 2]
    assert h.backend.advisory_commits == [{P0: 2}]
    assert h.rows() == [_row("a", 1, 0, 0), _row("b", 2, 0, 1)]
    assert h.checkpoints() == {0: 2}


def test_a_sink_that_keeps_failing_ends_the_run_without_an_advisory_commit(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    flaky = FlakySink(tmp_path / "engine.db", failures=1000)
    h = make([Assign([P0])], sink=flaky, sink_retry_deadline_s=3.0)
    h.backend.append(P0, event("a", 1))

    with pytest.raises(SinkError, match="disk full"):
        h.run()

    assert h.backend.advisory_commits == []
    assert h.rows() == []
    assert h.checkpoints() == {}
    assert flaky.commit_attempts >= 2
    assert _events(log_events, "sink_gave_up")[0]["attempts"] == flaky.commit_attempts
    assert h.backend.closed


def test_a_full_disk_is_retried_until_space_returns_and_the_batch_commits_once(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    full = FlakySink(tmp_path / "engine.db", failures=3, disk_full=True)
    h = make([Assign([P0])], sink=full)
    h.backend.append(P0, event("a", 1), event("b", 2))

    assert h.run() == EXIT_OK

    retries = _events(log_events, "sink_retry")
    assert [(e["attempt"], e["error_type"]) for e in retries] == [
        (1, "SinkFullError"),
        (2, "SinkFullError"),
        (3, "SinkFullError"),
    ]
    assert all(e["error"].startswith("disk full: ") for e in retries)
    assert all(f"sqlite:///{tmp_path / 'engine.db'}" in e["error"] for e in retries)
    assert h.rows() == [_row("a", 1, 0, 0), _row("b", 2, 0, 1)]
    assert h.checkpoints() == {0: 2}


def test_a_disk_that_stays_full_past_the_deadline_ends_the_run_with_the_full_error(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    full = FlakySink(tmp_path / "engine.db", failures=1000, disk_full=True)
    h = make([Assign([P0])], sink=full, sink_retry_deadline_s=3.0)
    h.backend.append(P0, event("a", 1))

    with pytest.raises(SinkFullError, match=r"^disk full: commit failed"):
        h.run()

    [gave_up] = _events(log_events, "sink_gave_up")
    assert gave_up["error_type"] == "SinkFullError"
    assert h.rows() == []
    assert h.checkpoints() == {}


def test_fenced_error_class_is_a_sink_error() -> None:
    # The engine relies on FencedError being caught before the generic SinkError retry.
    assert issubclass(FencedError, SinkError)


# -- stopping ---------------------------------------------------------------------------------


def test_stop_when_idle_waits_for_the_first_assignment(make: Make) -> None:
    h = make([Idle(), Idle(), Idle(), Idle(), Idle(), Assign([P0])])
    h.backend.append(P0, event("a", 1))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a", 1, 0, 0)]


def test_stop_when_idle_waits_while_a_partition_lags(make: Make) -> None:
    h = make([Assign([P0]), Fetch(per_partition=1), *(Idle() for _ in range(6))])
    h.backend.append(P0, event("a", 1), event("b", 2), event("c", 3))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a", 1, 0, 0), _row("b", 2, 0, 1), _row("c", 3, 0, 2)]
    assert h.checkpoints() == {0: 3}


def test_stop_when_idle_ends_run_once_caught_up(
    make: Make, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0, P1])], stop_when_idle_s=2.0)
    h.backend.append(P0, event("a", 1))
    h.backend.set_log_start(P1, 40)  # an empty partition whose log starts later

    started = h.clock.now()
    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a", 1, 0, 0)]
    assert 2.0 <= h.clock.now() - started <= 3.0, "stopped about stop_when_idle_s after the data"
    [idle_stop] = _events(log_events, "consumer_idle_stop")
    assert idle_stop["idle_s"] == 2.0
    [stopped] = _events(log_events, "consumer_stopped")
    assert stopped["records"] == 1
    assert stopped["batches"] == 1
    assert stopped["stopped_partitions"] == []


def test_request_stop_finishes_the_batch_in_hand(make: Make) -> None:
    def stop() -> None:
        h.engine.request_stop()  # from inside a poll, as a signal handler would

    h = make(
        [Assign([P0]), Fetch(per_partition=1), Call(stop), Fetch(per_partition=1)],
        stop_when_idle_s=None,
    )
    h.backend.append(P0, event("a", 1), event("b", 2), event("c", 3))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a", 1, 0, 0), _row("b", 2, 0, 1)]
    assert h.checkpoints() == {0: 2}
    assert h.backend.closed


def test_an_engine_with_a_json_column_table_writes_decoded_values(tmp_path: Path) -> None:
    docs = Table("docs", columns={"id": "text", "body": "json"}, key=("id",))
    app = App(name="docs", tables=(docs,))
    app.process(lambda record: Row("docs", {"id": record.value["id"], "body": record.value}))
    clock = FakeClock()
    backend = FakeBackend([Assign([P0])], clock=clock)
    backend.append(P0, {"id": "d1", "nested": {"x": [1, 2]}})
    engine = Engine(
        app,
        EngineSettings(group=GROUP, topics=(TOPIC,), stop_when_idle_s=1.0),
        backend,
        SqliteSink(tmp_path / "docs.db"),
        clock=clock.now,
        sleep=clock.sleep,
    )

    assert engine.run() == EXIT_OK

    assert table_rows(tmp_path / "docs.db", "docs", order_by="id") == [
        {"id": "d1", "body": '{"id": "d1", "nested": {"x": [1, 2]}}'}
    ]


# -- bad records: retries, dead letters -----------------------------------------------------------


@dataclass
class RecordingDeadLetters:
    """A DeadLetterWriter that keeps the letters, and what the sink had committed when each
    arrived (so a test can see that letters are written before the offset past them)."""

    db: Path
    letters: list[DeadLetter] = field(default_factory=list)
    checkpoints_at_write: list[dict[int, int]] = field(default_factory=list)
    failures_left: int = 0
    prepared: list[str] = field(default_factory=list)

    def topic_for(self, source_topic: str) -> str:
        return f"{GROUP}.dlq"

    def prepare(self, source_topics: Sequence[str]) -> None:
        self.prepared.extend(source_topics)

    def write(self, letters: Sequence[DeadLetter]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise KafkaError("broker did not acknowledge (injected)", retriable=True)
        self.checkpoints_at_write.append(
            {p: o for (t, p), o in checkpoints(self.db, GROUP).items() if t == TOPIC}
            if self.db.exists()
            else {}
        )
        self.letters.extend(letters)

    def close(self) -> None:
        pass


DEAD_LETTER = BadRecordPolicy(action="dead-letter", retries=2, backoff_s=0.5, max_backoff_s=0.8)


def test_dead_lettered_records_are_written_before_the_offset_past_them_commits(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db")
    h = make([Assign([P0, P1])], bad_records=DEAD_LETTER, dead_letters=letters)
    h.backend.append(P0, event("a", 1), b'{"id": "broken", ', event("c", 3))
    h.backend.append(P0, {"fail": "crash"}, event("e", 5))
    h.backend.append(P1, event("x", 1), {"fail": "invalid"})

    assert h.run() == EXIT_OK

    assert h.rows() == [
        _row("a", 1, 0, 0),
        _row("c", 3, 0, 2),
        _row("e", 5, 0, 4),
        _row("x", 1, 1, 0),
    ]
    assert h.checkpoints() == {0: 5, 1: 2}, "the partitions went on past their bad records"
    assert [(d.record.partition, d.record.offset) for d in letters.letters] == [
        (0, 1),
        (0, 3),
        (1, 1),
    ]
    assert [type(d.error).__name__ for d in letters.letters] == [
        "DecodeError",
        "RecordError",
        "InvalidRecordError",
    ]
    assert all(d.attempts == 3 for d in letters.letters), "first attempt plus two retries"
    assert letters.letters[0].record.value == b'{"id": "broken", ', "original bytes untouched"
    assert letters.checkpoints_at_write == [{}], "written before the batch's commit"
    assert letters.prepared == [TOPIC]
    # Each bad record paused 0.5 then 0.8 (capped) seconds between its three attempts.
    assert h.clock.sleeps.count(0.5) >= 3
    assert h.clock.sleeps.count(0.8) >= 3
    assert len(_events(log_events, "record_retry")) == 6
    assert not h.engine.stopped_partitions


def test_a_record_that_succeeds_on_a_retry_is_not_a_dead_letter(make: Make, tmp_path: Path) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db")
    attempts: dict[int, int] = {}
    h = make([Assign([P0])], bad_records=DEAD_LETTER, dead_letters=letters)
    app_processor = h.engine._app.processor
    assert app_processor is not None

    def flaky(record: Record) -> Any:
        attempts[record.offset] = attempts.get(record.offset, 0) + 1
        if record.offset == 1 and attempts[1] < 3:
            raise ConnectionError("downstream lookup timed out")
        return app_processor(record)  # type: ignore[call-arg]

    h.engine._app.processor = flaky
    h.backend.append(P0, event("a", 1), event("b", 2))

    assert h.run() == EXIT_OK
    assert h.rows() == [_row("a", 1, 0, 0), _row("b", 2, 0, 1)]
    assert attempts == {0: 1, 1: 3}
    assert letters.letters == []


def test_under_the_stop_policy_retries_come_first_then_the_partition_stops(make: Make) -> None:
    h = make([Assign([P0])], bad_records=BadRecordPolicy(retries=1, backoff_s=0.25))
    h.backend.append(P0, event("a", 1), {"fail": "invalid"}, event("c", 3))

    assert h.run() == EXIT_PARTITIONS_STOPPED
    assert h.rows() == [_row("a", 1, 0, 0)]
    assert h.checkpoints() == {0: 1}
    assert [o for p, o in h.seen if o == 1] == [1, 1], "tried twice"
    assert 0.25 in h.clock.sleeps


def test_dead_letters_the_broker_does_not_acknowledge_are_retried_and_nothing_commits_before(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db", failures_left=2)
    h = make([Assign([P0])], bad_records=DEAD_LETTER, dead_letters=letters)
    h.backend.append(P0, event("a", 1), {"fail": "invalid"})

    assert h.run() == EXIT_OK
    assert [e["attempt"] for e in _events(log_events, "dead_letters_retry")] == [1, 2]
    assert letters.checkpoints_at_write == [{}]
    assert h.checkpoints() == {0: 2}


def test_dead_letters_that_never_get_through_end_the_run_with_nothing_committed(
    make: Make, tmp_path: Path
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db", failures_left=10_000)
    h = make(
        [Assign([P0])],
        bad_records=DEAD_LETTER,
        dead_letters=letters,
        sink_retry_deadline_s=5.0,
    )
    h.backend.append(P0, event("a", 1), {"fail": "invalid"})

    with pytest.raises(KafkaError, match="did not acknowledge"):
        h.run()
    assert h.checkpoints() == {}
    assert h.rows() == []


def test_the_dead_letter_policy_needs_a_writer(make: Make) -> None:
    with pytest.raises(ConfigError, match="dead-letter"):
        make([Assign([P0])], bad_records=DEAD_LETTER)


# -- dirty values: checked before the sink, refusals isolated ------------------------------------


@pytest.mark.parametrize(
    ("bad", "field_name", "says"),
    [
        (event("huge", 10**30), "amount", "bigint out of range"),
        (event("text", "12"), "amount", "bigint column given str"),  # type: ignore[arg-type]
        (event("flag", True), "amount", "bigint column given bool"),  # type: ignore[arg-type]
        ({"id": None, "amount": 1}, "id", "a key column is null"),
        ({"id": "\ud800", "amount": 1}, "id", "lone surrogate"),
        ({"id": 7, "amount": 1}, "id", "text column given int"),
    ],
)
def test_a_value_its_column_cannot_hold_is_a_bad_record_of_its_own_record(
    make: Make, tmp_path: Path, bad: dict[str, Any], field_name: str, says: str
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db")
    h = make([Assign([P0, P1])], bad_records=DEAD_LETTER, dead_letters=letters)
    h.backend.append(P0, event("a", 1), bad, event("c", 3))
    h.backend.append(P1, event("x", 1))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("a", 1, 0, 0), _row("c", 3, 0, 2), _row("x", 1, 1, 0)]
    assert h.checkpoints() == {0: 3, 1: 1}
    (letter,) = letters.letters
    assert (letter.record.partition, letter.record.offset) == (0, 1)
    assert letter.error.field == field_name
    assert letter.error.context["table"] == "events"
    assert says in str(letter.error)


def test_under_stop_a_bad_value_stops_its_partition_and_the_others_finish(make: Make) -> None:
    h = make([Assign([P0, P1])])
    h.backend.append(P0, event("a", 1), event("huge", -(10**30)), event("c", 3))
    h.backend.append(P1, event("x", 1), event("y", 2))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.rows() == [_row("a", 1, 0, 0), _row("x", 1, 1, 0), _row("y", 2, 1, 1)]
    assert h.checkpoints() == {0: 1, 1: 2}, "partition 0 waits at the bad record"
    assert h.engine.stopped_partitions[P0].offset == 1


class RefusingSink(SqliteSink):
    """SQLite that refuses, as a data error, any batch holding a row with `amount == 666`
    (a constraint the checks before the sink cannot know), and counts its transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.transactions = 0

    def begin(self) -> None:
        self.transactions += 1
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


def test_a_batch_the_sink_refuses_is_split_until_the_refused_record_stands_alone(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db")
    sink = RefusingSink(tmp_path / "engine.db")
    h = make([Assign([P0, P1])], sink=sink, bad_records=DEAD_LETTER, dead_letters=letters)
    h.backend.append(P0, *(event(f"p0-{i}", 666 if i == 11 else i) for i in range(16)))
    h.backend.append(P1, event("x", 1), event("y", 2))

    assert h.run() == EXIT_OK

    assert h.checkpoints() == {0: 16, 1: 2}
    assert sorted(r["id"] for r in h.rows()) == sorted(
        [f"p0-{i}" for i in range(16) if i != 11] + ["x", "y"]
    )
    (letter,) = letters.letters
    assert (letter.record.partition, letter.record.offset) == (0, 11)
    assert "the sink refused the record's rows" in str(letter.error)
    assert letter.error.field == "amount"
    # The whole batch, then per partition, then halves: a handful of transactions, not one
    # per record.
    assert sink.transactions <= 12
    assert any(e["event"] == "rows_refused_isolating" for e in log_events)


def _summing_app() -> App:
    """The events app that also sums each partition's amounts in its keyed state."""
    app = App(name="summing", tables=(EVENTS,), decode="json", state=StateSchema())

    @app.process
    def sum_amounts(record: Record, state: KeyedState) -> Row:
        event: Any = record.value
        state["sum"] = state.get("sum", 0) + event["amount"]
        state.setdefault("ids", []).append(event["id"])
        return Row("events", {"id": event["id"], "amount": event["amount"]})

    return app


def test_a_refused_records_state_change_is_not_kept_and_the_parts_state_is_exact(
    make: Make, tmp_path: Path
) -> None:
    letters = RecordingDeadLetters(tmp_path / "engine.db")
    sink = RefusingSink(tmp_path / "engine.db")
    h = make(
        [Assign([P0, P1])],
        sink=sink,
        bad_records=DEAD_LETTER,
        dead_letters=letters,
        app=_summing_app(),
    )
    h.backend.append(P0, *(event(f"p0-{i}", 666 if i == 11 else i) for i in range(16)))
    h.backend.append(P1, event("x", 1), event("y", 2))

    assert h.run() == EXIT_OK

    stored = SqliteSink(tmp_path / "engine.db")
    stored.open_existing()
    state = {
        tp: {entry.key: json.loads(entry.value) for entry in stored.scan_state(GROUP, tp)}
        for tp in (P0, P1)
    }
    stored.close()
    kept = [i for i in range(16) if i != 11]
    assert state[P0] == {"sum": sum(kept), "ids": [f"p0-{i}" for i in kept]}
    assert state[P1] == {"sum": 3, "ids": ["x", "y"]}
    assert len(letters.letters) == 1


def test_under_stop_a_refused_record_stops_its_partition_after_the_records_before_it(
    make: Make, tmp_path: Path
) -> None:
    sink = RefusingSink(tmp_path / "engine.db")
    h = make([Assign([P0, P1])], sink=sink)
    h.backend.append(P0, *(event(f"p0-{i}", 666 if i == 5 else i) for i in range(8)))
    h.backend.append(P1, event("x", 1))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    assert h.checkpoints() == {0: 5, 1: 1}
    assert sorted(r["id"] for r in h.rows()) == sorted([f"p0-{i}" for i in range(5)] + ["x"])
    stopped = h.engine.stopped_partitions[P0]
    assert (stopped.offset, stopped.field) == (5, "amount")


# -- records lost to retention: never skipped silently --------------------------------------------


def test_records_deleted_before_they_were_read_stop_the_partition_by_default(
    make: Make, tmp_path: Path
) -> None:
    _store_checkpoints(tmp_path / "engine.db", {P0: 2, P1: 0})
    h = make([Assign([P0, P1])])
    h.backend.set_log_start(P0, 5)  # retention deleted offsets 2..4 before the group read them
    h.backend.append(P0, event("f", 5), event("g", 6))
    h.backend.append(P1, event("x", 1))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    lost = h.engine.stopped_partitions[P0]
    assert isinstance(lost, RecordsLostError)
    assert (lost.offset, lost.log_start, lost.lost) == (2, 5, 3)
    assert "deleted by retention" in str(lost)
    assert h.checkpoints() == {0: 2, 1: 1}, "partition 0 waits at its checkpoint"
    assert [r["id"] for r in h.rows()] == ["x"]
    assert h.backend.start_positions[0][P0] is None, "held: assigned, nothing of it fetched"


def test_with_skip_the_lost_records_are_reported_and_the_partition_goes_on(
    make: Make, tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    _store_checkpoints(tmp_path / "engine.db", {P0: 2})
    h = make([Assign([P0])], on_data_loss="skip")
    h.backend.set_log_start(P0, 5)
    h.backend.append(P0, event("f", 5), event("g", 6))

    assert h.run() == EXIT_OK

    assert h.rows() == [_row("f", 5, 0, 5), _row("g", 6, 0, 6)]
    assert h.checkpoints() == {0: 7}
    (lost,) = [e for e in log_events if e["event"] == "records_lost"]
    assert (lost["checkpoint"], lost["log_start"], lost["lost"]) == (2, 5, 3)
    assert (lost["topic"], lost["partition"]) == (TOPIC, 0)


def test_a_checkpoint_beyond_the_log_end_is_refused(make: Make, tmp_path: Path) -> None:
    _store_checkpoints(tmp_path / "engine.db", {P0: 500})  # the topic was recreated
    h = make([Assign([P0])])
    h.backend.append(P0, event("a", 1))

    assert h.run() == EXIT_PARTITIONS_STOPPED

    lost = h.engine.stopped_partitions[P0]
    assert isinstance(lost, RecordsLostError)
    assert lost.lost is None
    assert "beyond the log end" in str(lost)
    assert h.rows() == []


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_records_deleted_while_the_consumer_lags_are_caught_at_the_fetch(
    make: Make, policy: DataLossPolicy, log_events: list[dict[str, Any]]
) -> None:
    h = make([Assign([P0]), Fetch(per_partition=2)], on_data_loss=policy)
    h.backend.append(P0, *(event(f"e{i}", i) for i in range(10)))
    h.backend.then(Call(lambda: h.backend.delete_records(P0, 6)))

    code = h.run()

    assert h.backend.out_of_range_reports == [[P0]]
    if policy == "stop":
        assert code == EXIT_PARTITIONS_STOPPED
        assert h.checkpoints() == {0: 2}
        lost = h.engine.stopped_partitions[P0]
        assert isinstance(lost, RecordsLostError)
        assert (lost.offset, lost.lost) == (2, 4)
    else:
        assert code == EXIT_OK
        assert [r["id"] for r in h.rows()] == ["e0", "e1", "e6", "e7", "e8", "e9"]
        assert h.checkpoints() == {0: 10}
        assert [e["lost"] for e in log_events if e["event"] == "records_lost"] == [4]
