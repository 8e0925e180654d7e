"""consumer.engine.batch: grouping, per-partition processing, the first bad record stops."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer import (
    App,
    DecodeError,
    InvalidRecordError,
    RawRecord,
    Record,
    RecordError,
    Row,
    StateChange,
    StateSchema,
    Table,
    TopicPartition,
    replaces,
)
from consumer.core.errors import SchemaRegistryError
from consumer.decoding.decoders import decoder_for
from consumer.engine.batch import (
    BadRecordPolicy,
    PartitionWork,
    group_by_partition,
    merge_rows,
    process_partition,
)
from consumer.engine.state import StateCache, open_partition_state
from tests.fixtures.apps import EVENTS, event, events_app
from tests.fixtures.fake_backend import raw
from tests.fixtures.state_store import MemoryStateStore

TP0 = TopicPartition("events", 0)
TP1 = TopicPartition("events", 1)
JSON = decoder_for("json")


def _records(tp: TopicPartition, values: list[Any], first_offset: int = 0) -> list[RawRecord]:
    return [raw(tp.topic, tp.partition, first_offset + i, v) for i, v in enumerate(values)]


def _rows(work: PartitionWork) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    return [(table.name, key, dict(values)) for table, key, values, _raw in work.rows]


def _event_row(event_id: str, amount: int, partition: int, offset: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "amount": amount,
        "source_partition": partition,
        "source_offset": offset,
    }


# -- group_by_partition ------------------------------------------------------------------------


def test_group_by_partition_keeps_each_partitions_fetch_order() -> None:
    p0 = _records(TP0, [event("a", 1), event("b", 2), event("c", 3)], first_offset=10)
    p1 = _records(TP1, [event("x", 1), event("y", 2)], first_offset=5)
    other = _records(TopicPartition("other", 0), [event("z", 1)])
    interleaved = [p1[0], p0[0], other[0], p0[1], p1[1], p0[2]]

    grouped = group_by_partition(interleaved)

    assert list(grouped) == [TP1, TP0, TopicPartition("other", 0)]
    assert [r.offset for r in grouped[TP0]] == [10, 11, 12]
    assert [r.offset for r in grouped[TP1]] == [5, 6]
    assert grouped[TP0] == p0
    assert grouped[TP1] == p1
    assert grouped[TopicPartition("other", 0)] == other


def test_group_by_partition_of_nothing_is_empty() -> None:
    assert group_by_partition([]) == {}


# -- process_partition: the good path ------------------------------------------------------------


def test_process_partition_produces_rows_in_offset_order_and_the_resume_offset() -> None:
    seen: list[tuple[int, int]] = []
    records = _records(TP1, [event("a", 10), event("b", 20), event("c", 30)], first_offset=7)

    work = process_partition(events_app(seen), JSON, TP1, records)

    assert seen == [(1, 7), (1, 8), (1, 9)]
    assert work.partition == TP1
    assert work.first_offset == 7
    assert work.next_offset == 10
    assert work.records == 3
    assert work.error is None
    assert _rows(work) == [
        ("events", ("a",), _event_row("a", 10, 1, 7)),
        ("events", ("b",), _event_row("b", 20, 1, 8)),
        ("events", ("c",), _event_row("c", 30, 1, 9)),
    ]


def test_processor_sees_the_decoded_record_with_its_metadata() -> None:
    seen: list[Record] = []
    app = App(name="meta", tables=(EVENTS,))

    @app.process
    def keep(record: Record) -> None:
        seen.append(record)

    source = RawRecord(
        topic="events",
        partition=0,
        offset=42,
        timestamp_ms=123,
        key=b"key",
        value=b'{"id": "a", "n": [1, 2]}',
        headers=(("h", b"v"),),
    )
    work = process_partition(app, JSON, TP0, [source])

    assert seen == [
        Record(
            topic="events",
            partition=0,
            offset=42,
            timestamp_ms=123,
            key=b"key",
            value={"id": "a", "n": [1, 2]},
            headers=(("h", b"v"),),
        )
    ]
    assert work.rows == []
    assert work.records == 1
    assert work.next_offset == 43


def test_processor_may_return_none_one_row_or_many_rows() -> None:
    counts = Table("counts", columns={"name": "text", "n": "bigint"}, key=("name",))
    app = App(name="multi", tables=(EVENTS, counts))

    @app.process
    def fan_out(record: Record) -> Any:
        n = record.value["n"]
        if n == 0:
            return None
        if n == 1:
            return Row("counts", {"name": "one", "n": 1})
        return (Row("counts", {"name": f"r{i}", "n": i}) for i in range(n))

    work = process_partition(app, JSON, TP0, _records(TP0, [{"n": 0}, {"n": 1}, {"n": 2}]))

    assert work.error is None
    assert work.records == 3
    assert _rows(work) == [
        ("counts", ("one",), {"name": "one", "n": 1}),
        ("counts", ("r0",), {"name": "r0", "n": 0}),
        ("counts", ("r1",), {"name": "r1", "n": 1}),
    ]


# -- process_partition: stopping at the first bad record ------------------------------------------


def test_bad_json_stops_the_partition_with_a_located_decode_error() -> None:
    seen: list[tuple[int, int]] = []
    records = _records(TP0, [event("a", 1), event("b", 2)], first_offset=3)
    records.append(raw("events", 0, 5, b'{"id": "c", "amount": '))  # truncated JSON
    records.extend(_records(TP0, [event("d", 4)], first_offset=6))

    work = process_partition(events_app(seen), JSON, TP0, records)

    assert seen == [(0, 3), (0, 4)], "nothing after the bad record may be processed"
    assert _rows(work) == [
        ("events", ("a",), _event_row("a", 1, 0, 3)),
        ("events", ("b",), _event_row("b", 2, 0, 4)),
    ]
    assert work.records == 2
    assert work.next_offset == 5, "the partition resumes at the bad record"
    error = work.error
    assert isinstance(error, DecodeError)
    assert (error.topic, error.partition, error.offset, error.field) == ("events", 0, 5, None)
    assert "not valid JSON" in str(error)
    assert "topic='events'" in str(error)
    assert "partition=0" in str(error)
    assert "offset=5" in str(error)
    assert error.__cause__ is not None


def test_non_utf8_bytes_are_a_decode_error_too() -> None:
    work = process_partition(events_app(), JSON, TP0, [raw("events", 0, 0, b"\xff\xfe")])

    assert isinstance(work.error, DecodeError)
    assert work.error.offset == 0
    assert work.records == 0
    assert work.next_offset == 0


def test_invalid_record_from_the_processor_names_topic_partition_offset_and_field() -> None:
    records = _records(TP1, [event("a", 1), {"fail": "invalid"}, event("c", 3)], first_offset=20)

    work = process_partition(events_app(), JSON, TP1, records)

    assert _rows(work) == [("events", ("a",), _event_row("a", 1, 1, 20))]
    assert work.next_offset == 21
    error = work.error
    assert isinstance(error, InvalidRecordError)
    assert (error.topic, error.partition, error.offset, error.field) == ("events", 1, 21, "amount")
    assert str(error) == (
        "event field 'amount' is wrong (topic='events', partition=1, offset=21, field='amount')"
    )


def test_a_processor_bug_is_wrapped_as_a_located_record_error() -> None:
    records = _records(TP0, [event("a", 1), {"fail": "crash"}, event("c", 3)])

    work = process_partition(events_app(), JSON, TP0, records)

    assert _rows(work) == [("events", ("a",), _event_row("a", 1, 0, 0))]
    assert work.next_offset == 1
    error = work.error
    assert type(error) is RecordError
    assert (error.topic, error.partition, error.offset) == ("events", 0, 1)
    assert "processor raised ZeroDivisionError" in str(error)
    assert isinstance(error.__cause__, ZeroDivisionError)


def test_bad_first_record_leaves_no_progress() -> None:
    work = process_partition(
        events_app(), JSON, TP0, _records(TP0, [{"fail": "invalid"}, event("b", 2)], 9)
    )

    assert work.rows == []
    assert work.records == 0
    assert work.first_offset == work.next_offset == 9
    assert work.error is not None
    assert work.error.offset == 9


def test_a_row_for_an_undeclared_table_is_an_error_naming_the_table() -> None:
    app = App(name="t", tables=(EVENTS,))
    app.process(lambda record: Row("nope", {"id": "a"}))

    work = process_partition(app, JSON, TP0, _records(TP0, [event("a", 1)], first_offset=4))

    assert work.rows == []
    assert isinstance(work.error, RecordError)
    assert (work.error.topic, work.error.partition, work.error.offset) == ("events", 0, 4)
    assert "undeclared table" in str(work.error)
    assert "'nope'" in str(work.error)


def test_an_undeclared_column_is_an_error_naming_the_column() -> None:
    app = App(name="t", tables=(EVENTS,))
    app.process(lambda record: Row("events", {"id": "a", "amount": 1, "colour": "red"}))

    work = process_partition(app, JSON, TP0, _records(TP0, [event("a", 1)], first_offset=2))

    error = work.error
    assert isinstance(error, InvalidRecordError)
    assert error.field == "colour"
    assert error.offset == 2
    assert error.context["table"] == "events"
    assert "field='colour'" in str(error)


def test_a_missing_key_column_is_an_error_naming_the_key_column() -> None:
    app = App(name="t", tables=(EVENTS,))
    app.process(lambda record: Row("events", {"amount": 1}))

    work = process_partition(app, JSON, TP0, _records(TP0, [event("a", 1)]))

    error = work.error
    assert isinstance(error, InvalidRecordError)
    assert error.field == "id"
    assert error.context["table"] == "events"
    assert "lacks a key column" in str(error)


def test_one_bad_row_among_many_from_one_record_drops_all_of_that_records_rows() -> None:
    app = App(name="t", tables=(EVENTS,))
    app.process(lambda record: [Row("events", {"id": "ok"}), Row("events", {"amount": 1})])

    work = process_partition(app, JSON, TP0, _records(TP0, [event("a", 1)]))

    assert work.rows == [], "a record's rows are all or nothing"
    assert work.error is not None
    assert work.error.field == "id"


# -- merge_rows ------------------------------------------------------------------------------


def test_merge_rows_keeps_the_last_row_per_key_in_offset_order() -> None:
    app = events_app()
    work = process_partition(
        app,
        JSON,
        TP0,
        _records(TP0, [event("a", 1), event("b", 2), event("a", 3), event("c", 4), event("b", 5)]),
    )

    merged = merge_rows([work])

    assert list(merged) == ["events"]
    table, rows, _positions = merged["events"]
    assert table is EVENTS
    assert [dict(r) for r in rows] == [
        _event_row("a", 3, 0, 2),
        _event_row("c", 4, 0, 3),
        _event_row("b", 5, 0, 4),
    ]


def test_merge_rows_across_partitions_and_tables() -> None:
    counts = Table("counts", columns={"name": "text", "n": "bigint"}, key=("name",))
    app = App(name="two", tables=(EVENTS, counts))

    @app.process
    def both(record: Record) -> list[Row]:
        value = record.value
        return [
            Row("events", {"id": value["id"], "amount": value["amount"]}),
            Row("counts", {"name": "total", "n": record.offset}),
        ]

    w0 = process_partition(app, JSON, TP0, _records(TP0, [event("a", 1), event("b", 2)]))
    w1 = process_partition(app, JSON, TP1, _records(TP1, [event("x", 9), event("a", 7)], 10))

    merged = merge_rows([w0, w1])

    assert set(merged) == {"events", "counts"}
    assert [dict(r) for r in merged["events"][1]] == [
        {"id": "b", "amount": 2},
        {"id": "x", "amount": 9},
        {"id": "a", "amount": 7},
    ]
    assert [dict(r) for r in merged["counts"][1]] == [{"name": "total", "n": 11}]


def test_merge_rows_of_an_upsert_table_follow_the_position_rule() -> None:
    totals = Table("totals", columns={"id": "text", "amount": "bigint"}, key=("id",))
    app = App(name="totals", tables=(totals,))
    app.process(lambda record: Row("totals", record.value))

    def at(partition: int, offset: int, timestamp_ms: int, amount: int) -> RawRecord:
        value = json.dumps({"id": "k", "amount": amount}).encode()
        return RawRecord("totals", partition, offset, timestamp_ms, None, value)

    tp0, tp1 = TopicPartition("totals", 0), TopicPartition("totals", 1)
    # Within a partition the later offset wins even with an earlier timestamp.
    within = process_partition(app, JSON, tp0, [at(0, 1, 5_000, 1), at(0, 2, 4_000, 2)])
    assert merge_rows([within])["totals"].rows == [{"id": "k", "amount": 2}]
    # Across partitions the later timestamp wins, in either order of the works.
    later = process_partition(app, JSON, tp0, [at(0, 7, 2_000, 10)])
    earlier = process_partition(app, JSON, tp1, [at(1, 99, 1_000, 20)])
    for works in ([later, earlier], [earlier, later]):
        merged = merge_rows(works)["totals"]
        assert merged.rows == [{"id": "k", "amount": 10}]
        assert [(p.partition, p.offset) for p in merged.positions] == [(0, 7)]


def test_the_replace_rule() -> None:
    def at(topic: str, partition: int, offset: int, timestamp_ms: int | None) -> RawRecord:
        return RawRecord(topic, partition, offset, timestamp_ms, None, None)

    assert replaces(at("t", 0, 1, 0), None), "a row without a position counts as oldest"
    assert replaces(at("t", 0, 5, 0), at("t", 0, 5, 9)), "the same record again"
    assert not replaces(at("t", 0, 4, 9), at("t", 0, 5, 0)), "same partition: by offset"
    assert not replaces(at("t", 1, 9, 0), at("t", 0, 5, 1)), "across partitions: by time"
    assert replaces(at("t", 1, 0, 1), at("t", 0, 5, 1)), "same time: by partition"
    assert not replaces(at("t", 1, 0, None), at("t", 0, 5, 0)), "no timestamp is oldest"
    assert not replaces(at("Z", 0, 9, 1), at("a", 0, 0, 1)), "same time: topics by code point"


def test_merge_rows_with_composite_keys() -> None:
    table = Table("pairs", columns={"a": "text", "b": "integer", "v": "text"}, key=("a", "b"))
    app = App(name="pairs", tables=(table,))
    app.process(lambda record: Row("pairs", record.value))
    values = [
        {"a": "x", "b": 1, "v": "first"},
        {"a": "x", "b": 2, "v": "other"},
        {"a": "x", "b": 1, "v": "second"},
    ]
    work = process_partition(app, JSON, TP0, _records(TP0, values))

    assert [dict(r) for r in merge_rows([work])["pairs"][1]] == [
        {"a": "x", "b": 2, "v": "other"},
        {"a": "x", "b": 1, "v": "second"},
    ]


def test_merge_rows_of_works_without_rows_is_empty() -> None:
    work = PartitionWork(partition=TP0, first_offset=0, next_offset=3, records=3)
    assert merge_rows([work]) == {}


def test_process_partition_without_a_processor_is_refused() -> None:
    with pytest.raises(InvalidRecordError, match="no processor"):
        process_partition(App(name="empty", tables=(EVENTS,)), JSON, TP0, _records(TP0, [{}]))


# -- the bad-record policy ------------------------------------------------------------------------


def _counting_app(state: bool = False) -> App:
    """Sums amounts per id in the state (when stateful); 'fail' records half-change the state
    and then raise, like a processor bug in the middle of its work."""
    totals = Table(name="totals", columns={"id": "text", "total": "bigint"}, key=("id",))
    app = App(
        name="counting",
        tables=(totals,),
        state=StateSchema(version=1) if state else None,
    )

    def count(record: Record, totals_state: Any = None) -> Row:
        value = record.value
        if totals_state is not None:
            totals_state[value["id"]] = totals_state.get(value["id"], 0) + value["amount"]
        if value.get("fail"):
            raise ValueError("boom after changing the state")
        total = totals_state[value["id"]] if totals_state is not None else value["amount"]
        return Row("totals", {"id": value["id"], "total": total})

    app.process(count)
    return app


def test_a_dead_lettered_record_lets_the_partition_go_on_and_keeps_its_original_bytes() -> None:
    app = _counting_app()
    records = _records(TP0, [event("a", 1), b"{not json", event("b", 2)], first_offset=10)
    policy = BadRecordPolicy(action="dead-letter")

    work = process_partition(app, JSON, TP0, records, policy=policy)

    assert work.error is None
    assert (work.first_offset, work.next_offset, work.records) == (10, 13, 3)
    assert [key for _t, key, _v, _raw in work.rows] == [("a",), ("b",)]
    assert [letter.record for letter in work.dead_letters] == [records[1]]
    letter = work.dead_letters[0]
    assert isinstance(letter.error, DecodeError)
    assert (letter.error.topic, letter.error.partition, letter.error.offset) == ("events", 0, 11)
    assert letter.attempts == 1


def test_retries_pause_with_capped_doubling_backoff_before_the_policy_applies() -> None:
    pauses: list[float] = []
    policy = BadRecordPolicy(action="dead-letter", retries=4, backoff_s=1.0, max_backoff_s=3.0)

    work = process_partition(
        _counting_app(),
        JSON,
        TP0,
        _records(TP0, [{"id": "x", "amount": 1, "fail": True}]),
        policy=policy,
        sleep=pauses.append,
    )

    assert pauses == [1.0, 2.0, 3.0, 3.0]
    assert work.dead_letters[0].attempts == 5


def test_a_dead_lettered_record_leaves_no_trace_in_the_state() -> None:
    app = _counting_app(state=True)
    records = _records(
        TP0,
        [event("a", 1), {"id": "a", "amount": 100, "fail": True}, event("a", 2)],
    )

    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP0, "a", b"10", 1)])
    state = open_partition_state(store, StateCache(), "g", TP0, None)

    work = process_partition(
        app,
        JSON,
        TP0,
        records,
        state,
        policy=BadRecordPolicy(action="dead-letter", retries=2),
        sleep=lambda _s: None,
    )

    assert work.state_changes == [StateChange(TP0, "a", b"13", 1)], "the failed +100 is gone"
    assert [values["total"] for _t, _k, values, _raw in work.rows] == [11, 13]
    assert len(work.dead_letters) == 1


def test_errors_about_the_setup_are_not_blamed_on_a_record() -> None:
    def unreachable(_value: bytes | None) -> Any:
        raise SchemaRegistryError("schema registry unreachable", url="http://127.0.0.1:1")

    with pytest.raises(SchemaRegistryError):
        process_partition(
            _counting_app(),
            unreachable,
            TP0,
            _records(TP0, [event("a", 1)]),
            policy=BadRecordPolicy(action="dead-letter", retries=3),
        )
