"""Replay and backfill: read a chosen range with manual assignment and write it through the
same idempotent sink path as `run`, keeping the job's own checkpoint.

A job is identified by its job id. Its plan (per partition, the offsets [start, end) to read) is
resolved once, stored in the sink, and reused when the job is run again, so a job killed at any
instant resumes from its checkpoint towards the same end, and a finished job is not redone.
The live consumer group is never touched: no group membership, no commits to Kafka, and the
job's checkpoints live under their own group name, `replay:<job id>`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from consumer.checkpoints.state import load_state
from consumer.core.app import App
from consumer.core.errors import ConfigError, FencedError, RecordError
from consumer.core.records import RawRecord, TopicPartition
from consumer.deadletters.writer import DeadLetterWriter
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import (
    BadRecordPolicy,
    PartitionWork,
    group_by_partition,
    process_partition,
)
from consumer.engine.client import PartitionReader
from consumer.engine.commit import commit_batch
from consumer.engine.crash import CrashInjector
from consumer.engine.sink import Sink

log = structlog.get_logger("offsetkeeper.replay")

JOB_GROUP_PREFIX = "replay:"


def job_group(job_id: str) -> str:
    """The checkpoint group under which a replay job keeps its progress."""
    return f"{JOB_GROUP_PREFIX}{job_id}"


def parse_timestamp(text: str) -> int:
    """ISO 8601 to epoch milliseconds; a time without a zone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("not an ISO 8601 timestamp", timestamp=text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """Where a replay starts and ends, as the user asked (resolved into a plan per partition)."""

    from_offset: int | None = None
    from_timestamp: str | None = None
    from_checkpoint: str | None = None
    to_offset: int | None = None
    to_timestamp: str | None = None  # None for both "to" fields means: the end, at start time

    def __post_init__(self) -> None:
        starts = [self.from_offset, self.from_timestamp, self.from_checkpoint]
        if sum(s is not None for s in starts) != 1:
            raise ConfigError(
                "give exactly one of --from-offset, --from-timestamp, --from-checkpoint"
            )
        if self.to_offset is not None and self.to_timestamp is not None:
            raise ConfigError("give at most one of --to-offset, --to-timestamp, --to-end")
        for timestamp in (self.from_timestamp, self.to_timestamp):
            if timestamp is not None:
                parse_timestamp(timestamp)  # refuse a malformed time before anything is read
        if self.from_offset is not None and self.from_offset < 0:
            raise ConfigError("--from-offset must not be negative", offset=self.from_offset)
        if (
            self.from_offset is not None
            and self.to_offset is not None
            and self.to_offset < self.from_offset
        ):
            raise ConfigError(
                "--to-offset is before --from-offset",
                from_offset=self.from_offset,
                to_offset=self.to_offset,
            )
        if (
            self.from_timestamp is not None
            and self.to_timestamp is not None
            and parse_timestamp(self.to_timestamp) < parse_timestamp(self.from_timestamp)
        ):
            raise ConfigError(
                "--to-timestamp is before --from-timestamp",
                from_timestamp=self.from_timestamp,
                to_timestamp=self.to_timestamp,
            )


@dataclass(frozen=True, slots=True)
class PartitionRange:
    partition: int
    start: int
    end: int  # exclusive: the first offset not replayed

    @property
    def records(self) -> int:
        return max(self.end - self.start, 0)


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    job_id: str
    topic: str
    request: dict[str, Any]
    ranges: tuple[PartitionRange, ...]
    created_at: str = field(default_factory=lambda: datetime.now(tz=UTC).isoformat())

    def to_document(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "topic": self.topic,
                "request": self.request,
                "ranges": [asdict(r) for r in self.ranges],
                "created_at": self.created_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_document(cls, document: str) -> ReplayPlan:
        data = json.loads(document)
        return cls(
            job_id=data["job_id"],
            topic=data["topic"],
            request=data["request"],
            ranges=tuple(PartitionRange(**r) for r in data["ranges"]),
            created_at=data["created_at"],
        )

    @property
    def records(self) -> int:
        return sum(r.records for r in self.ranges)


def request_fingerprint(
    topic: str, partitions: Sequence[int] | None, app: str, request: RangeRequest
) -> dict[str, Any]:
    return {
        "topic": topic,
        "partitions": sorted(partitions) if partitions else None,
        "app": app,
        **{k: v for k, v in asdict(request).items() if v is not None},
    }


def default_job_id(fingerprint: dict[str, Any]) -> str:
    """Same request, same job id: re-running a killed replay command resumes it."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return f"{fingerprint['topic']}-{digest[:12]}"


def resolve_plan(
    reader: PartitionReader,
    sink: Sink,
    *,
    job_id: str,
    topic: str,
    partitions: Sequence[int] | None,
    request: RangeRequest,
    fingerprint: dict[str, Any],
) -> ReplayPlan:
    """Turn the request into offsets per partition, checking every bound against the log."""
    existing = reader.partitions(topic)
    chosen = sorted(set(partitions)) if partitions else existing
    unknown = [p for p in chosen if p not in existing]
    if unknown:
        raise ConfigError(
            "unknown partition", topic=topic, partition=unknown[0], partitions=len(existing)
        )
    tps = [TopicPartition(topic, p) for p in chosen]
    logs = {tp: reader.watermarks(tp) for tp in tps}
    starts = _resolve_starts(reader, sink, tps, logs, request)
    ends = _resolve_ends(reader, tps, logs, request)
    for tp in tps:
        if ends[tp] < starts[tp]:
            raise ConfigError(
                "the range ends before it starts",
                topic=topic,
                partition=tp.partition,
                start=starts[tp],
                end=ends[tp],
            )
    return ReplayPlan(
        job_id=job_id,
        topic=topic,
        request=fingerprint,
        ranges=tuple(PartitionRange(tp.partition, starts[tp], ends[tp]) for tp in tps),
    )


Logs = dict[TopicPartition, tuple[int, int]]


def check_in_log(tps: Sequence[TopicPartition], logs: Logs, offset: int, flag: str) -> None:
    for tp in tps:
        low, high = logs[tp]
        if not low <= offset <= high:
            raise ConfigError(
                f"{flag} is outside the partition's log",
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                log_start=low,
                log_end=high,
            )


def at_time_or_end(
    reader: PartitionReader, tps: Sequence[TopicPartition], logs: Logs, timestamp: str
) -> tuple[dict[TopicPartition, int], bool]:
    """First offset at/after the time per partition (the log end where none is), and whether
    any partition has a record that late at all."""
    found = reader.offsets_for_time(tps, parse_timestamp(timestamp))
    offsets: dict[TopicPartition, int] = {}
    for tp in tps:
        at_time = found.get(tp)
        offsets[tp] = logs[tp][1] if at_time is None else at_time
    return offsets, any(found.get(tp) is not None for tp in tps)


def _resolve_starts(
    reader: PartitionReader,
    sink: Sink,
    tps: Sequence[TopicPartition],
    logs: Logs,
    request: RangeRequest,
) -> dict[TopicPartition, int]:
    if request.from_offset is not None:
        check_in_log(tps, logs, request.from_offset, "--from-offset")
        return {tp: request.from_offset for tp in tps}
    if request.from_timestamp is not None:
        starts, any_record = at_time_or_end(reader, tps, logs, request.from_timestamp)
        if not any_record:
            raise ConfigError(
                "--from-timestamp is later than every record",
                topic=tps[0].topic,
                timestamp=request.from_timestamp,
            )
        return starts
    group = request.from_checkpoint or ""
    stored = sink.load_checkpoints(group, tps)
    missing = [tp for tp in tps if tp not in stored]
    if missing:
        raise ConfigError(
            "no checkpoint stored for the group",
            group=group,
            topic=missing[0].topic,
            partition=missing[0].partition,
        )
    return {tp: stored[tp].next_offset for tp in tps}


def _resolve_ends(
    reader: PartitionReader, tps: Sequence[TopicPartition], logs: Logs, request: RangeRequest
) -> dict[TopicPartition, int]:
    if request.to_offset is not None:
        check_in_log(tps, logs, request.to_offset, "--to-offset")
        return {tp: request.to_offset for tp in tps}
    if request.to_timestamp is not None:
        return at_time_or_end(reader, tps, logs, request.to_timestamp)[0]
    return {tp: logs[tp][1] for tp in tps}


@dataclass(slots=True)
class Progress:
    """A progress bar on a terminal; periodic `replay_progress` log lines otherwise."""

    job_id: str
    total: int
    out: TextIO = field(default_factory=lambda: sys.stderr)
    interval_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    _started: float = 0.0
    _last: float = 0.0

    def __post_init__(self) -> None:
        self._started = self._last = self.clock()

    def figures(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self._started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        return {
            "records_done": self.done,
            "records_total": self.total,
            "rate_per_s": round(rate, 1),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }

    def advance(self, records: int, *, final: bool = False) -> None:
        self.done += records
        now = self.clock()
        if not final and now - self._last < (0.2 if self.out.isatty() else self.interval_s):
            return
        self._last = now
        figures = self.figures()
        if self.out.isatty():
            fraction = min(self.done / self.total, 1.0) if self.total else 1.0
            width = 30
            bar = "#" * int(fraction * width)
            eta = figures["eta_s"]
            self.out.write(
                f"\r{self.job_id} [{bar:<{width}}] {self.done:,}/{self.total:,} "
                f"{figures['rate_per_s']:,.0f} rec/s ETA {'-' if eta is None else f'{eta:.0f}s'} "
            )
            if final:
                self.out.write("\n")
            self.out.flush()
        else:
            log.info("replay_progress", job=self.job_id, **figures)


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    job_id: str
    records: int
    rows: int
    duration_s: float
    resumed_from: dict[int, int]
    stopped: dict[int, RecordError]
    already_complete: bool = False
    dead_lettered: int = 0

    @property
    def rate_per_s(self) -> float:
        return self.records / self.duration_s if self.duration_s > 0 else 0.0


_IDLE_POLLS_BEFORE_POSITION_CHECK = 2


def run_replay(
    app: App,
    reader: PartitionReader,
    sink: Sink,
    plan: ReplayPlan,
    *,
    batch_max_records: int = 2000,
    poll_timeout_s: float = 0.5,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    decoders: TopicDecoders | None = None,
    bad_records: BadRecordPolicy | None = None,
    dead_letters: DeadLetterWriter | None = None,
) -> ReplaySummary:
    """Read every planned range to its end, committing rows and the job checkpoint together.
    Bad records follow `bad_records` (default: stop the partition); dead letters go through
    `dead_letters` before the batch that skips them commits."""
    policy = bad_records or BadRecordPolicy()
    if policy.action == "dead-letter" and dead_letters is None:
        raise ConfigError("the dead-letter policy needs a dead-letter topic writer")
    run = _ReplayRun(app, reader, sink, plan, decoders or TopicDecoders(app))
    run.bad_records = policy
    run.dead_letters = dead_letters
    return run.run(
        batch_max_records=batch_max_records,
        poll_timeout_s=poll_timeout_s,
        progress=progress,
        should_stop=should_stop,
    )


class _ReplayRun:
    def __init__(
        self,
        app: App,
        reader: PartitionReader,
        sink: Sink,
        plan: ReplayPlan,
        decoders: TopicDecoders,
    ) -> None:
        self._app = app
        self._reader = reader
        self._sink = sink
        self._plan = plan
        self._group = job_group(plan.job_id)
        self._ends = {TopicPartition(plan.topic, r.partition): r.end for r in plan.ranges}
        self._starts = {TopicPartition(plan.topic, r.partition): r.start for r in plan.ranges}
        self._positions: dict[TopicPartition, int] = {}
        self._states: dict[TopicPartition, Any] = {}
        self._remaining: set[TopicPartition] = set()
        self._stopped: dict[int, RecordError] = {}
        self._decode = decoders.for_topic(plan.topic)
        self._crash = CrashInjector.from_environment()
        self.bad_records = BadRecordPolicy()
        self.dead_letters: DeadLetterWriter | None = None
        self.dead_lettered = 0

    def run(
        self,
        *,
        batch_max_records: int,
        poll_timeout_s: float,
        progress: Progress | None,
        should_stop: Callable[[], bool],
    ) -> ReplaySummary:
        tps = list(self._ends)
        stored = self._sink.load_checkpoints(self._group, tps)
        for tp in tps:
            checkpoint = stored.get(tp)
            start = self._starts[tp]
            self._positions[tp] = (
                start if checkpoint is None else max(start, checkpoint.next_offset)
            )
            if self._app.state is not None:
                self._states[tp] = load_state(
                    self._app.state,
                    None if checkpoint is None else checkpoint.state,
                    None if checkpoint is None else checkpoint.state_version,
                    topic=tp.topic,
                    partition=tp.partition,
                )
        resumed_from = {tp.partition: self._positions[tp] for tp in tps if tp in stored}
        self._remaining = {tp for tp in tps if self._positions[tp] < self._ends[tp]}
        left = sum(self._ends[tp] - self._positions[tp] for tp in self._remaining)
        if resumed_from:
            log.info(
                "replay_resuming",
                job=self._plan.job_id,
                topic=self._plan.topic,
                resumed_from=resumed_from,
                records_left=left,
            )
        if not self._remaining:
            return ReplaySummary(self._plan.job_id, 0, 0, 0.0, resumed_from, {}, True)

        epochs = self._sink.acquire(self._group, tps)  # a second run of this job fences us
        self._reader.assign({tp: self._positions[tp] for tp in self._remaining})
        progress = progress or Progress(self._plan.job_id, left)
        records = rows = idle_polls = 0
        started = time.monotonic()
        while self._remaining and not should_stop():
            works = self._process(self._reader.poll_batch(batch_max_records, poll_timeout_s))
            if works:
                idle_polls = 0
                self._write_dead_letters(works)
                batch_records, batch_rows = self._commit(works, epochs)
                records += batch_records
                rows += batch_rows
                progress.advance(batch_records)
            else:
                idle_polls += 1
            self._retire_finished(check_positions=idle_polls >= _IDLE_POLLS_BEFORE_POSITION_CHECK)
        progress.advance(0, final=True)
        return ReplaySummary(
            self._plan.job_id,
            records,
            rows,
            time.monotonic() - started,
            resumed_from,
            self._stopped,
            dead_lettered=self.dead_lettered,
        )

    def _process(self, batch: Sequence[RawRecord]) -> list[PartitionWork]:
        works = []
        for tp, fetched in group_by_partition(batch).items():
            if tp not in self._remaining:
                continue
            position, end = self._positions[tp], self._ends[tp]
            wanted = [r for r in fetched if position <= r.offset < end]
            if wanted:
                works.append(
                    process_partition(
                        self._app,
                        self._decode,
                        tp,
                        wanted,
                        self._states.get(tp),
                        policy=self.bad_records,
                    )
                )
        return works

    def _write_dead_letters(self, works: Sequence[PartitionWork]) -> None:
        """Before the commit that skips them (see consumer.deadletters.writer)."""
        letters = [letter for work in works for letter in work.dead_letters]
        if letters and self.dead_letters is not None:
            self.dead_letters.write(letters)
            self.dead_lettered += len(letters)
            self._crash.at("after-dead-letters")

    def _commit(
        self, works: list[PartitionWork], epochs: dict[TopicPartition, int]
    ) -> tuple[int, int]:
        try:
            committed = commit_batch(
                self._sink,
                group=self._group,
                works=works,
                epochs=epochs,
                crash=self._crash,
                state_version=self._app.state.version if self._app.state else None,
            )
        except FencedError as exc:
            raise ConfigError(
                "another run of this replay job took over; this one stops",
                job=self._plan.job_id,
                partitions=sorted(exc.partitions),
            ) from exc
        self._positions.update(committed.next_offsets)
        for work in works:
            self._states[work.partition] = work.state
        for work in works:
            if work.error is not None:
                self._stop_partition(work.partition, work.error)
        return committed.records, committed.rows

    def _stop_partition(self, tp: TopicPartition, error: RecordError) -> None:
        self._stopped[tp.partition] = error
        self._remaining.discard(tp)
        self._reader.pause([tp])
        log.error(
            "partition_stopped",
            job=self._plan.job_id,
            topic=error.topic,
            partition=error.partition,
            offset=error.offset,
            field=error.field,
            error_type=type(error).__name__,
            error=str(error),
        )

    def _retire_finished(self, *, check_positions: bool) -> None:
        done = {tp for tp in self._remaining if self._positions[tp] >= self._ends[tp]}
        if check_positions:
            # Offsets can have gaps (compaction, transaction markers): the reader's position
            # at or past the end also means done.
            for tp in self._remaining - done:
                position = self._reader.position(tp)
                if position is not None and position >= self._ends[tp]:
                    done.add(tp)
        if done:
            self._remaining -= done
            self._reader.pause(sorted(done))
