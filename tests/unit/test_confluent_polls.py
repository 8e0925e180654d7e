"""ConfluentBackend.poll_batch over a scripted stand-in for confluent_kafka.Consumer: a poll
takes what the client holds, waits only when it holds nothing, fills for `fill_s` at most, and
never returns records fetched before a rebalance callback that moved their partition."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka

from consumer import StartPosition, TopicPartition
from consumer.backends.confluent import ConfluentBackend

TOPIC = "events"


@dataclass
class _Message:
    partition_no: int
    offset_no: int

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self.partition_no

    def offset(self) -> int:
        return self.offset_no

    def timestamp(self) -> tuple[int, int]:
        return (confluent_kafka.TIMESTAMP_CREATE_TIME, 1)

    def headers(self) -> None:
        return None

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"{}"

    def leader_epoch(self) -> int:
        return 0


@dataclass
class _Consumer:
    """Answers each consume() with the next scripted step: (messages, a callback to run
    first, as librdkafka serves a rebalance inside consume())."""

    steps: list[tuple[list[_Message], Callable[[], None] | None]]
    calls: list[tuple[int, float]] = field(default_factory=list)

    def consume(self, num_messages: int, timeout: float) -> list[_Message]:
        self.calls.append((num_messages, timeout))
        if not self.steps:
            return []
        messages, callback = self.steps.pop(0)
        if callback is not None:
            callback()
        return messages[:num_messages]

    def incremental_assign(self, partitions: Any) -> None: ...

    def incremental_unassign(self, partitions: Any) -> None: ...

    def resume(self, partitions: Any) -> None: ...

    def pause(self, partitions: Any) -> None: ...


class _Listener:
    def on_assigned(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, StartPosition | None]:
        return dict.fromkeys(partitions, 0)

    def on_out_of_range(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        return {}

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None: ...

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None: ...


def _backend(
    steps: list[tuple[list[_Message], Callable[[], None] | None]],
) -> tuple[ConfluentBackend, _Consumer]:
    backend = ConfluentBackend(bootstrap_servers="127.0.0.1:1", group="g")
    backend._consumer.close()
    consumer = _Consumer(steps)
    backend._consumer = consumer  # type: ignore[assignment]
    backend._listener = _Listener()
    return backend, consumer


def _offsets(records: Sequence[Any]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def test_a_poll_takes_what_the_client_holds_without_waiting() -> None:
    held = [_Message(0, 0), _Message(1, 0)]
    backend, consumer = _backend([(held, None)])

    records = backend.poll_batch(100, 0.5)

    assert _offsets(records) == [(0, 0), (1, 0)]
    assert consumer.calls == [(100, 0.0)], "what was there was taken at once, no second call"


def test_a_poll_waits_only_when_nothing_is_there_then_takes_the_rest() -> None:
    backend, consumer = _backend([([], None), ([_Message(0, 0)], None), ([_Message(0, 1)], None)])

    records = backend.poll_batch(100, 0.5)

    assert _offsets(records) == [(0, 0), (0, 1)]
    assert consumer.calls == [(100, 0.0), (1, 0.5), (99, 0.0)]


def test_a_batch_fills_for_the_commit_interval() -> None:
    backend, consumer = _backend([([_Message(0, 0)], None), ([_Message(0, 1)], None)])

    records = backend.poll_batch(100, 0.5, fill_s=0.25)

    assert _offsets(records) == [(0, 0), (0, 1)]
    assert consumer.calls == [(100, 0.0), (99, 0.25)]


def test_records_fetched_before_a_rebalance_that_moved_their_partition_are_dropped() -> None:
    backend: ConfluentBackend

    def reassign_partition_0() -> None:
        tp = confluent_kafka.TopicPartition(TOPIC, 0)
        backend._on_revoke(consumer, [tp])
        backend._on_assign(consumer, [tp])

    steps: list[tuple[list[_Message], Callable[[], None] | None]] = [
        ([], None),
        ([_Message(0, 5)], None),  # fetched before the rebalance
        ([_Message(1, 7), _Message(0, 0)], reassign_partition_0),  # p0 again from its start
    ]
    backend, consumer = _backend(steps)

    records = backend.poll_batch(100, 0.5, fill_s=0.1)

    assert _offsets(records) == [(1, 7), (0, 0)]
