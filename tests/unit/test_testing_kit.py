"""consumer.testing: records given as values or Messages reach the processor as Kafka would
deliver them, through the real engine, and the run's rows, state, dead letters and commits
are read back from its SQLite sink."""

from __future__ import annotations

from typing import Any

import pytest

from consumer import App, ConfigError, Record, Row, Table, TopicPartition
from consumer.testing import BASE_TIMESTAMP_MS, ManualClock, MemoryBackend, Message, run_app
from tests.fixtures.fake_backend import raw

SEEN = Table(
    name="seen",
    columns={
        "topic": "text",
        "partition": "integer",
        "offset": "bigint",
        "timestamp_ms": "bigint",
        "key": "bytes",
        "headers": "json",
        "value": "json",
        "is_tombstone": "boolean",
    },
    key=("topic", "partition", "offset"),
)
echo = App(name="echo", tables=(SEEN,), decode="json")


@echo.process
def seen_row(record: Record) -> Row:
    return Row(
        "seen",
        {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_ms": record.timestamp_ms,
            "key": record.key,
            "headers": [[name, None if v is None else v.decode()] for name, v in record.headers],
            "value": record.value,
            "is_tombstone": record.value is None,
        },
    )


def test_messages_reach_the_processor_with_their_keys_headers_timestamps_and_partitions() -> None:
    run = run_app(
        echo,
        [
            {"n": 1},
            Message([1, 2], key="k", headers={"trace": "t-1", "empty": None}, partition=2),
            Message("text", key=b"\x00raw", timestamp_ms=5, topic="other"),
            Message(None, key="gone", partition=2),
            7,
        ],
        topic="events",
        decode={"other": "utf8"},  # as --decode other=utf8
    )

    assert run.table("seen") == [
        _seen("events", 0, 0, BASE_TIMESTAMP_MS, None, [], {"n": 1}),
        _seen("events", 0, 1, BASE_TIMESTAMP_MS + 1, None, [], 7),
        _seen("events", 2, 0, BASE_TIMESTAMP_MS, b"k", [["trace", "t-1"], ["empty", None]], [1, 2]),
        _seen("events", 2, 1, BASE_TIMESTAMP_MS + 1, b"gone", [], None),
        _seen("other", 0, 0, 5, b"\x00raw", [], "text"),
    ]
    assert run.committed == {
        TopicPartition("events", 0): 2,
        TopicPartition("events", 2): 2,
        TopicPartition("other", 0): 1,
    }
    assert run.result.stop_reason == "idle"
    assert (run.result.records, run.result.rows, run.result.exit_code) == (5, 5, 0)


def _seen(
    topic: str, partition: int, offset: int, ts: int, key: bytes | None, headers: Any, value: Any
) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": ts,
        "key": key,
        "headers": headers,
        "value": value,
        "is_tombstone": value is None,
    }


def test_no_records_is_an_empty_clean_run() -> None:
    run = run_app(echo, [])

    assert (run.rows, run.state, run.dead_letters, run.committed) == ({"seen": []}, {}, [], {})
    assert run.result.ok


def test_batches_split_at_batch_max_records_and_all_commit() -> None:
    run = run_app(echo, [{"n": n} for n in range(25)], batch_max_records=10)

    assert run.result.batches == 3
    assert [row["value"]["n"] for row in run.table("seen")] == list(range(25))


def test_a_failing_processor_is_retried_then_dead_lettered_with_its_original_bytes() -> None:
    attempts: list[int] = []
    flaky = App(name="flaky", tables=(SEEN,), decode="json")

    @flaky.process
    def fails_on_odd(record: Record) -> Row:
        if record.value["n"] % 2:
            attempts.append(record.offset)
            raise ValueError("odd")
        return seen_row(record)

    run = run_app(
        flaky, [{"n": n} for n in range(4)], on_bad_record="dead-letter", bad_record_retries=1
    )

    assert [row["offset"] for row in run.table("seen")] == [0, 2]
    assert [(d.record.offset, d.record.value, d.attempts) for d in run.dead_letters] == [
        (1, b'{"n": 1}', 2),
        (3, b'{"n": 3}', 2),
    ]
    assert attempts == [1, 1, 3, 3]
    assert run.committed == {TopicPartition("events", 0): 4}


def test_an_error_that_ends_the_run_is_raised() -> None:
    registry_app = App(name="registry", tables=(SEEN,), decode="avro")

    @registry_app.process
    def never(record: Record) -> None:
        return None

    with pytest.raises(ConfigError, match="registry"):
        run_app(registry_app, [b"\x00\x00\x00\x00\x01"])


def test_the_memory_backend_assigns_everything_reads_round_robin_and_revokes_on_close() -> None:
    tps = [TopicPartition("t", 0), TopicPartition("t", 1)]
    logs = {tp: [raw(tp.topic, tp.partition, offset, offset) for offset in range(3)] for tp in tps}
    clock = ManualClock()
    backend = MemoryBackend(logs, clock=clock)
    listener = _Listener({tps[0]: 1, tps[1]: None})
    backend.subscribe(["t"], listener)

    batch = backend.poll_batch(10, 0.5)

    assert listener.assigned == [tps]
    assert [(r.partition, r.offset) for r in batch] == [(0, 1), (0, 2)]  # t[1] held: paused
    backend.resume([tps[1]])
    assert [(r.partition, r.offset) for r in backend.poll_batch(2, 0.5)] == [(1, 0), (1, 1)]
    assert [(r.partition, r.offset) for r in backend.poll_batch(10, 0.5)] == [(1, 2)]
    assert backend.poll_batch(10, 0.5) == []
    assert clock.now() == 1000.5  # an empty poll waits its timeout
    assert backend.watermarks(tps[0]) == (0, 3)
    backend.close()
    assert listener.revoked == [tps]


class _Listener:
    def __init__(self, starts: dict[TopicPartition, int | None]) -> None:
        self.starts = starts
        self.assigned: list[list[TopicPartition]] = []
        self.revoked: list[list[TopicPartition]] = []

    def on_assigned(self, partitions: Any) -> dict[TopicPartition, int | None]:
        self.assigned.append(list(partitions))
        return {tp: self.starts[tp] for tp in partitions}

    def on_out_of_range(self, partitions: Any) -> dict[TopicPartition, int]:
        return {}

    def on_revoked(self, partitions: Any) -> None:
        self.revoked.append(list(partitions))

    def on_lost(self, partitions: Any) -> None:
        self.revoked.append(list(partitions))
