"""Where an audit's recompute writes: memory. The same engine (decode, process, check values,
merge a batch, guard positions) runs over the range; nothing reaches the real sink or Kafka."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumer.checkpoints.model import Checkpoint
from consumer.core.app import Table
from consumer.core.records import SourcePosition, TopicPartition, replaces
from consumer.engine.batch import DeadLetter
from consumer.engine.sink import RowsOrigin
from consumer.engine.values import ValueLimits

Key = tuple[Any, ...]


@dataclass(slots=True)
class ExpectedTable:
    """What the range writes to one table: per key, the row and the position that wrote it
    (for an append table the key is the source position itself)."""

    table: Table
    rows: dict[Key, tuple[Mapping[str, Any], SourcePosition | None]] = field(default_factory=dict)


class MemorySink:
    """A `consumer.Sink` (and `PositionGuardedSink`) in memory: upsert tables keep per key the
    row from the newest position, exactly as the SQL sinks' guarded upsert does; append tables
    keep every row. Checkpoints are the run's own, never stored anywhere else."""

    writes_per_partition = False

    def __init__(self, value_limits: ValueLimits | None = None) -> None:
        self._value_limits = value_limits or ValueLimits()
        self.tables: dict[str, ExpectedTable] = {}
        self._epochs: dict[tuple[str, TopicPartition], int] = {}

    @property
    def description(self) -> str:
        return "memory (audit recompute)"

    @property
    def value_limits(self) -> ValueLimits:
        """The real sink's limits: a value it could not store fails here as it did there."""
        return self._value_limits

    def open(self, tables: Sequence[Table]) -> None:
        for table in tables:
            self.tables.setdefault(table.name, ExpectedTable(table))

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        taken = {}
        for tp in partitions:
            self._epochs[group, tp] = taken[tp] = self._epochs.get((group, tp), 0) + 1
        return taken

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        return {}

    def begin(self) -> None:
        """Writes apply at once: a recompute's batch cannot be refused or fenced halfway."""

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        expected = self.tables[table.name].rows
        for row in rows:
            expected[tuple(row[column] for column in table.key)] = (row, None)

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        expected = self.tables[table.name].rows
        for row, position in zip(rows, positions, strict=True):
            key = tuple(row[column] for column in table.key)
            earlier = expected.get(key)
            if earlier is None or overwrite_newer or replaces(position, earlier[1]):
                expected[key] = (row, position)

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        """Nothing to keep: an audit that stops is run again from its start."""

    def commit(self) -> None:
        """Already applied (see `begin`)."""

    def rollback(self) -> None:
        """Only reached after a failure that ends the audit."""

    def close(self) -> None:
        """Nothing to release."""


@dataclass(slots=True)
class CountedDeadLetters:
    """The dead-letter writer of a recompute: a record the live group dead-lettered fails here
    too; it is counted and shown, never written."""

    letters: list[DeadLetter] = field(default_factory=list)

    def topic_for(self, source_topic: str) -> str:
        return f"{source_topic}.audit-not-written"

    def prepare(self, source_topics: Sequence[str]) -> None:
        """No topic is made."""

    def write(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)

    def close(self) -> None:
        """Nothing to release."""
