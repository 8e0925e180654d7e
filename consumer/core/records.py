"""Immutable values that cross module boundaries: partitions, records, output rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple


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
