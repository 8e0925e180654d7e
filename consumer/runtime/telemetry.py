"""`Telemetry`: the `EngineObserver` that feeds the process's `Metrics` and `Health`.

The engine calls it on its own thread (see `consumer.engine.observer`); the lag sampler calls
`positions` and `ends_sampled` from its thread. Per batch it does a few counter increments and
gauge sets per partition, two histogram observations and one lock round trip in `Health`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from consumer.core.errors import RecordError, SinkError
from consumer.core.records import TopicPartition
from consumer.engine.batch import PartitionWork
from consumer.engine.commit import CommittedBatch
from consumer.runtime.health import Health, SinkFailure, StopCause
from consumer.runtime.metrics import Metrics


class Telemetry:
    """Implements `EngineObserver`; see the module docstring."""

    def __init__(
        self,
        metrics: Metrics,
        health: Health,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self._clock = clock
        self._wall_clock = wall_clock
        self._batch_started = clock()
        # Orders the lag gauges between the engine (commits, releases) and the lag sampler, so
        # a sample that raced a release never brings a released partition's gauges back.
        self._lag_lock = threading.Lock()
        self._assigned: set[TopicPartition] = set()
        self._stopped: set[TopicPartition] = set()
        metrics.bind(sink_failing_s=health.sink_failing_for, ready=lambda: health.readiness().ok)

    # -- EngineObserver ----------------------------------------------------------------------

    def polled(self, records: int) -> None:
        self.health.beat()
        if records:
            self._batch_started = self._clock()

    def records_fetched(self, partition: TopicPartition, records: int) -> None:
        self.metrics.consumed(partition).inc(records)

    def batch_committed(self, works: Sequence[PartitionWork], committed: CommittedBatch) -> None:
        m = self.metrics
        m.batches_committed.inc()
        m.batch_records.observe(committed.records)
        m.batch_seconds.observe(self._clock() - self._batch_started)
        m.rows_committed.inc(committed.rows)
        m.last_commit.set(self._wall_clock())
        for work in works:
            if work.records:
                m.committed(work.partition).inc(work.records)
            for letter in work.dead_letters:
                m.bad_records.labels(
                    work.partition.topic,
                    str(work.partition.partition),
                    type(letter.error).__name__,
                    "dead_lettered",
                ).inc()
        with self._lag_lock:
            for tp, next_offset in committed.next_offsets.items():
                m.committed_offset.labels(tp.topic, str(tp.partition)).set(next_offset)
            for tp, lag in self.health.committed(committed.next_offsets).items():
                m.lag.labels(tp.topic, str(tp.partition)).set(lag)

    def sink_succeeded(self, action: str, duration_s: float) -> None:
        self.health.sink_ok()
        self.metrics.sink_seconds.labels(action).observe(duration_s)

    def sink_failed(self, action: str, error: SinkError) -> None:
        # Readiness gets the action, classes and codes only; the message is in the engine's log.
        self.health.sink_failed(SinkFailure.of(action, error))
        self.metrics.sink_retries.labels(action).inc()

    def joined(self) -> None:
        self.health.mark_joined()

    def partitions_assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        self.health.assigned(starts)
        self._assigned.update(starts)
        self.metrics.assigned_partitions.set(len(self._assigned))
        for tp, start in starts.items():
            if start is not None:
                self.metrics.committed_offset.labels(tp.topic, str(tp.partition)).set(start)

    def partitions_revoked(self, partitions: Sequence[TopicPartition], *, lost: bool) -> None:
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc()
        self._release(partitions)

    def partitions_fenced(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self.metrics.fenced.labels(tp.topic, str(tp.partition)).inc()
        self._release(partitions)

    def partition_stopped(self, partition: TopicPartition, error: RecordError) -> None:
        self.metrics.bad_records.labels(
            partition.topic, str(partition.partition), type(error).__name__, "stopped"
        ).inc()
        self._stopped.add(partition)
        self.metrics.partitions_stopped.set(len(self._stopped))
        # The class and field only: the message can quote the record's values.
        cause = StopCause.of(error.offset, type(error).__name__, error.field)
        self.health.stopped(partition, cause)

    def records_lost(self, partition: TopicPartition, records: int) -> None:
        self.metrics.records_lost.labels(partition.topic, str(partition.partition)).inc(records)

    def stopping(self) -> None:
        self.health.mark_stopping()  # a plain store: safe from a signal handler

    # -- the lag sampler ---------------------------------------------------------------------

    def positions(self) -> dict[TopicPartition, int | None]:
        return self.health.positions()

    def ends_sampled(self, ends: Mapping[TopicPartition, int]) -> None:
        m = self.metrics
        with self._lag_lock:
            for tp, lag in self.health.ends_sampled(ends).items():
                m.end_offset.labels(tp.topic, str(tp.partition)).set(ends[tp])
                if lag is not None:
                    m.lag.labels(tp.topic, str(tp.partition)).set(lag)

    def starts_sampled(self, starts: Mapping[TopicPartition, int]) -> None:
        """Records between a partition's checkpoint and its log start are gone (deleted by
        retention before they were read): the same condition `checkpoint verify` reports."""
        positions = self.health.positions()
        with self._lag_lock:
            for tp, start in starts.items():
                position = positions.get(tp)
                if position is not None:
                    gone = max(start - position, 0)
                    self.metrics.behind_log_start.labels(tp.topic, str(tp.partition)).set(gone)

    def ends_unknown(self) -> None:
        self.metrics.lag_sample_errors.inc()
        self.health.ends_unknown()

    # -- internals -------------------------------------------------------------------------------

    def _release(self, partitions: Sequence[TopicPartition]) -> None:
        with self._lag_lock:
            self.health.released(partitions)
            for tp in partitions:
                self.metrics.forget_partition_gauges(tp)
        for tp in partitions:
            self._assigned.discard(tp)
            self._stopped.discard(tp)
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.partitions_stopped.set(len(self._stopped))
