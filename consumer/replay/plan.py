"""A replay job's plan: the range the user asked for, resolved against the log into offsets
[start, end) per partition, stored in the sink, and the progress display.

Replay reads a chosen range with manual assignment and writes it through the same idempotent
sink path as `run`, keeping the job's own checkpoint.

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

from consumer.core.errors import ConfigError
from consumer.core.records import TopicPartition
from consumer.engine.client import PartitionReader
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
    allow_data_loss: bool = False,
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
    starts = _resolve_starts(reader, sink, tps, logs, request, allow_data_loss=allow_data_loss)
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
    *,
    allow_data_loss: bool = False,
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
    starts = {tp: stored[tp].next_offset for tp in tps}
    for tp in tps:
        low = logs[tp][0]
        if starts[tp] >= low:
            continue
        where = {
            "group": group,
            "topic": tp.topic,
            "partition": tp.partition,
            "checkpoint": starts[tp],
            "log_start": low,
            "lost": low - starts[tp],
        }
        if not allow_data_loss:
            raise ConfigError(
                "the group's checkpoint is below the log start: records were deleted by "
                "retention before it read them (--on-data-loss skip starts at the log start)",
                **where,
            )
        log.error("records_lost", **where, action="the replay starts at the log start")
        starts[tp] = low
    return starts


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
