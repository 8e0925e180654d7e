"""A consumer group member: positions come from group assignment, the loop runs until asked
to stop (or idle), and the batch loop (`consumer.engine.loop`) does the rest.

Batches are pipelined: one commits on the loop's committer thread while the driver polls and
processes the next. Polls take what the client holds and wait only when it holds nothing (or,
with a commit interval, until the batch fills or the interval ends); a poll that finds nothing
while a commit is in flight settles that commit instead of waiting. Every rebalance callback
(assigned, revoked, lost, out of range) settles the batch in flight first, so a revoked
partition's last batch is committed (or fenced) before it is released, and no half-written
batch is ever left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from consumer.checkpoints.model import Checkpoint
from consumer.core.app import App
from consumer.core.errors import (
    CheckpointError,
    FencedError,
    KafkaError,
    RecordError,
    RecordsLostError,
)
from consumer.core.exit_codes import EXIT_OK, EXIT_PARTITIONS_STOPPED
from consumer.core.records import RawRecord, TopicPartition
from consumer.core.urls import mask_url
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import BadRecordPolicy
from consumer.engine.client import ClientBackend, StartPosition
from consumer.engine.commit import CommittedBatch
from consumer.engine.data_loss import DataLossPolicy, lost_records, skip_loss
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.loop import BatchLoop
from consumer.engine.observer import EngineObserver
from consumer.engine.positions import Position
from consumer.engine.retry import RetryPolicy
from consumer.engine.sink import GroupBoundSink, Sink
from consumer.engine.state import DEFAULT_CACHE_BYTES

log = structlog.get_logger("offsetkeeper.engine")

ResetPolicy = Literal["earliest", "latest", "error"]

_MIN_RATE_WINDOW_S = 0.01  # below this a rate is noise


@dataclass(frozen=True, slots=True)
class EngineSettings:
    group: str
    topics: tuple[str, ...]
    reset_policy: ResetPolicy = "earliest"
    batch_max_records: int = 2000
    # A poll takes what the client holds; only when it holds nothing does it wait this long.
    poll_timeout_s: float = 0.5
    # Once a batch has a record, how long it may wait to fill up to batch_max_records (0: it
    # commits what there is; a longer interval means fewer, larger commits).
    commit_interval_s: float = 0.0
    # Exit once no record arrived for this long and every partition is caught up (None: never).
    stop_when_idle_s: float | None = None
    # How long sink failures are retried (capped exponential backoff) before giving up.
    sink_retry_deadline_s: float = 120.0
    sink_retry_max_backoff_s: float = 5.0
    # A record that fails: retried, then it stops its partition or becomes a dead letter.
    bad_records: BadRecordPolicy = field(default_factory=BadRecordPolicy)
    # Records gone from the log before they were read: stop the partition, or skip (reported).
    on_data_loss: DataLossPolicy = "stop"
    # Stateful apps: the byte budget of cached state entries.
    state_cache_bytes: int = DEFAULT_CACHE_BYTES


class Engine:
    """Runs one app in one consumer group until asked to stop. See the module docstring."""

    def __init__(
        self,
        app: App,
        settings: EngineSettings,
        backend: ClientBackend,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        observer: EngineObserver | None = None,
        decoders: TopicDecoders | None = None,
        dead_letters: DeadLetterWriter | None = None,
    ) -> None:
        self._app = app
        self._settings = settings
        self._backend = backend
        self._sink = sink
        self._loop = BatchLoop(
            app,
            sink,
            group=settings.group,
            retry=RetryPolicy(settings.sink_retry_deadline_s, settings.sink_retry_max_backoff_s),
            bad_records=settings.bad_records,
            decoders=decoders,
            dead_letters=dead_letters,
            observer=observer,
            clock=clock,
            sleep=sleep,
            pause=backend.pause,
            on_fenced=self._drop_fenced,
            state_cache_bytes=settings.state_cache_bytes,
            pipelined=True,
            on_committed=self._after_commit,
        )
        self._observer = self._loop.observer
        self._clock = clock
        self._stop_requested = False
        self._ever_assigned = False
        self._started = self._idle_since = self._last_commit_at = clock()
        self._first_record_at: float | None = None

    # -- control -----------------------------------------------------------------------------

    @property
    def resolve_awaitable(self) -> Callable[[Any], Any] | None:
        """Awaits an async processor's result (set by the asyncio driver); None: sync only."""
        return self._loop.resolve_awaitable

    @resolve_awaitable.setter
    def resolve_awaitable(self, resolve: Callable[[Any], Any] | None) -> None:
        self._loop.resolve_awaitable = resolve

    @property
    def records_committed(self) -> int:
        return self._loop.records_committed

    @property
    def batches_committed(self) -> int:
        return self._loop.batches_committed

    @property
    def rows_committed(self) -> int:
        return self._loop.rows_committed

    @property
    def dead_lettered(self) -> int:
        """Records written to the dead-letter topic (each acknowledged before its commit)."""
        return self._loop.dead_lettered

    def request_stop(self) -> None:
        """Finish and commit the batch in hand, then leave the group. Safe from a signal handler."""
        self._stop_requested = True
        self._observer.stopping()

    @property
    def stopped_partitions(self) -> dict[TopicPartition, RecordError]:
        """Partitions this member halted on a bad record (kept after they are revoked: leaving
        the group at the end revokes everything before `finish` reports)."""
        return dict(self._loop.halted)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def commit_in_flight(self) -> bool:
        """A batch is being committed while the driver goes on (see the module docstring)."""
        return self._loop.in_flight

    def run(self) -> int:
        """Consume until stopped (the synchronous driver); returns the process exit code."""
        self.start()
        self._backend.subscribe(self._settings.topics, self)
        settings = self._settings
        try:
            while not self._stop_requested:
                records = self._backend.poll_batch(
                    settings.batch_max_records,
                    0.0 if self.commit_in_flight else settings.poll_timeout_s,
                    settings.commit_interval_s,
                )
                if not self.step(records):
                    break
            self.settle()
        finally:
            self.abandon()  # after a failure: the sink is not closed under a commit
            self._backend.close()
            code = self.finish()
        return code

    # -- the steps every driver runs: start, step per poll, finish ---------------------------

    def start(self) -> None:
        """Open the sink (creating its tables) before the driver subscribes. A sink that is not
        up yet, or DDL that lost a deadlock to a running member, is retried like any sink call."""
        loop = self._loop
        loop.decoders.check(self._settings.topics)
        if loop.dead_letters is not None:
            dead_letters = loop.dead_letters
            loop.retrier.retry(
                "prepare_dead_letters",
                lambda: dead_letters.prepare(self._settings.topics),
                retry_on=(KafkaError,),
            )
        if isinstance(self._sink, GroupBoundSink):
            # Its transaction commits the offsets to Kafka: no advisory commit after it.
            self._sink.bind_group_metadata(self._backend.group_metadata)
        loop.retrier.sink("open", lambda: self._sink.open(self._app.tables))
        log.info(
            "consumer_starting",
            app=self._app.name,
            group=self._settings.group,
            topics=list(self._settings.topics),
            sink=mask_url(self._sink.description),  # a plugin sink may not mask it
        )
        self._started = self._idle_since = self._last_commit_at = self._clock()

    def step(self, records: Sequence[RawRecord]) -> bool:
        """Process one polled batch and hand it to be committed; False when the driver should
        stop (idle). An empty poll while a commit is in flight settles it."""
        self._observer.polled(len(records))
        if records:
            if self._first_record_at is None:
                self._first_record_at = self._clock()
            self._loop.step(records)
            self._idle_since = self._clock()
            return True
        if self.commit_in_flight:
            self.settle()
            return True
        if self._idle_long_enough(self._idle_since):
            log.info("consumer_idle_stop", idle_s=self._settings.stop_when_idle_s)
            return False
        return True

    def finish(self) -> int:
        """Close the sink after the driver left the group; returns the process exit code."""
        stopped = self.stopped_partitions
        self._sink.close()
        # The rate counts from the first record to the last commit: joining the group and
        # idling at the end are not throughput.
        first = self._first_record_at or self._last_commit_at
        busy = max(self._last_commit_at - first, 1e-9)
        log.info(
            "consumer_stopped",
            batches=self.batches_committed,
            records=self.records_committed,
            elapsed_s=round(self._clock() - self._started, 3),
            busy_s=round(busy, 3),
            records_per_s=(
                round(self.records_committed / busy, 1) if busy >= _MIN_RATE_WINDOW_S else None
            ),
            stopped_partitions=[str(tp) for tp in sorted(stopped)],
        )
        return EXIT_PARTITIONS_STOPPED if stopped else EXIT_OK

    def settle(self) -> None:
        """Wait for the batch in flight and apply its outcome (drivers: before they stop)."""
        self._loop.settle()

    def abandon(self) -> None:
        """Wait for the batch in flight without applying it, and stop the committer thread
        (drivers: when they end, after a failure too, before the sink and client close)."""
        self._loop.abandon()

    def _after_commit(self, committed: CommittedBatch) -> None:
        """Step 6, for each commit once applied: the advisory copy of the offsets in Kafka,
        for standard lag tools."""
        self._last_commit_at = self._clock()
        if not isinstance(self._sink, GroupBoundSink):
            self._backend.commit_advisory(committed.next_offsets)

    def _drop_fenced(self, exc: FencedError) -> None:
        dropped = [TopicPartition(topic, partition) for topic, partition in exc.partitions]
        next_offsets = self._loop.forget(dropped)
        self._backend.pause(dropped)
        self._observer.partitions_fenced(dropped)
        log.warning(
            "partitions_fenced",
            partitions=[str(tp) for tp in sorted(dropped)],
            next_offsets=next_offsets,
            reason="a newer owner took these partitions; this batch was rolled back for them",
        )

    # -- idleness ------------------------------------------------------------------------------

    def _idle_long_enough(self, idle_since: float) -> bool:
        limit = self._settings.stop_when_idle_s
        if limit is None or self._clock() - idle_since < limit:
            return False
        if not self._ever_assigned:
            return False  # still joining the group: idle is not done
        for tp, position in self._loop.positions.items():
            if position.stopped is not None:
                continue
            try:
                _low, high = self._backend.watermarks(tp)
            except KafkaError:
                return False  # cannot tell whether we are caught up: not idle
            if position.next_offset is None or position.next_offset < high:
                return False
        return True

    # -- RebalanceListener ---------------------------------------------------------------------

    def on_assigned(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, StartPosition | None]:
        self.settle()
        group = self._settings.group
        if not partitions:
            # Joined with nothing (yet) to own: ready, but not "assigned" for idleness. A member
            # given partitions is ready once it owns them (acquired, checkpoints read: the
            # observer's partitions_assigned), not while the sink is still being asked.
            self._observer.joined()
            return {}
        self._ever_assigned = True
        retrier = self._loop.retrier
        epochs = retrier.sink("acquire", lambda: self._sink.acquire(group, partitions))
        stored = retrier.sink(
            "load_checkpoints", lambda: self._sink.load_checkpoints(group, partitions)
        )
        starts: dict[TopicPartition, StartPosition | None] = {}
        for tp in partitions:
            checkpoint = stored.get(tp)
            start = self._start_of(tp, checkpoint)
            loss = None if checkpoint is None else self._checked(tp, checkpoint.next_offset)
            if loss is not None and self._settings.on_data_loss == "skip":
                start = skip_loss(loss, self._observer, group=group)
                loss = None
            self._loop.track(
                tp,
                Position(
                    epoch=epochs[tp],
                    next_offset=start if isinstance(start, int) else None,
                    state=self._loop.initial_state(tp, checkpoint),
                ),
            )
            if loss is not None:
                self._loop.stop(tp, loss, pause=False)  # the backend holds it (start None)
            starts[tp] = None if loss is not None else start
        self._observer.partitions_assigned(
            {tp: self._loop.positions[tp].next_offset for tp in partitions}
        )
        log.info(
            "partitions_assigned",
            partitions={str(tp): starts[tp] for tp in partitions},
            epochs={str(tp): epochs[tp] for tp in partitions},
        )
        return starts

    def _start_of(self, tp: TopicPartition, checkpoint: Checkpoint | None) -> StartPosition:
        if checkpoint is not None:
            return checkpoint.next_offset
        policy = self._settings.reset_policy
        if policy == "error":
            raise CheckpointError(
                "no checkpoint stored for partition and reset policy is 'error'",
                group=self._settings.group,
                topic=tp.topic,
                partition=tp.partition,
            )
        # The numeric offset the reset policy means now, so the position is known exactly (and
        # logged); the policy name itself when the broker cannot say.
        try:
            low, high = self._backend.watermarks(tp)
        except KafkaError as exc:
            log.warning(
                "reset_position_unresolved", topic=tp.topic, partition=tp.partition, error=str(exc)
            )
            return policy
        return low if policy == "earliest" else high

    def _checked(self, tp: TopicPartition, next_offset: int) -> RecordsLostError | None:
        """The records lost between the checkpoint and the log, if any (module data_loss)."""
        try:
            low, high = self._backend.watermarks(tp)
        except KafkaError as exc:
            # Not knowable now; a fetch outside the log is still caught (on_out_of_range).
            log.warning(
                "data_loss_unchecked", topic=tp.topic, partition=tp.partition, error=str(exc)
            )
            return None
        return lost_records(tp, next_offset, low, high)

    def on_out_of_range(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        """A fetch found these partitions' positions outside their logs: per the data-loss
        policy, go on from the log start (reported) or stop them (left out: paused)."""
        self.settle()
        go_on: dict[TopicPartition, int] = {}
        for tp in partitions:
            position = self._loop.positions.get(tp)
            if position is None or position.stopped is not None or position.next_offset is None:
                continue
            loss = self._checked(tp, position.next_offset)
            if loss is None:  # back within the log (or not knowable): fetch there again
                go_on[tp] = position.next_offset
            elif self._settings.on_data_loss == "skip":
                position.next_offset = skip_loss(loss, self._observer, group=self._settings.group)
                go_on[tp] = position.next_offset
            else:
                self._loop.stop(tp, loss)
        return go_on

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.settle()  # their last batch commits before they are released
        next_offsets = self._loop.forget(partitions)
        self._observer.partitions_revoked(partitions, lost=False)
        log.info(
            "partitions_revoked",
            partitions=[str(tp) for tp in partitions],
            next_offsets=next_offsets,
        )

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None:
        self.settle()  # the epoch check fences it if another member took them already
        next_offsets = self._loop.forget(partitions)
        self._observer.partitions_revoked(partitions, lost=True)
        log.warning(
            "partitions_lost",
            partitions=[str(tp) for tp in partitions],
            next_offsets=next_offsets,
        )
