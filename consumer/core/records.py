"""Immutable values that cross module boundaries: partitions, records, output rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


class RawRecord(NamedTuple):
    """A record as fetched from Kafka, before decoding. Immutable; a named tuple because one is
    built per record fetched (several times faster to build than a frozen dataclass)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    leader_epoch: int | None = None

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class Record(NamedTuple):
    """A decoded record, as a processor sees it. `value` is whatever the app's decoder returns.
    Immutable (a named tuple: fields by name, `_replace` for a changed copy)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: Any
    headers: tuple[tuple[str, bytes | None], ...] = ()


class Row(NamedTuple):
    """One output row for a declared table. The sink upserts it by the table's key columns.
    Immutable (a named tuple: a processor makes one per record, and a frozen dataclass took
    twice as long to build)."""

    table: str
    values: Mapping[str, Any] = MappingProxyType({})


class SourcePosition(Protocol):
    """Where an output row came from: a record's topic, partition, offset and timestamp (a
    `RawRecord` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp_ms(self) -> int | None: ...


# A record without a timestamp (Kafka's -1) counts as the oldest time.
NO_TIMESTAMP = -1


def position_order(position: SourcePosition) -> tuple[int, str, int, int]:
    """The position as compared across partitions: timestamp, then topic, partition, offset."""
    timestamp = position.timestamp_ms
    return (
        NO_TIMESTAMP if timestamp is None else timestamp,
        position.topic,
        position.partition,
        position.offset,
    )


def position_values(position: SourcePosition) -> tuple[str, int, int, int]:
    """The position as stored in the position columns: topic, partition, offset, timestamp."""
    timestamp = position.timestamp_ms
    return (
        position.topic,
        position.partition,
        position.offset,
        NO_TIMESTAMP if timestamp is None else timestamp,
    )


def replaces(new: SourcePosition, old: SourcePosition | None) -> bool:
    """Whether a row written from `new` may replace the row of the same key written from `old`
    (None: a row without a recorded position, which counts as oldest). Within one partition,
    by offset; across partitions or topics, by record timestamp, then (topic, partition,
    offset). Equal positions replace (the same record written again)."""
    if old is None:
        return True
    if new.partition == old.partition and new.topic == old.topic:
        return new.offset >= old.offset
    return position_order(new) >= position_order(old)


class StoredPosition(NamedTuple):
    """A source position as a sink stores it beside a row."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
