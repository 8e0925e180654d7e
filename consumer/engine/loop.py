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

Pipelined (the group driver; stateless apps): steps 3-4 of batch N run on a committer thread
while the driver polls and processes batch N+1 from where N ends. At most one batch is in
flight; `settle` waits for it and does step 5 (and the recovery of a fenced or refused batch)
on the driver's thread, which drivers do before processing the next batch's commit, before
any change of assignment and before they stop. Crash points, per-partition order and the
guarantees are those of the in-line loop: each commit is still one sink transaction, and the
sink is never used by two threads at once.

Drivers differ only in where positions come from (`track` / `forget`) and when they stop:
`consumer.engine.group.Engine` (a consumer group member) and
`consumer.engine.planned.PlannedRun` (fixed offset ranges by manual assignment: replay and
dead-letter re-drive).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    PartitionWork,
    Unwrap,
    group_by_partition,
    process_partition,
)
from consumer.engine.commit import CommittedBatch, commit_batch
from consumer.engine.crash import CrashInjector
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.isolation import isolate
from consumer.engine.observer import EngineObserver, NullObserver
from consumer.engine.positions import Position
from consumer.engine.retry import Retrier, RetryPolicy
from consumer.engine.sink import GroupBoundSink, InterruptibleSink, Sink, StateStore
from consumer.engine.state import (
    DEFAULT_CACHE_BYTES,
    PartitionState,
    StateCache,
    open_partition_state,
)
from consumer.engine.values import LimitedSink, RowChecker

log = structlog.get_logger("offsetkeeper.engine")


@dataclass(slots=True)
class _InFlight:
    """The batch the committer thread is committing: its work, records and result."""

    future: Future[CommittedBatch]
    works: list[PartitionWork]
    taken: dict[TopicPartition, Sequence[RawRecord]]


# How often a wait for the committer thread returns to the interpreter. The kernel may deliver a
# SIGTERM to any thread; in another thread it only sets a flag, and the main thread, blocked
# untimed on a lock, would run the Python handler only when the commit ends: with the batch
# held on a database lock, the graceful stop did not even begin (no /readyz "shutting down").
SIGNAL_CHECK_S = 0.1


