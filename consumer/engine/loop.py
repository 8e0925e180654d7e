"""The one batch loop. Every record offsetkeeper processes, for `run`, `replay` and
`dlq replay --to pipeline`, goes through `BatchLoop.step`.

One step, for one polled batch:

    1. Keep each tracked partition's records from its position up to its end. Older ones
       were committed already (a fetch raced a seek); records of partitions that are not
       tracked, or are stopped on a bad record, are dropped unprocessed.
    2. Decode and process them per partition (`process_partition`); bad records follow the
       bad-record policy. A schema registry outage is waited out to the retry deadline,
       never blamed on the records.
    3. Write the batch's dead letters and wait until the broker acknowledged each (commit
       step 0): no offset past a dead letter commits without it.
    4. Commit rows and checkpoints in one sink transaction (`commit_batch`); sink failures
       are retried with capped backoff to the deadline. A fenced partition goes to the
       driver (`on_fenced`), and the rest of the batch is committed again without it.
    5. Advance positions and state; stop a partition whose record failed under "stop".
    6. Tell the driver (`on_committed`): the group driver copies the offsets to Kafka.

Drivers differ only in where positions come from (`track` / `forget`) and when they stop:
`consumer.engine.group.Engine` (a consumer group member) and
`consumer.engine.planned.PlannedRun` (fixed offset ranges by manual assignment: replay and
dead-letter re-drive).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from consumer.checkpoints.model import Checkpoint
from consumer.core.app import App, StateSchema
from consumer.core.errors import (
    ConfigError,
    FencedError,
    KafkaError,
    RecordError,
    RowsRefusedError,
    SchemaRegistryError,
    SinkError,
)
from consumer.core.records import RawRecord, TopicPartition
from consumer.decoding.decoders import Decoder
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import (
    BadRecordPolicy,
    DeadLetter,
    PartitionWork,
    Unwrap,
    group_by_partition,
    process_partition,
)
from consumer.engine.commit import CommittedBatch, commit_batch
from consumer.engine.crash import CrashInjector
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.observer import EngineObserver, NullObserver
from consumer.engine.retry import Retrier, RetryPolicy
from consumer.engine.sink import Sink, StateStore
from consumer.engine.state import (
    DEFAULT_CACHE_BYTES,
    BatchState,
    PartitionState,
    StateCache,
    open_partition_state,
)
from consumer.engine.values import LimitedSink, RowChecker

log = structlog.get_logger("offsetkeeper.engine")


@dataclass(slots=True)
class Position:
    """A partition the loop works on: its fencing epoch, the next offset to process (None
    until the client reports one), where to stop (exclusive; None: never), and its state."""

    epoch: int
    next_offset: int | None
    end: int | None = None
    state: PartitionState | None = None  # stateful apps: the state as of next_offset
    stopped: RecordError | None = None


class BatchLoop:
    """Processes and commits polled batches for the partitions its driver tracks."""

    def __init__(
        self,
        app: App,
        sink: Sink,
        *,
        group: str,
        retry: RetryPolicy | None = None,
        bad_records: BadRecordPolicy | None = None,
        decoders: TopicDecoders | None = None,
        dead_letters: DeadLetterWriter | None = None,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        pause: Callable[[Sequence[TopicPartition]], None] = lambda _partitions: None,
        on_fenced: Callable[[FencedError], None] | None = None,
        unwrap: Unwrap | None = None,
        state_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if app.state is not None and not isinstance(sink, StateStore):
            raise ConfigError(
                f"the app {app.name!r} keeps state, and the sink {sink.description} cannot "
                "store keyed state (it does not implement consumer.StateStore)",
                sink=sink.description,
            )
        self.app = app
        self.sink = sink
        self.group = group
        self.bad_records = bad_records or BadRecordPolicy()
        if self.bad_records.action == "dead-letter" and dead_letters is None:
            raise ConfigError("the dead-letter policy needs a dead-letter topic writer")
        self.decoders = decoders or TopicDecoders(app)
        self.dead_letters = dead_letters
        self.observer: EngineObserver = observer or NullObserver()
        self.clock = clock
        self._sleep = sleep
        self._pause = pause
        self._on_fenced = on_fenced
        self._unwrap = unwrap
        self.retrier = Retrier(
            retry or RetryPolicy(), clock=clock, sleep=sleep, observer=self.observer
        )
        self.checker = RowChecker(sink.value_limits if isinstance(sink, LimitedSink) else None)
        self.positions: dict[TopicPartition, Position] = {}
        self.state_cache = StateCache(state_cache_bytes)
        # Partitions halted on a bad record. Kept when they are forgotten (leaving the group
        # revokes everything before the driver reports); dropped when tracked again.
        self.halted: dict[TopicPartition, RecordError] = {}
        self.crash = CrashInjector.from_environment()
        self.records_committed = 0
        self.rows_committed = 0
        self.batches_committed = 0
        self.dead_lettered = 0
        # Awaits an async processor's result (set by an asyncio driver); None: sync only.
        self.resolve_awaitable: Callable[[Any], Any] | None = None

    # -- positions: the drivers' side ----------------------------------------------------------

    def track(self, partition: TopicPartition, position: Position) -> None:
        """Work on `partition` from `position` (on assignment, or at the start of a plan)."""
        self.halted.pop(partition, None)
        self.positions[partition] = position

    def forget(self, partitions: Sequence[TopicPartition]) -> dict[str, int | None]:
        """Stop working on the partitions; returns where each stood (its next offset)."""
        forgotten: dict[str, int | None] = {}
        for tp in partitions:
            position = self.positions.pop(tp, None)
            if position is not None:
                forgotten[str(tp)] = position.next_offset
                if position.state is not None:  # its cached entries age out of the cache
                    self.state_cache.release(position.state.slot)
        return forgotten

    def initial_state(
        self, tp: TopicPartition, checkpoint: Checkpoint | None
    ) -> PartitionState | None:
        """The partition's committed keyed state at its checkpoint (None: stateless app)."""
        if self.app.state is None or not isinstance(self.sink, StateStore):
            return None
        return self.retrier.sink(
            "state_load",
            lambda: open_partition_state(self.sink, self.state_cache, self.group, tp, checkpoint),  # type: ignore[arg-type]
        )

    def _state_schema(self) -> StateSchema:
        if self.app.state is None:
            raise ConfigError("state changes for a stateless app")
        return self.app.state

    # -- the step ------------------------------------------------------------------------------

    def step(self, records: Sequence[RawRecord]) -> CommittedBatch | None:
        """Steps 1-5 of the module docstring for one polled batch; the batch committed, or
        None when nothing in it was ours to process."""
        works: list[PartitionWork] = []
        taken: dict[TopicPartition, Sequence[RawRecord]] = {}
        for tp, fetched in group_by_partition(records).items():  # 1
            position = self.positions.get(tp)
            if position is None or position.stopped is not None:
                continue
            start, end = position.next_offset, position.end
            fresh = fetched
            if (start is not None and fetched[0].offset < start) or (
                end is not None and fetched[-1].offset >= end
            ):
                fresh = [
                    r
                    for r in fetched
                    if (start is None or r.offset >= start) and (end is None or r.offset < end)
                ]
            if fresh:
                self.observer.records_fetched(tp, len(fresh))
                taken[tp] = fresh
                works.append(self._process(tp, fresh, position.state))  # 2
        if not works:
            return None
        self._write_dead_letters(works)  # 3
        try:
            return self._commit(works)  # 4, 5
        except RowsRefusedError as exc:
            return self._isolate(works, taken, exc)

    def _process(
        self,
        tp: TopicPartition,
        records: Sequence[RawRecord],
        state: PartitionState | None,
        skip: frozenset[int] = frozenset(),
    ) -> PartitionWork:
        """Process one partition's records; `skip` names offsets already handled (records
        dead-lettered before the batch was split), which only advance the position."""
        decode = self.decoders.for_topic(tp.topic) if self._unwrap is None else _no_decoder
        unwrap = self._unwrap
        if skip:
            unwrap = _skipping(skip, decode, self._unwrap)
        return self.retrier.retry(
            "decode",
            lambda: process_partition(
                self.app,
                decode,
                tp,
                records,
                state,
                resolve=self.resolve_awaitable,
                policy=self.bad_records,
                sleep=self._sleep,
                unwrap=unwrap,
                checker=self.checker,
            ),
            # A registry outage, or the sink failing a state read, is waited out.
            retry_on=(SchemaRegistryError, SinkError),
        )

    def _write_dead_letters(self, works: Sequence[PartitionWork]) -> None:
        letters = [letter for work in works for letter in work.dead_letters]
        if not letters:
            return
        writer = self.dead_letters
        if writer is None:  # process_partition makes letters only under the dead-letter policy
            raise ConfigError("dead letters without a dead-letter topic writer")
        self.retrier.retry("dead_letters", lambda: writer.write(letters), retry_on=(KafkaError,))
        self.dead_lettered += len(letters)
        self.crash.at("after-dead-letters")

    def _commit(self, works: list[PartitionWork]) -> CommittedBatch | None:
        while True:
            epochs = {work.partition: self.positions[work.partition].epoch for work in works}
            try:
                committed = self.retrier.sink(
                    "commit",
                    functools.partial(
                        commit_batch,
                        self.sink,
                        group=self.group,
                        works=works,
                        epochs=epochs,
                        crash=self.crash,
                    ),
                )
            except FencedError as exc:
                if self._on_fenced is None:
                    raise
                self._on_fenced(exc)  # the driver forgets them, or raises
                works = [w for w in works if w.partition in self.positions]
                if not works:
                    return None
                continue
            self._advance(works, committed)
            return committed

    def _advance(self, works: Sequence[PartitionWork], committed: CommittedBatch) -> None:
        for tp, next_offset in committed.next_offsets.items():
            self.positions[tp].next_offset = next_offset
        for work in works:
            state = self.positions[work.partition].state
            if state is not None and work.next_offset > work.first_offset:
                state.apply(work.state_changes)
        self.records_committed += committed.records
        self.rows_committed += committed.rows
        self.batches_committed += 1
        self.observer.batch_committed(works, committed)
        log.debug(
            "batch_committed",
            group=self.group,
            records=committed.records,
            rows=committed.rows,
            offsets={
                str(w.partition): (w.first_offset, w.next_offset - 1)
                for w in works
                if w.next_offset > w.first_offset
            },
        )
        for work in works:
            if work.error is not None:
                self.stop(work.partition, work.error)

    # -- a batch the sink refused: find the records responsible ---------------------------------

    def _isolate(
        self,
        works: Sequence[PartitionWork],
        taken: Mapping[TopicPartition, Sequence[RawRecord]],
        refusal: RowsRefusedError,
    ) -> CommittedBatch | None:
        """Commit each partition on its own, halving a refused part until the refused records
        stand alone; those follow the bad-record policy, the rest commits. Each part is a
        complete commit (rows and checkpoint), so a crash at any point loses nothing."""
        log.warning(
            "rows_refused_isolating",
            group=self.group,
            error=str(refusal),
            partitions=[str(w.partition) for w in works],
        )
        before = (self.records_committed, self.rows_committed)
        for work in works:
            position = self.positions.get(work.partition)
            if position is None or position.stopped is not None:
                continue
            lettered = frozenset(letter.record.offset for letter in work.dead_letters)
            self._settle(work.partition, taken[work.partition], position.state, lettered, work)
        moved = {
            w.partition: self.positions[w.partition].next_offset
            for w in works
            if w.partition in self.positions
        }
        return CommittedBatch(
            next_offsets={tp: offset for tp, offset in moved.items() if offset is not None},
            records=self.records_committed - before[0],
            rows=self.rows_committed - before[1],
        )

    def _settle(
        self,
        tp: TopicPartition,
        records: Sequence[RawRecord],
        state: PartitionState | None,
        lettered: frozenset[int],
        work: PartitionWork | None = None,
    ) -> bool:
        """Commit `records` from `state`, halving on a refusal; False once the partition
        stopped (a record under policy "stop") or was taken away."""
        if work is None:
            work = self._process(tp, records, state, lettered)
            self._write_dead_letters([work])
        try:
            self._commit([work])
            self.crash.at("after-split-part")
        except RowsRefusedError as refusal:
            if len(records) == 1:
                return self._refused_record(tp, records[0], state, refusal)
            half = len(records) // 2
            if not self._settle(tp, records[:half], state, lettered):
                return False
            return self._settle(tp, records[half:], self.positions[tp].state, lettered)
        position = self.positions.get(tp)
        return position is not None and position.stopped is None

    def _refused_record(
        self,
        tp: TopicPartition,
        raw: RawRecord,
        state: PartitionState | None,
        refusal: RowsRefusedError,
    ) -> bool:
        """The sink refuses this record's rows: a bad record, handled by the policy."""
        error = RecordError(
            f"the sink refused the record's rows: {refusal.message}",
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            field=refusal.context.get("field"),
            table=refusal.context.get("table"),
        )
        error.__cause__ = refusal
        if self.bad_records.action == "stop":
            self.stop(tp, error)
            return False
        skipped = PartitionWork(tp, first_offset=raw.offset, next_offset=raw.offset + 1, records=1)
        if state is not None:  # the refused record's effect is not kept; a blob's entries are
            skipped.state_changes = BatchState(state, self._state_schema()).changes()
        skipped.leader_epoch = raw.leader_epoch
        letter = DeadLetter(record=raw, error=error, attempts=1)
        skipped.dead_letters.append(letter)
        self._write_dead_letters([skipped])
        self._commit([skipped])
        position = self.positions.get(tp)
        return position is not None and position.stopped is None

    def stop(self, tp: TopicPartition, error: RecordError, *, pause: bool = True) -> None:
        """Halt a tracked partition at `error.offset`: nothing more of it is processed (the
        driver's exit code says so). Without `pause` where the client does not fetch it yet
        (the driver holds it itself)."""
        self.positions[tp].stopped = error
        self.halted[tp] = error
        if pause:
            self._pause([tp])
        self.observer.partition_stopped(tp, error)
        log.error(
            "partition_stopped",
            group=self.group,
            topic=error.topic,
            partition=error.partition,
            offset=error.offset,
            field=error.field,
            error_type=type(error).__name__,
            error=str(error),
            committed_up_to=self.positions[tp].next_offset,
        )


def _skipping(skip: frozenset[int], decode: Decoder, inner: Unwrap | None) -> Unwrap:
    """An unwrap that passes over the offsets in `skip`, else defers to `inner` (or keeps the
    record as it is, with the partition's decoder)."""

    def unwrap(raw: RawRecord) -> tuple[RawRecord, Decoder] | None:
        if raw.offset in skip:
            return None
        return (raw, decode) if inner is None else inner(raw)

    return unwrap


def _no_decoder(value: bytes | None) -> Any:
    """Stands in for the partition's decoder when an unwrap names each record's own."""
    raise ConfigError("an unwrapped record came without its decoder")
