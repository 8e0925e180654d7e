"""The `EngineObserver` contract: what the engine reports as it runs, for metrics and health.

The engine calls an observer on its own thread, a handful of times per batch (never per record),
so an implementation must be cheap and must never raise: observability can slow the loop down
by microseconds, never stop it. `NullObserver` is the default when nothing observes the engine.

When each call is made:

    polled(records)              every poll returned (the loop is alive); records > 0 starts a batch
    records_fetched(tp, n)       n fresh records of an owned partition are about to be processed
    batch_committed(works, b)    the batch's sink transaction COMMITted (after any fenced retry)
    sink_succeeded(action, s)    one sink call (commit, acquire, load_checkpoints) succeeded in s
    sink_failed(action, error)   one sink call failed; the engine will retry it or give up
    joined()                     the group handed this member an assignment, possibly empty
    partitions_assigned(starts)  partitions taken, with their start offsets (None: not known)
    partitions_revoked(tps, lost) partitions released (lost=True: taken away without a revoke)
    partitions_fenced(tps)       a newer owner fenced these partitions; they were dropped
    partition_stopped(tp, error) a bad record (or records lost, under "stop") halted it
    records_lost(tp, n)          under "skip": n records were gone from the log (retention)
    stopping()                   a stop was requested (may be called from a signal handler)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from consumer.core.errors import RecordError, SinkError
from consumer.core.records import TopicPartition
from consumer.engine.batch import PartitionWork
from consumer.engine.commit import CommittedBatch


class EngineObserver(Protocol):
    """See the module docstring for when each method is called."""

    def polled(self, records: int) -> None: ...

    def records_fetched(self, partition: TopicPartition, records: int) -> None: ...

    def batch_committed(
        self, works: Sequence[PartitionWork], committed: CommittedBatch
    ) -> None: ...

    def sink_succeeded(self, action: str, duration_s: float) -> None: ...

    def sink_failed(self, action: str, error: SinkError) -> None: ...

    def joined(self) -> None: ...

    def partitions_assigned(self, starts: Mapping[TopicPartition, int | None]) -> None: ...

    def partitions_revoked(self, partitions: Sequence[TopicPartition], *, lost: bool) -> None: ...

    def partitions_fenced(self, partitions: Sequence[TopicPartition]) -> None: ...

    def partition_stopped(self, partition: TopicPartition, error: RecordError) -> None: ...

    def records_lost(self, partition: TopicPartition, records: int) -> None: ...

    def stopping(self) -> None: ...


class NullObserver:
    """Observes nothing: the engine's default, so an unobserved engine pays only empty calls."""

    def polled(self, records: int) -> None:
        pass

    def records_fetched(self, partition: TopicPartition, records: int) -> None:
        pass

    def batch_committed(self, works: Sequence[PartitionWork], committed: CommittedBatch) -> None:
        pass

    def sink_succeeded(self, action: str, duration_s: float) -> None:
        pass

    def sink_failed(self, action: str, error: SinkError) -> None:
        pass

    def joined(self) -> None:
        pass

    def partitions_assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        pass

    def partitions_revoked(self, partitions: Sequence[TopicPartition], *, lost: bool) -> None:
        pass

    def partitions_fenced(self, partitions: Sequence[TopicPartition]) -> None:
        pass

    def partition_stopped(self, partition: TopicPartition, error: RecordError) -> None:
        pass

    def records_lost(self, partition: TopicPartition, records: int) -> None:
        pass

    def stopping(self) -> None:
        pass
