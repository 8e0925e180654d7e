"""Prometheus metrics of one consumer process, in a registry created at start-up (never at
import: the module defines no metric, and two `Metrics` never share anything).

Every name starts with `offsetkeeper_`; per-partition series carry `topic` and `partition`.
The README ("Deploying") lists them with their meaning.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from consumer.core.records import TopicPartition

_TP = ("topic", "partition")
# Records per committed batch: the engine's batches hold up to batch_max_records (default 2000).
_BATCH_RECORDS_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 50_000)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The process's metric families. Per-partition children are cached, so the engine's
    per-batch hooks cost a dict lookup and an increment per partition."""

    def __init__(self, *, app: str, group: str, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        Gauge(
            "offsetkeeper_consumer_info",
            "The app and consumer group this process runs (always 1).",
            ("app", "group"),
            registry=r,
        ).labels(app, group).set(1)
        self.records_consumed = Counter(
            "offsetkeeper_records_consumed",
            "Records fetched from Kafka and handed to the processor, per partition.",
            _TP,
            registry=r,
        )
        self.records_committed = Counter(
            "offsetkeeper_records_committed",
            "Records whose offsets were committed in the sink, per partition.",
            _TP,
            registry=r,
        )
        self.rows_committed = Counter(
            "offsetkeeper_rows_committed",
            "Output rows written in committed sink transactions (after merging keys per batch).",
            registry=r,
        )
        self.batches_committed = Counter(
            "offsetkeeper_batches_committed", "Batches committed in the sink.", registry=r
        )
        self.committed_offset = Gauge(
            "offsetkeeper_committed_offset",
            "The next offset to read, as stored in the sink's checkpoint, per partition.",
            _TP,
            registry=r,
        )
        self.end_offset = Gauge(
            "offsetkeeper_log_end_offset",
            "The partition's log end offset (high watermark), as last sampled.",
            _TP,
            registry=r,
        )
        self.lag = Gauge(
            "offsetkeeper_consumer_lag",
            "Records behind: log end offset minus the checkpoint stored in the sink.",
            _TP,
            registry=r,
        )
        self.behind_log_start = Gauge(
            "offsetkeeper_records_behind_log_start",
            "Records between the checkpoint and the log start: deleted by retention before "
            "they were read (0: none). Not zero means loss; the partition stops on it unless "
            "--on-data-loss skip.",
            _TP,
            registry=r,
        )
        self.lag_sample_errors = Counter(
            "offsetkeeper_lag_sample_errors",
            "End-offset samples that failed (the broker did not answer in time).",
            registry=r,
        )
        self.batch_records = Histogram(
            "offsetkeeper_batch_records",
            "Records per committed batch.",
            buckets=_BATCH_RECORDS_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "offsetkeeper_batch_duration_seconds",
            "From a batch's records arriving from Kafka to its sink COMMIT (processing, retries "
            "and the commit itself).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.sink_seconds = Histogram(
            "offsetkeeper_sink_duration_seconds",
            "Successful sink calls by action; action=commit is one batch's transaction "
            "(BEGIN, rows, checkpoints, COMMIT).",
            ("action",),
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.sink_retries = Counter(
            "offsetkeeper_sink_retries",
            "Failed sink calls that were rolled back and retried (or given up on), by action.",
            ("action",),
            registry=r,
        )
        self.sink_failing = Gauge(
            "offsetkeeper_sink_failing_seconds",
            "How long the sink has been failing without a success in between (0: healthy).",
            registry=r,
        )
        self.rebalances = Counter(
            "offsetkeeper_rebalances",
            "Rebalance callbacks by kind: assigned, revoked, lost.",
            ("kind",),
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "offsetkeeper_assigned_partitions",
            "Partitions this member holds now.",
            registry=r,
        )
        self.fenced = Counter(
            "offsetkeeper_fenced_partitions",
            "Fencing rejections: a commit refused because a newer owner took the partition.",
            _TP,
            registry=r,
        )
        self.bad_records = Counter(
            "offsetkeeper_bad_records",
            "Records that could not be decoded or processed, by outcome: 'stopped' halts the "
            "partition at the record; 'dead_lettered' went to the dead-letter topic.",
            (*_TP, "error_type", "outcome"),
            registry=r,
        )
        self.partitions_stopped = Gauge(
            "offsetkeeper_partitions_stopped",
            "Partitions halted on a bad record (or on records lost to retention) now.",
            registry=r,
        )
        self.records_lost = Counter(
            "offsetkeeper_records_lost",
            "Records deleted from the log before they were read, skipped under "
            "--on-data-loss skip (under the default, stop, the partition halts instead).",
            _TP,
            registry=r,
        )
        self.last_commit = Gauge(
            "offsetkeeper_last_commit_timestamp_seconds",
            "Unix time of the last committed batch.",
            registry=r,
        )
        self.ready = Gauge(
            "offsetkeeper_ready", "1 while /readyz answers ready, else 0.", registry=r
        )
        self._children: dict[tuple[int, TopicPartition], Counter] = {}

    def bind(self, *, sink_failing_s: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Gauges computed at scrape time from the health state."""
        self.sink_failing.set_function(sink_failing_s)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def consumed(self, tp: TopicPartition) -> Counter:
        return self._child(0, self.records_consumed, tp)

    def committed(self, tp: TopicPartition) -> Counter:
        return self._child(1, self.records_committed, tp)

    def _child(self, family: int, parent: Counter, tp: TopicPartition) -> Counter:
        child = self._children.get((family, tp))
        if child is None:
            child = parent.labels(tp.topic, str(tp.partition))
            self._children[(family, tp)] = child
        return child

    def forget_partition_gauges(self, tp: TopicPartition) -> None:
        """A released partition's gauges would be stale: drop them (counters stay, as counters
        must for rate())."""
        for gauge in (self.committed_offset, self.end_offset, self.lag, self.behind_log_start):
            try:
                gauge.remove(tp.topic, str(tp.partition))
            except KeyError:
                continue
