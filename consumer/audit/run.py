"""An audit: resolve the range, recompute it through the app in memory, compare each table
with the sink (`consumer.audit.compare`). Read-only: the real sink is only read, Kafka only
fetched from (manual assignment, no group, no commits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from consumer.audit.compare import Ranges, Sample, TableReport, compare_table, key_normalizer
from consumer.audit.memory import CountedDeadLetters, MemorySink
from consumer.core.app import App
from consumer.core.errors import ConfigError
from consumer.core.records import TopicPartition, replaces
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import BadRecordPolicy
from consumer.engine.client import PartitionReader
from consumer.engine.sink import Sink, StoredRowsReader
from consumer.engine.values import LimitedSink
from consumer.replay.job import ReplayOptions, run_replay
from consumer.replay.plan import PartitionRange, Progress, RangeRequest, ReplayPlan, resolve_plan

log = structlog.get_logger("offsetkeeper.audit")


@dataclass(frozen=True, slots=True)
class AuditRequest:
    """What to audit: `topic` (its `partitions`, default all) from `start` (default the log
    start) up to where `group` has committed (or an earlier end)."""

    topic: str
    group: str
    partitions: Sequence[int] | None = None
    start: RangeRequest | None = None
    sample: Sample = field(default_factory=Sample)
    max_examples: int = 5
    batch_max_records: int = 2000
    retries: int = 0


@dataclass(slots=True)
class AuditReport:
    topic: str
    group: str
    ranges: dict[int, tuple[int, int]]
    records: int
    bad_records: list[dict[str, Any]]
    tables: list[TableReport]
    sample: Sample

    @property
    def clean(self) -> bool:
        return all(table.clean for table in self.tables)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "group": self.group,
            "clean": self.clean,
            "ranges": {str(p): {"start": s, "end": e} for p, (s, e) in self.ranges.items()},
            "records_recomputed": self.records,
            "bad_records": self.bad_records,
            "sample": {"every": self.sample.every, "slice": self.sample.slice},
            "tables": [table.to_json() for table in self.tables],
        }


def audit_plan(
    reader: PartitionReader, sink: Sink, request: AuditRequest, label: str
) -> ReplayPlan:
    """The range per partition: from the requested start (default the log start) up to the
    group's checkpoint (a partition without one has nothing committed to audit)."""
    start = request.start
    if start is None:
        ranges = _from_log_start(reader, request.topic, request.partitions)
    else:
        plan = resolve_plan(
            reader,
            sink,
            job_id=label,
            topic=request.topic,
            partitions=request.partitions,
            request=start,
            fingerprint={},
        )
        ranges = list(plan.ranges)
    tps = [TopicPartition(request.topic, r.partition) for r in ranges]
    committed = sink.load_checkpoints(request.group, tps)
    clipped = []
    for r in ranges:
        checkpoint = committed.get(TopicPartition(request.topic, r.partition))
        end = r.start if checkpoint is None else min(r.end, checkpoint.next_offset)
        clipped.append(PartitionRange(r.partition, r.start, max(end, r.start)))
    return ReplayPlan(job_id=label, topic=request.topic, request={}, ranges=tuple(clipped))


def _from_log_start(
    reader: PartitionReader, topic: str, partitions: Sequence[int] | None
) -> list[PartitionRange]:
    existing = reader.partitions(topic)
    chosen = sorted(set(partitions)) if partitions else existing
    unknown = [p for p in chosen if p not in existing]
    if unknown:
        raise ConfigError("unknown partition", topic=topic, partition=unknown[0])
    ranges = []
    for partition in chosen:
        low, high = reader.watermarks(TopicPartition(topic, partition))
        ranges.append(PartitionRange(partition, low, high))
    return ranges


def recompute(
    app: App,
    reader: PartitionReader,
    sink: Sink,
    plan: ReplayPlan,
    *,
    decoders: TopicDecoders | None = None,
    batch_max_records: int = 2000,
    retries: int = 0,
    resolve: Callable[[Any], Any] | None = None,
) -> tuple[MemorySink, CountedDeadLetters, int]:
    """Run `plan` through the app into memory (the engine's own loop, the real sink's value
    limits); a record that fails is counted, as the live group dead-lettered or stopped on it."""
    if app.state is not None:
        raise ConfigError(
            "auditing a stateful app is not supported: its outputs depend on state the range "
            "does not hold",
            app=app.name,
        )
    memory = MemorySink(sink.value_limits if isinstance(sink, LimitedSink) else None)
    memory.open(app.tables)
    letters = CountedDeadLetters()
    summary = run_replay(
        app,
        reader,
        memory,
        plan,
        options=ReplayOptions(
            batch_max_records=batch_max_records,
            bad_records=BadRecordPolicy(action="dead-letter", retries=retries),
            resolve_awaitable=resolve,
        ),
        progress=Progress(f"audit {plan.topic}", plan.records),
        decoders=decoders,
        dead_letters=letters,
    )
    return memory, letters, summary.records


def run_audit(
    app: App,
    reader: PartitionReader,
    sink: Sink,
    request: AuditRequest,
    *,
    decoders: TopicDecoders | None = None,
    resolve: Callable[[Any], Any] | None = None,
) -> AuditReport:
    """Recompute the range and compare every table of the app with the sink."""
    rows_reader = _rows_reader(sink)
    plan = audit_plan(reader, sink, request, f"audit-{request.group}")
    log.info(
        "audit_starting",
        topic=plan.topic,
        group=request.group,
        ranges={r.partition: (r.start, r.end) for r in plan.ranges},
        records=plan.records,
    )
    memory, letters, records = recompute(
        app,
        reader,
        sink,
        plan,
        decoders=decoders,
        batch_max_records=request.batch_max_records,
        retries=request.retries,
        resolve=resolve,
    )
    ranges = Ranges({(plan.topic, r.partition): (r.start, r.end) for r in plan.ranges})
    reports = [
        compare_table(
            memory.tables[table.name],
            rows_reader.read_stored_rows(table),
            ranges,
            sample=request.sample,
            max_examples=request.max_examples,
        )
        for table in app.tables
    ]
    return AuditReport(
        topic=plan.topic,
        group=request.group,
        ranges={r.partition: (r.start, r.end) for r in plan.ranges},
        records=records,
        bad_records=[
            {
                "partition": letter.record.partition,
                "offset": letter.record.offset,
                "error": type(letter.error).__name__,
                "field": letter.error.field,
            }
            for letter in letters.letters
        ],
        tables=reports,
        sample=request.sample,
    )


def count_newer_rows(memory: MemorySink, sink: Sink) -> dict[str, int]:
    """Per upsert table: the stored rows whose position is newer than the range's write of
    their key, which `replay --overwrite-newer` overwrites (and the guard otherwise keeps)."""
    rows_reader = _rows_reader(sink)
    counts: dict[str, int] = {}
    for name, expected in memory.tables.items():
        table = expected.table
        if table.mode != "upsert":
            continue
        key_of = key_normalizer(table)
        written = {key_of(key): at for key, (_row, at) in expected.rows.items()}
        counts[name] = sum(
            1
            for values, position in rows_reader.read_stored_rows(table)
            if position is not None
            and (written_at := written.get(key_of(values.get(c) for c in table.key))) is not None
            and not replaces(written_at, position)
        )
    return counts


def _rows_reader(sink: Sink) -> StoredRowsReader:
    if not isinstance(sink, StoredRowsReader):
        raise ConfigError(
            "this sink cannot be read back row by row (the SQL sinks can)",
            sink=sink.description,
        )
    return sink
