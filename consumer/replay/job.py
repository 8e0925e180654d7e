"""Running a replay job: its plan through the engine's one loop (`consumer.engine.planned`),
with the job's checkpoints under their own group, `replay:<job id>`.

The live consumer group is never touched: no group membership, no commits to Kafka. Sink
retries, schema registry waits, metrics and async processors work as they do for `run`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from consumer.core.app import App
from consumer.core.errors import ConfigError, FencedError, RecordError
from consumer.core.records import TopicPartition
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import BadRecordPolicy
from consumer.engine.client import PartitionReader
from consumer.engine.data_loss import DataLossPolicy
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.loop import BatchLoop
from consumer.engine.observer import EngineObserver
from consumer.engine.planned import PlannedRun, PlannedSummary
from consumer.engine.retry import RetryPolicy
from consumer.engine.sink import Sink
from consumer.engine.state import DEFAULT_CACHE_BYTES
from consumer.replay.plan import Progress, ReplayPlan, job_group


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

    @classmethod
    def of(cls, job_id: str, summary: PlannedSummary) -> ReplaySummary:
        """The planned run's summary, with partitions named by number (one topic)."""
        return cls(
            job_id=job_id,
            records=summary.records,
            rows=summary.rows,
            duration_s=summary.duration_s,
            resumed_from={tp.partition: offset for tp, offset in summary.resumed_from.items()},
            stopped={tp.partition: error for tp, error in summary.stopped.items()},
            already_complete=summary.already_complete,
            dead_lettered=summary.dead_lettered,
        )


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How a replay runs, apart from what it reads (the plan) and where it writes (the sink)."""

    batch_max_records: int = 2000
    poll_timeout_s: float = 0.5
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    bad_records: BadRecordPolicy = field(default_factory=BadRecordPolicy)
    # Records deleted from the log before the replay read them: stop the partition, or skip.
    on_data_loss: DataLossPolicy = "stop"
    # Awaits an async processor's result (the aiokafka reader's event loop); None: sync only.
    resolve_awaitable: Callable[[Any], Any] | None = None
    # Stateful apps: the byte budget of cached state entries.
    state_cache_bytes: int = DEFAULT_CACHE_BYTES
    # Rows replace newer rows of the same key (position-guarded sinks): a deliberate recompute.
    overwrite_newer: bool = False


def run_replay(
    app: App,
    reader: PartitionReader,
    sink: Sink,
    plan: ReplayPlan,
    *,
    options: ReplayOptions | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    decoders: TopicDecoders | None = None,
    dead_letters: DeadLetterWriter | None = None,
    observer: EngineObserver | None = None,
) -> ReplaySummary:
    """Read every planned range to its end, committing rows and the job checkpoint together.
    Bad records follow `options.bad_records` (default: stop the partition); dead letters go
    through `dead_letters` before the batch that skips them commits."""
    options = options or ReplayOptions()
    loop = BatchLoop(
        app,
        sink,
        group=job_group(plan.job_id),
        retry=options.retry,
        bad_records=options.bad_records,
        decoders=decoders,
        dead_letters=dead_letters,
        observer=observer,
        pause=reader.pause,
        on_fenced=functools.partial(_another_run_took_over, plan.job_id),
        state_cache_bytes=options.state_cache_bytes,
        pipelined=True,
        overwrite_newer=options.overwrite_newer,
    )
    loop.resolve_awaitable = options.resolve_awaitable
    ranges = {TopicPartition(plan.topic, r.partition): (r.start, r.end) for r in plan.ranges}
    shown: list[Progress] = [] if progress is None else [progress]

    def started(records_left: int) -> None:
        if not shown:
            shown.append(Progress(plan.job_id, records_left))

    run = PlannedRun(
        loop,
        reader,
        ranges,
        batch_max_records=options.batch_max_records,
        poll_timeout_s=options.poll_timeout_s,
        should_stop=should_stop,
        on_data_loss=options.on_data_loss,
        on_started=started,
        on_committed=lambda records: shown[0].advance(records),  # noqa: PLW0108 - bound late
    )
    summary = run.run()
    if shown and not summary.already_complete:
        shown[0].advance(0, final=True)
    return ReplaySummary.of(plan.job_id, summary)


def _another_run_took_over(job_id: str, exc: FencedError) -> None:
    raise ConfigError(
        "another run of this replay job took over; this one stops",
        job=job_id,
        partitions=sorted(exc.partitions),
    ) from exc
