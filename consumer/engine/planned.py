"""A run over fixed offset ranges: positions come from a plan (`[start, end)` per partition)
and the run's own checkpoints, records are read by manual assignment (no group membership,
no commits to Kafka), and the run ends when every partition reached its end or stopped.

`offsetkeeper replay` and `dlq replay --to pipeline` are such runs; the batch loop
(`consumer.engine.loop`) does the rest, exactly as for a consumer group member.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from consumer.checkpoints.model import Checkpoint
from consumer.core.errors import KafkaError, RecordError
from consumer.core.records import TopicPartition
from consumer.engine.client import PartitionReader
from consumer.engine.commit import CommittedBatch
from consumer.engine.data_loss import DataLossPolicy, lost_records, skip_loss
from consumer.engine.loop import BatchLoop
from consumer.engine.positions import Position

log = structlog.get_logger("offsetkeeper.engine")

# Idle polls before the reader's own position is asked: offsets can have gaps (compaction,
# transaction markers), so a position at or past the end also means done.
_IDLE_POLLS_BEFORE_POSITION_CHECK = 2


@dataclass(frozen=True, slots=True)
class PlannedSummary:
    """What a planned run did (this invocation; earlier runs of the same plan excluded)."""

    records: int
    rows: int
    duration_s: float
    resumed_from: dict[TopicPartition, int]
    stopped: dict[TopicPartition, RecordError]
    already_complete: bool = False
    dead_lettered: int = 0


@dataclass(slots=True)
class PlannedRun:
    """Drives a `BatchLoop` (whose `pause` is the reader's) over `ranges` with `reader`.

    The loop's group holds the run's checkpoints: a run killed at any instant resumes from
    them towards the same ends, and a second run of the same plan fences the first (its
    commit fails with `FencedError`, which the loop hands to its `on_fenced`).
    """

    loop: BatchLoop
    reader: PartitionReader
    ranges: Mapping[TopicPartition, tuple[int, int]]
    batch_max_records: int = 2000
    poll_timeout_s: float = 0.5
    should_stop: Callable[[], bool] = lambda: False
    # No progress towards the end for this long while records are due: the broker is gone.
    stall_timeout_s: float | None = None
    # Called once the work is known (records left), then with each commit's record count.
    on_started: Callable[[int], None] = lambda _records_left: None
    on_committed: Callable[[int], None] = lambda _records: None
    # Records gone from the log before they were read: stop the partition, or skip (reported).
    on_data_loss: DataLossPolicy = "stop"
    _remaining: set[TopicPartition] = field(default_factory=set)

    def run(self) -> PlannedSummary:
        loop = self.loop
        started = loop.clock()
        tps = sorted(self.ranges)
        stored = loop.retrier.sink(
            "load_checkpoints", lambda: loop.sink.load_checkpoints(loop.group, tps)
        )
        starts = {tp: self._start(tp, stored.get(tp)) for tp in tps}
        resumed_from = {tp: starts[tp] for tp in tps if tp in stored}
        self._remaining = {tp for tp in tps if starts[tp] < self.ranges[tp][1]}
        if resumed_from:
            log.info(
                "planned_run_resuming",
                group=loop.group,
                resumed_from={str(tp): offset for tp, offset in resumed_from.items()},
                records_left=sum(self.ranges[tp][1] - starts[tp] for tp in self._remaining),
            )
        if not self._remaining:
            return PlannedSummary(0, 0, 0.0, resumed_from, {}, already_complete=True)
        # A second run of this plan bumps these epochs, which fences this one.
        epochs = loop.retrier.sink("acquire", lambda: loop.sink.acquire(loop.group, tps))
        for tp in sorted(self._remaining):
            state = loop.initial_state(tp, stored.get(tp))
            loop.track(tp, Position(epochs[tp], starts[tp], end=self.ranges[tp][1], state=state))
            self._check_log(tp)
        self._assign()
        self.on_started(sum(self.ranges[tp][1] - self._next(tp) for tp in self._remaining))
        records, rows = loop.records_committed, loop.rows_committed
        try:
            self._consume()
            self._report(loop.settle())  # the batch in flight (pipelined loops)
        finally:
            loop.abandon()  # after a failure: wait for it, so the sink closes after it
        return PlannedSummary(
            records=loop.records_committed - records,
            rows=loop.rows_committed - rows,
            duration_s=loop.clock() - started,
            resumed_from=resumed_from,
            stopped=dict(loop.halted),
            dead_lettered=loop.dead_lettered,
        )

    def _consume(self) -> None:
        loop = self.loop
        idle_polls = 0
        progressed_at = loop.clock()
        while self._remaining and not self.should_stop():
            # A commit in flight: take what is there, else settle it rather than wait.
            in_flight = loop.in_flight
            timeout = 0.0 if in_flight else self.poll_timeout_s
            polled = self.reader.poll_batch(self.batch_max_records, timeout)
            committed: CommittedBatch | None = None
            if polled:
                committed = loop.step(polled)
            elif in_flight:
                committed = loop.settle()
            if committed is not None or (polled and loop.in_flight):
                idle_polls = 0
                progressed_at = loop.clock()
                self._report(committed)
            else:
                idle_polls += 1
                self._check_stall(progressed_at)
            lost = [tp for tp in self.reader.out_of_range() if tp in self._remaining]
            if lost:
                self._report(loop.settle())  # positions are final before they are compared
                for tp in lost:
                    self._check_log(tp)
                self._assign()
            self._retire_finished(check_positions=idle_polls >= _IDLE_POLLS_BEFORE_POSITION_CHECK)

    def _report(self, committed: CommittedBatch | None) -> None:
        if committed is not None:
            self.on_committed(committed.records)

    def _check_log(self, tp: TopicPartition) -> None:
        """Compare the partition's position with its log; records gone from it follow the
        data-loss policy (module consumer.engine.data_loss)."""
        position = self.loop.positions[tp]
        low, high = self.reader.watermarks(tp)
        loss = lost_records(tp, self._next(tp), low, high)
        if loss is None:
            return
        if self.on_data_loss == "skip":
            position.next_offset = skip_loss(loss, self.loop.observer, group=self.loop.group)
            return
        self.loop.stop(tp, loss, pause=False)  # left out of the next assignment
        self._remaining.discard(tp)

    def _assign(self) -> None:
        """(Re)assign the remaining partitions at their positions; finished ones retire."""
        self._remaining = {tp for tp in self._remaining if self._next(tp) < self.ranges[tp][1]}
        if self._remaining:
            self.reader.assign({tp: self._next(tp) for tp in sorted(self._remaining)})

    def _start(self, tp: TopicPartition, checkpoint: Checkpoint | None) -> int:
        """Where the run (re)starts: the plan's start, or past it where a checkpoint says so."""
        start = self.ranges[tp][0]
        return start if checkpoint is None else max(start, checkpoint.next_offset)

    def _next(self, tp: TopicPartition) -> int:
        position = self.loop.positions[tp]
        return self.ranges[tp][0] if position.next_offset is None else position.next_offset

    def _check_stall(self, progressed_at: float) -> None:
        limit = self.stall_timeout_s
        if limit is None or self.loop.clock() - progressed_at <= limit:
            return
        tp = sorted(self._remaining)[0]
        raise KafkaError(
            "no records arrive for a partition that has records left",
            topic=tp.topic,
            partition=tp.partition,
            position=self._next(tp),
            end=self.ranges[tp][1],
            waited_s=limit,
        )

    def _retire_finished(self, *, check_positions: bool) -> None:
        done = {tp for tp in self._remaining if tp in self.loop.halted}
        done |= {tp for tp in self._remaining if self._next(tp) >= self.ranges[tp][1]}
        if check_positions:
            for tp in self._remaining - done:
                position = self.reader.position(tp)
                if position is not None and position >= self.ranges[tp][1]:
                    done.add(tp)
        if done:
            self._remaining -= done
            self.reader.pause(sorted(done))