def wait_for_outcome(future: Future[Any]) -> BaseException | None:
    """The future's exception (None once it succeeded), waited for in short steps so that
    signal handlers run while it waits (see SIGNAL_CHECK_S)."""
    while True:
        try:
            return future.exception(timeout=SIGNAL_CHECK_S)
        except TimeoutError:
            continue


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
        on_committed: Callable[[CommittedBatch], None] | None = None,
        unwrap: Unwrap | None = None,
        state_cache_bytes: int = DEFAULT_CACHE_BYTES,
        pipelined: bool = False,
        overwrite_newer: bool = False,
    ) -> None:
        _check_state_store(app, sink)
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
        # Step 6 (the driver's), after each commit is applied and before the next is handed
        # to the committer thread.
        self._on_committed = on_committed
        self._unwrap = unwrap
        self.retrier = Retrier(
            retry or RetryPolicy(), clock=clock, sleep=sleep, observer=self.observer
        )
        self.checker = RowChecker(sink.value_limits if isinstance(sink, LimitedSink) else None)
        self.positions: dict[TopicPartition, Position] = {}
        self.state_cache = StateCache(state_cache_bytes)
        self.overwrite_newer = overwrite_newer  # replay --overwrite-newer (guarded sinks)
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
        # Pipelined: a batch commits on the committer thread while the next one is processed.
        self.pipelined = pipelined and _can_pipeline(app, sink)
        self._in_flight: _InFlight | None = None
        self._committer: ThreadPoolExecutor | None = None

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

    def state_schema(self) -> StateSchema:
        if self.app.state is None:
            raise ConfigError("state changes for a stateless app")
        return self.app.state

    # -- the step ------------------------------------------------------------------------------

    def step(self, records: Sequence[RawRecord]) -> CommittedBatch | None:
        """Steps 1-5 of the module docstring for one polled batch. In line: the batch
        committed, or None when nothing in it was ours. Pipelined: the batch goes to the
        committer thread once the one before it is settled, and that one is returned."""
        works, taken = self._take(records)
        if not self.pipelined:
            return self._commit_in_line(works, taken) if works else None
        committed = self.settle()
        works = self._still_based(works)
        if works:
            self._submit(works, taken)
        return committed

    def _take(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[PartitionWork], dict[TopicPartition, Sequence[RawRecord]]]:
        """Steps 1-2: each tracked partition's records from its position, processed."""
        works: list[PartitionWork] = []
        taken: dict[TopicPartition, Sequence[RawRecord]] = {}
        for tp, fetched in group_by_partition(records).items():  # 1
            position = self.positions.get(tp)
            if position is None or position.stopped is not None or position.halting:
                continue
            start = position.next_offset if position.ahead is None else position.ahead
            end = position.end
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
                works.append(self.process(tp, fresh, position.state))  # 2
        return works, taken

    def _commit_in_line(
        self, works: list[PartitionWork], taken: Mapping[TopicPartition, Sequence[RawRecord]]
    ) -> CommittedBatch | None:
        self.write_dead_letters(works)  # 3
        try:
            return self.commit_works(works)  # 4, 5
        except RowsRefusedError as exc:
            return isolate(self, works, taken, exc)

    # -- pipelined: one batch commits on the committer thread while the next is processed ----

    @property
    def in_flight(self) -> bool:
        """A batch is being committed on the committer thread."""
        return self._in_flight is not None

    def _submit(
        self, works: list[PartitionWork], taken: dict[TopicPartition, Sequence[RawRecord]]
    ) -> None:
        for work in works:
            position = self.positions[work.partition]
            position.ahead = work.next_offset
            position.halting = work.error is not None
        epochs = {work.partition: self.positions[work.partition].epoch for work in works}
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="offsetkeeper-commit")
        future = self._committer.submit(self._write_and_commit, works, epochs)
        self._in_flight = _InFlight(future, works, taken)

    def _write_and_commit(
        self, works: list[PartitionWork], epochs: Mapping[TopicPartition, int]
    ) -> CommittedBatch:
        """On the committer thread: steps 3 and 4. The main thread touches neither the sink
        nor the positions of these partitions until it settles the result."""
        self.write_dead_letters(works)
        return self._commit_once(works, epochs)

    def _commit_once(
        self, works: list[PartitionWork], epochs: Mapping[TopicPartition, int]
    ) -> CommittedBatch:
        """Steps 4 (one sink transaction), sink failures retried to the deadline."""
        return self.retrier.sink(
            "commit",
            functools.partial(
                commit_batch,
                self.sink,
                group=self.group,
                works=works,
                epochs=epochs,
                crash=self.crash,
                overwrite_newer=self.overwrite_newer,
            ),
        )

    def settle(self) -> CommittedBatch | None:
        """Wait for the batch in flight and apply its outcome (step 5): positions advance, or
        fenced partitions go to the driver and the rest commits again, or refused rows are
        isolated. Drivers settle before any change of assignment and before they stop."""
        in_flight = self._in_flight
        if in_flight is None:
            return None
        # Waits. An abort raised here (a second signal) leaves it in flight for `abandon`.
        error = wait_for_outcome(in_flight.future)
        self._in_flight = None
        self._clear_ahead(in_flight.works)
        if error is None:
            committed = in_flight.future.result()
            self._advance(in_flight.works, committed)
            return committed
        if isinstance(error, RowsRefusedError):
            return isolate(self, in_flight.works, in_flight.taken, error)
        if not isinstance(error, FencedError) or self._on_fenced is None:
            raise error
        self._on_fenced(error)  # the driver forgets them, or raises
        rest = [w for w in in_flight.works if w.partition in self.positions]
        if not rest:
            return None
        try:
            return self.commit_works(rest)
        except RowsRefusedError as refusal:
            return isolate(self, rest, in_flight.taken, refusal)

    def abandon(self) -> None:
        """Wait for the batch in flight without applying it (the driver is failing: the sink
        must not be used by two threads), and stop the committer thread. A batch still
        running is cut short where the sink can (`InterruptibleSink`): its transaction rolls
        back, and it is not retried."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._clear_ahead(in_flight.works)
            if not in_flight.future.done():  # a failure (or an abort) left it running
                self.retrier.cancel()
                if isinstance(self.sink, InterruptibleSink):
                    self.sink.interrupt()
            error = wait_for_outcome(in_flight.future)
            if error is not None:
                log.warning("in_flight_batch_failed", group=self.group, error=str(error))
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None

    def _clear_ahead(self, works: Sequence[PartitionWork]) -> None:
        for work in works:
            position = self.positions.get(work.partition)
            if position is not None:
                position.ahead, position.halting = None, False

    def _still_based(self, works: list[PartitionWork]) -> list[PartitionWork]:
        """The works processed while the batch before them was in flight whose partitions are
        still ours and moving, now that it settled. A settled batch commits all its records
        (up to where the next begins) unless its partition stopped or went away."""
        kept = []
        for work in works:
            position = self.positions.get(work.partition)
            if position is None or position.stopped is not None:
                continue
            if position.next_offset is not None and position.next_offset > work.first_offset:
                raise ConfigError(
                    "a pipelined batch does not follow the batch committed before it",
                    partition=str(work.partition),
                    committed=position.next_offset,
                    batch_from=work.first_offset,
                )
            kept.append(work)
        return kept

    def process(
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

    def write_dead_letters(self, works: Sequence[PartitionWork]) -> None:
        letters = [letter for work in works for letter in work.dead_letters]
        if not letters:
            return
        writer = self.dead_letters
        if writer is None:  # process_partition makes letters only under the dead-letter policy
            raise ConfigError("dead letters without a dead-letter topic writer")
        self.retrier.retry("dead_letters", lambda: writer.write(letters), retry_on=(KafkaError,))
        self.dead_lettered += len(letters)
        self.crash.at("after-dead-letters")

    def commit_works(self, works: list[PartitionWork]) -> CommittedBatch | None:
        while True:
            epochs = {work.partition: self.positions[work.partition].epoch for work in works}
            try:
                committed = self._commit_once(works, epochs)
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
        if self._on_committed is not None:
            self._on_committed(committed)

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


def _can_pipeline(app: App, sink: Sink) -> bool:
    """A stateful app commits in line: its state reads share the sink's connection. So does a
    sink that commits the offsets to Kafka itself (GroupBoundSink): its transaction takes the
    consumer's group metadata, and a kill -9 test of the Kafka sink once lost outputs under
    pipelining (the cause is not found yet)."""
    return app.state is None and not isinstance(sink, GroupBoundSink)


def _check_state_store(app: App, sink: Sink) -> None:
    if app.state is not None and not isinstance(sink, StateStore):
        raise ConfigError(
            f"the app {app.name!r} keeps state, and the sink {sink.description} cannot "
            "store keyed state (it does not implement consumer.StateStore)",
            sink=sink.description,
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
