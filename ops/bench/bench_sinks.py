"""Bench-only sinks that implement offsetkeeper's `Sink` protocol (sinks/_contract.py).

- `NullSink`: keeps checkpoints and epochs in memory and drops rows. It measures the engine
  without any storage cost (the ceiling for offsetkeeper itself).
- `SplitTransactionSink`: wraps a real sink and COMMITs the rows in one transaction and the
  checkpoints in a second one, i.e. offsets written *outside* the rows' transaction. A crash
  between the two COMMITs replays the batch: at-least-once. Comparing it with the wrapped sink
  isolates what the single (exactly-once) transaction costs.
- `KafkaOffsetsOnlySink`: wraps a real sink and stores no checkpoint at all, so the only
  progress record is the engine's advisory commit to Kafka after each batch: the classic
  at-least-once consumer. Comparing it with the wrapped sink isolates what keeping the
  checkpoints (fencing check + upsert) in the sink costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from consumer import Checkpoint, FencedError, RowsOrigin, Sink, Table, TopicPartition


class NullSink:
    """Drops rows; keeps epochs and checkpoints in memory (one process, so never fenced)."""

    writes_per_partition = False

    def __init__(self) -> None:
        self._epochs: dict[tuple[str, TopicPartition], int] = {}
        self._checkpoints: dict[tuple[str, TopicPartition], Checkpoint] = {}
        self._pending: list[tuple[str, Checkpoint]] = []
        self._jobs: dict[str, str] = {}
        self.rows_written = 0

    @property
    def description(self) -> str:
        return "null://"

    def open(self, tables: Sequence[Table]) -> None:
        pass

    def open_existing(self) -> None:
        pass

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        epochs: dict[TopicPartition, int] = {}
        for tp in partitions:
            epoch = self._epochs.get((group, tp), 0) + 1
            self._epochs[(group, tp)] = epochs[tp] = epoch
        return epochs

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        wanted = None if partitions is None else set(partitions)
        return {
            tp: cp
            for (g, tp), cp in self._checkpoints.items()
            if g == group and (wanted is None or tp in wanted)
        }

    def begin(self) -> None:
        self._pending.clear()

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        self.rows_written += len(rows)

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        stale = [
            cp.topic_partition
            for cp in checkpoints
            if self._epochs.get((group, cp.topic_partition)) != epochs[cp.topic_partition]
        ]
        if stale:
            raise FencedError(
                "partitions were taken over by a newer owner",
                partitions=[(tp.topic, tp.partition) for tp in stale],
                group=group,
            )
        self._pending.extend((group, cp) for cp in checkpoints)

    def commit(self) -> None:
        for group, cp in self._pending:
            self._checkpoints[(group, cp.topic_partition)] = cp
        self._pending.clear()

    def rollback(self) -> None:
        self._pending.clear()

    def checkpoint_groups(self) -> list[str]:
        return sorted({group for group, _tp in self._checkpoints})

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        return []

    def create_job(self, job_id: str, document: str) -> str:
        return self._jobs.setdefault(job_id, document)

    def load_job(self, job_id: str) -> str | None:
        return self._jobs.get(job_id)

    def close(self) -> None:
        pass


class _Wrapper:
    """Delegates every `Sink` call to `inner`; subclasses change the batch transaction."""

    def __init__(self, inner: Sink) -> None:
        self._inner = inner
        self.writes_per_partition = inner.writes_per_partition

    @property
    def description(self) -> str:
        return self._inner.description

    def open(self, tables: Sequence[Table]) -> None:
        self._inner.open(tables)

    def open_existing(self) -> None:
        self._inner.open_existing()

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return self._inner.acquire(group, partitions)

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        return self._inner.load_checkpoints(group, partitions)

    def begin(self) -> None:
        self._inner.begin()

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        self._inner.write_rows(table, rows, origin)

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        self._inner.save_checkpoints(group, checkpoints, epochs)

    def commit(self) -> None:
        self._inner.commit()

    def rollback(self) -> None:
        self._inner.rollback()

    def checkpoint_groups(self) -> list[str]:
        return self._inner.checkpoint_groups()

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        return self._inner.migrate_checkpoints(dry_run=dry_run)

    def create_job(self, job_id: str, document: str) -> str:
        return self._inner.create_job(job_id, document)

    def load_job(self, job_id: str) -> str | None:
        return self._inner.load_job(job_id)

    def close(self) -> None:
        self._inner.close()


class SplitTransactionSink(_Wrapper):
    """Rows COMMIT first; the checkpoints then go in a second transaction of their own."""

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        self._inner.commit()  # transaction 1: the rows alone
        self._inner.begin()  # transaction 2: the checkpoints (COMMITted by the engine)
        self._inner.save_checkpoints(group, checkpoints, epochs)


class KafkaOffsetsOnlySink(_Wrapper):
    """No checkpoint in the sink: progress lives only in the engine's advisory Kafka commit."""

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        pass
