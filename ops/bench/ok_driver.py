"""Contender: offsetkeeper's Engine + ConfluentBackend into a chosen sink (one process, one run).

It builds the engine exactly as `offsetkeeper run` does (consumer/_cli_run.py), minus the
operations server, and observes it through the `EngineObserver` hooks: the first records, each
committed batch with its offset ranges (checked later: every offset committed exactly once), and
optionally per-record latency (commit time minus the producer's `ts_ms`).

    ok_driver.py --encoding json --sink postgresql --sink-url URL --bootstrap B --group G
                 --topic T --result FILE [--latency] [--profile FILE] [-X key=value ...]
                 [--app MODULE:ATTR] [--state-cache-mb N]

`--app` runs another app than `ok_app`'s (the keyed-state bench's `state_app`); `--state-cache-mb`
is `offsetkeeper run --state-cache-mb` (the byte budget of a stateful app's cached entries).
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import ok_app
from bench_sinks import KafkaOffsetsOnlySink, NullSink, SplitTransactionSink
from timing import RunClock

from consumer import Sink, load_app, open_sink
from consumer.backends.confluent import ConfluentBackend
from consumer.core.errors import RecordError, SinkError
from consumer.core.records import TopicPartition
from consumer.decoding.topics import DecodeSettings, TopicDecoders
from consumer.engine.batch import PartitionWork
from consumer.engine.commit import CommittedBatch
from consumer.engine.group import Engine, EngineSettings
from consumer.engine.state import DEFAULT_CACHE_BYTES
from consumer.runtime.logs import configure_logging

SINK_KINDS = ("sqlite", "postgresql", "null", "split", "kafka-offsets")


class BenchObserver:
    """`EngineObserver` that feeds a RunClock and records each partition's committed ranges."""

    def __init__(self, clock: RunClock, stop_after: int | None = None) -> None:
        self.clock = clock
        self.stop_after = stop_after
        self.on_enough: Callable[[], None] = lambda: None
        self.ranges: dict[int, list[tuple[int, int]]] = {}
        self.assignments = 0
        self.first_joined_at: float | None = None
        self.first_assigned_at: float | None = None

    def polled(self, records: int) -> None:
        if records:
            self.clock.fetched(records)

    def records_fetched(self, partition: TopicPartition, records: int) -> None:
        pass

    def batch_committed(self, works: Sequence[PartitionWork], committed: CommittedBatch) -> None:
        ts = None
        if self.clock.latency:
            ts = [values["ts_ms"] for work in works for _t, _k, values, _raw in work.rows]
        self.clock.committed(committed.records, ts)
        if self.stop_after is not None and self.clock.records >= self.stop_after:
            self.on_enough()
        for work in works:
            if work.next_offset > work.first_offset:
                self.ranges.setdefault(work.partition.partition, []).append(
                    (work.first_offset, work.next_offset)
                )

    def sink_succeeded(self, action: str, duration_s: float) -> None:
        pass

    def sink_failed(self, action: str, error: SinkError) -> None:
        pass

    def joined(self) -> None:
        # Called as an assignment starts (before the sink's acquire, checkpoints and, for a
        # stateful app, loading its state): first_assigned_at - first_joined_at is that load.
        if self.first_joined_at is None:
            self.first_joined_at = time.time()

    def partitions_assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        self.assignments += 1
        if starts and self.first_assigned_at is None:
            self.first_assigned_at = time.time()

    def partitions_revoked(self, partitions: Sequence[TopicPartition], *, lost: bool) -> None:
        pass

    def partitions_fenced(self, partitions: Sequence[TopicPartition]) -> None:
        pass

    def partition_stopped(self, partition: TopicPartition, error: RecordError) -> None:
        pass

    def stopping(self) -> None:
        pass


def make_sink(kind: str, url: str | None) -> Sink:
    if kind == "null":
        return NullSink()
    if url is None:
        raise SystemExit(f"--sink {kind} needs --sink-url")
    inner = open_sink(url)
    if kind == "split":
        return SplitTransactionSink(inner)
    if kind == "kafka-offsets":
        return KafkaOffsetsOnlySink(inner)
    return inner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoding", choices=["json", "avro"], required=True)
    parser.add_argument("--sink", choices=SINK_KINDS, required=True)
    parser.add_argument("--sink-url")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--batch-max-records", type=int, default=2000)
    parser.add_argument("--poll-timeout", type=float, default=0.5)
    parser.add_argument("--commit-interval", type=float, default=0.0)
    parser.add_argument("--stop-when-idle", type=float, default=2.0)
    parser.add_argument(
        "--stop-after-records",
        type=int,
        help="request a stop once this many records are committed (instead of idling)",
    )
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--first-commit-file")
    parser.add_argument("--profile", help="write cProfile stats of engine.run() to this file")
    parser.add_argument("--app", help="MODULE:ATTR of the app (default: ok_app's, per encoding)")
    parser.add_argument("--state-cache-mb", type=int, help="a stateful app's state cache budget")
    parser.add_argument("-X", dest="kafka", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    configure_logging("info", "json")
    kafka_config = dict(item.split("=", 1) for item in args.kafka)
    clock = RunClock(latency=args.latency, first_commit_file=args.first_commit_file)
    observer = BenchObserver(clock, args.stop_after_records)
    app = load_app(args.app) if args.app else ok_app.app_for(args.encoding)
    cache_bytes = DEFAULT_CACHE_BYTES if args.state_cache_mb is None else args.state_cache_mb << 20
    schema_dir = ok_app.write_schema_dir(Path(tempfile.mkdtemp(prefix="ok-bench-schemas-")))
    engine = Engine(
        app,
        EngineSettings(
            group=args.group,
            topics=(args.topic,),
            batch_max_records=args.batch_max_records,
            poll_timeout_s=args.poll_timeout,
            commit_interval_s=args.commit_interval,
            stop_when_idle_s=None if args.stop_after_records else args.stop_when_idle,
            state_cache_bytes=cache_bytes,
        ),
        ConfluentBackend(
            bootstrap_servers=args.bootstrap, group=args.group, client_config=kafka_config
        ),
        make_sink(args.sink, args.sink_url),
        observer=observer,
        decoders=TopicDecoders(app, DecodeSettings(schema_dir=str(schema_dir))),
    )

    def stop(_signum: int, _frame: FrameType | None) -> None:
        engine.request_stop()

    observer.on_enough = engine.request_stop
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    outcome: dict[str, Any] = {}
    if args.profile:
        profiler = cProfile.Profile()
        outcome["exit_code"] = profiler.runcall(engine.run)
        profiler.dump_stats(args.profile)
    else:
        outcome["exit_code"] = engine.run()
    clock.extra.update(
        outcome,
        ranges={str(p): r for p, r in sorted(observer.ranges.items())},
        assignments=observer.assignments,
        first_joined_at=observer.first_joined_at,
        first_assigned_at=observer.first_assigned_at,
    )
    clock.write(args.result)
    return int(outcome["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
