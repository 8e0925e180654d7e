"""The partition loop: poll a batch, process it per partition, commit it through the sink.

The loop is single-threaded and commits each batch before it polls again, so when the backend
reports a revocation (from inside `poll_batch`) no batch is in flight: every record already
returned is either committed, or belongs to a partition stopped on a bad record. Revocation
therefore only has to forget the partitions; it can never leave a half-written batch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog

from consumer.checkpoints.model import Checkpoint
from consumer.checkpoints.state import load_state
from consumer.core.app import App
from consumer.core.errors import (
    CheckpointError,
    ConfigError,
    FencedError,
    KafkaError,
    RecordError,
    SchemaRegistryError,
    SinkError,
)
from consumer.core.records import RawRecord, TopicPartition
from consumer.deadletters.writer import DeadLetterWriter
from consumer.decoding.topics import TopicDecoders
from consumer.engine.batch import (
    BadRecordPolicy,
    PartitionWork,
    group_by_partition,
    process_partition,
)
from consumer.engine.client import ClientBackend, StartPosition
from consumer.engine.commit import commit_batch
from consumer.engine.crash import CrashInjector
from consumer.engine.observer import EngineObserver, NullObserver
from consumer.engine.sink import GroupBoundSink, Sink

log = structlog.get_logger("offsetkeeper.engine")

ResetPolicy = Literal["earliest", "latest", "error"]
T = TypeVar("T")

_MIN_RATE_WINDOW_S = 0.01  # below this a rate is noise

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PARTITIONS_STOPPED = 2
# Graceful shutdown cut short (a second signal, or the shutdown deadline): the in-flight batch
# was rolled back. See consumer.runtime.shutdown.
EXIT_ABORTED = 5  # (4 is `checkpoint verify` finding checkpoints that do not fit)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    group: str
    topics: tuple[str, ...]
    reset_policy: ResetPolicy = "earliest"
    batch_max_records: int = 2000
    poll_timeout_s: float = 0.5
    # Exit once no record arrived for this long and every partition is caught up (None: never).
    stop_when_idle_s: float | None = None
    # How long sink failures are retried (capped exponential backoff) before giving up.
    sink_retry_deadline_s: float = 120.0
    sink_retry_max_backoff_s: float = 5.0
    # A record that fails: retried, then it stops its partition or becomes a dead letter.
    bad_records: BadRecordPolicy = field(default_factory=BadRecordPolicy)


@dataclass(slots=True)
class _Owned:
    """A partition this consumer holds: its fencing epoch and the next offset to process."""

    epoch: int
    next_offset: int | None
    stopped: RecordError | None = None
    state: Any = None  # stateful apps: the state as of next_offset


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
        self._decoders = decoders or TopicDecoders(app)
        self._dead_letters = dead_letters
        if settings.bad_records.action == "dead-letter" and dead_letters is None:
            raise ConfigError("the dead-letter policy needs a dead-letter topic writer")
        self._clock = clock
        self._sleep = sleep
        self._owned: dict[TopicPartition, _Owned] = {}
        # Partitions halted on a bad record. Kept when they are revoked (leaving the group at the
        # end revokes everything, and a driver calls finish() after that); forgotten when one
        # is assigned to this member again, which then resumes at the bad record.
        self._halted: dict[TopicPartition, RecordError] = {}
        self._stop_requested = False
        self._ever_assigned = False
        self._crash = CrashInjector.from_environment()
        self._observer: EngineObserver = observer or NullObserver()
        self.records_committed = 0
        self.batches_committed = 0
        self._started = self._idle_since = self._last_commit_at = clock()
        self._first_record_at: float | None = None
        # Awaits an async processor's result (set by the asyncio driver); None: sync only.
        self.resolve_awaitable: Callable[[Any], Any] | None = None

    # -- control -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish and commit the batch in hand, then leave the group. Safe from a signal handler."""
        self._stop_requested = True
        self._observer.stopping()

    @property
    def stopped_partitions(self) -> dict[TopicPartition, RecordError]:
        """Partitions this member halted on a bad record (see `_halted`)."""
        return dict(self._halted)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def run(self) -> int:
        """Consume until stopped (the synchronous driver); returns the process exit code."""
        self.start()
        self._backend.subscribe(self._settings.topics, self)
        try:
            while not self._stop_requested:
                records = self._backend.poll_batch(
                    self._settings.batch_max_records, self._settings.poll_timeout_s
                )
                if not self.step(records):
                    break
        finally:
            self._backend.close()
            code = self.finish()
        return code

    # -- the steps every driver runs: start, step per poll, finish ---------------------------

    def start(self) -> None:
        """Open the sink (creating its tables) before the driver subscribes. A sink that is not
        up yet, or DDL that lost a deadlock to a running member, is retried like any sink call."""
        self._decoders.check(self._settings.topics)
        if self._dead_letters is not None:
            dead_letters = self._dead_letters
            self._with_retry(
                "prepare_dead_letters",
                lambda: dead_letters.prepare(self._settings.topics),
                retry_on=(KafkaError,),
            )
        if isinstance(self._sink, GroupBoundSink):
            # Its transaction commits the offsets to Kafka: no advisory commit after it.
            self._sink.bind_group_metadata(self._backend.group_metadata)
        self._with_sink_retry("open", lambda: self._sink.open(self._app.tables))
        log.info(
            "consumer_starting",
            app=self._app.name,
            group=self._settings.group,
            topics=list(self._settings.topics),
            sink=self._sink.description,
        )
        self._started = self._idle_since = self._last_commit_at = self._clock()

    def step(self, records: Sequence[RawRecord]) -> bool:
        """Process and commit one polled batch; False when the driver should stop (idle)."""
        self._observer.polled(len(records))
        if records:
            if self._first_record_at is None:
                self._first_record_at = self._clock()
            self._handle(records)
            self._idle_since = self._last_commit_at = self._clock()
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

    # -- the batch -----------------------------------------------------------------------------

    def _handle(self, records: Sequence[RawRecord]) -> None:
        works: list[PartitionWork] = []
        for tp, fetched in group_by_partition(records).items():
            owned = self._owned.get(tp)
            if owned is None or owned.stopped is not None:
                continue  # not ours (any more), or stopped on a bad record: never processed
            position = owned.next_offset
            # A record below the position was already committed (a fetch raced a seek).
            fresh = fetched if position is None else [r for r in fetched if r.offset >= position]
            if not fresh:
                continue
            self._observer.records_fetched(tp, len(fresh))
            works.append(self._process(tp, fresh, owned.state))
        if works:
            self._write_dead_letters(works)
            self._commit(works)

    def _process(
        self, tp: TopicPartition, records: Sequence[RawRecord], state: Any
    ) -> PartitionWork:
        """Process one partition's records; a schema registry outage is waited out (to the sink
        retry deadline), not blamed on the records."""
        decode = self._decoders.for_topic(tp.topic)
        return self._with_retry(
            "decode",
            lambda: process_partition(
                self._app,
                decode,
                tp,
                records,
                state,
                resolve=self.resolve_awaitable,
                policy=self._settings.bad_records,
                sleep=self._sleep,
            ),
            retry_on=(SchemaRegistryError,),
        )

    def _write_dead_letters(self, works: Sequence[PartitionWork]) -> None:
        """Step 0 of the commit: every dead letter acknowledged before any offset past it."""
        letters = [letter for work in works for letter in work.dead_letters]
        if not letters:
            return
        writer = self._dead_letters
        if writer is None:  # process_partition makes letters only under the dead-letter policy
            raise ConfigError("dead letters without a dead-letter topic writer")
        self._with_retry("dead_letters", lambda: writer.write(letters), retry_on=(KafkaError,))
        self._crash.at("after-dead-letters")

    def _commit(self, works: list[PartitionWork]) -> None:
        while works:
            epochs = {work.partition: self._owned[work.partition].epoch for work in works}
            try:
                committed = self._with_sink_retry(
                    "commit",
                    functools.partial(
                        commit_batch,
                        self._sink,
                        group=self._settings.group,
                        works=works,
                        epochs=epochs,
                        crash=self._crash,
                        state_version=self._app.state.version if self._app.state else None,
                    ),
                )
            except FencedError as exc:
                self._drop_fenced(exc)
                works = [w for w in works if w.partition in self._owned]
                continue
            break
        else:
            return
        for tp, next_offset in committed.next_offsets.items():
            self._owned[tp].next_offset = next_offset
        for work in works:
            self._owned[work.partition].state = work.state
        self.records_committed += committed.records
        self.batches_committed += 1
        self._observer.batch_committed(works, committed)
        log.debug(
            "batch_committed",
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
                self._stop_partition(work.partition, work.error)
        if not isinstance(self._sink, GroupBoundSink):
            self._backend.commit_advisory(committed.next_offsets)  # step 6: advisory only

    def _stop_partition(self, tp: TopicPartition, error: RecordError) -> None:
        self._owned[tp].stopped = error
        self._halted[tp] = error
        self._backend.pause([tp])
        self._observer.partition_stopped(tp, error)
        log.error(
            "partition_stopped",
            topic=error.topic,
            partition=error.partition,
            offset=error.offset,
            field=error.field,
            error_type=type(error).__name__,
            error=str(error),
            committed_up_to=error.offset,
        )

    def _drop_fenced(self, exc: FencedError) -> None:
        dropped = [TopicPartition(topic, partition) for topic, partition in exc.partitions]
        next_offsets = self._forget(dropped)
        self._backend.pause(dropped)
        self._observer.partitions_fenced(dropped)
        log.warning(
            "partitions_fenced",
            partitions=[str(tp) for tp in sorted(dropped)],
            next_offsets=next_offsets,
            reason="a newer owner took these partitions; this batch was rolled back for them",
        )

    def _with_sink_retry(self, what: str, action: Callable[[], T]) -> T:
        """Run `action`, retrying SinkError (not FencedError) with capped backoff to a deadline."""
        return self._with_retry(what, action, retry_on=(SinkError,))

    def _with_retry(
        self,
        what: str,
        action: Callable[[], T],
        *,
        retry_on: tuple[type[Exception], ...],
    ) -> T:
        """Run `action`, retrying `retry_on` errors (never FencedError) with capped exponential
        backoff until the sink retry deadline. Logs `<kind>_retry` and `<kind>_gave_up`, where
        kind is "sink" for sink calls and `what` otherwise."""
        kind = "sink" if SinkError in retry_on else what
        deadline = self._clock() + self._settings.sink_retry_deadline_s
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            began = self._clock()
            try:
                result = action()
            except FencedError:
                raise
            except retry_on as exc:
                if isinstance(exc, SinkError):
                    self._observer.sink_failed(what, exc)
                if self._clock() + backoff > deadline:
                    log.error(  # noqa: TRY400 - the caller reports the error; no traceback twice
                        f"{kind}_gave_up", action=what, attempts=attempt, error=str(exc)
                    )
                    raise
                log.warning(
                    f"{kind}_retry", action=what, attempt=attempt, backoff_s=backoff, error=str(exc)
                )
                self._sleep(backoff)
                backoff = min(backoff * 2, self._settings.sink_retry_max_backoff_s)
            else:
                if SinkError in retry_on:
                    self._observer.sink_succeeded(what, self._clock() - began)
                return result

    # -- idleness ------------------------------------------------------------------------------

    def _idle_long_enough(self, idle_since: float) -> bool:
        limit = self._settings.stop_when_idle_s
        if limit is None or self._clock() - idle_since < limit:
            return False
        if not self._ever_assigned:
            return False  # still joining the group: idle is not done
        for tp, owned in self._owned.items():
            if owned.stopped is not None:
                continue
            try:
                _low, high = self._backend.watermarks(tp)
            except KafkaError:
                return False  # cannot tell whether we are caught up: not idle
            if owned.next_offset is None or owned.next_offset < high:
                return False
        return True

    # -- RebalanceListener ---------------------------------------------------------------------

    def on_assigned(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, StartPosition]:
        group = self._settings.group
        self._observer.joined()
        if not partitions:
            return {}  # joined with nothing (yet) to own: ready, but not "assigned" for idleness
        self._ever_assigned = True
        for tp in partitions:
            self._halted.pop(tp, None)
        epochs = self._with_sink_retry("acquire", lambda: self._sink.acquire(group, partitions))
        stored = self._with_sink_retry(
            "load_checkpoints", lambda: self._sink.load_checkpoints(group, partitions)
        )
        starts: dict[TopicPartition, StartPosition] = {}
        for tp in partitions:
            checkpoint = stored.get(tp)
            if checkpoint is not None:
                starts[tp] = checkpoint.next_offset
            elif self._settings.reset_policy == "error":
                raise CheckpointError(
                    "no checkpoint stored for partition and reset policy is 'error'",
                    group=group,
                    topic=tp.topic,
                    partition=tp.partition,
                )
            else:
                starts[tp] = self._reset_position(tp, self._settings.reset_policy)
            start = starts[tp]
            self._owned[tp] = _Owned(
                epoch=epochs[tp],
                next_offset=start if isinstance(start, int) else None,
                state=self._initial_state(tp, checkpoint),
            )
        self._observer.partitions_assigned({tp: self._owned[tp].next_offset for tp in partitions})
        log.info(
            "partitions_assigned",
            partitions={str(tp): starts[tp] for tp in partitions},
            epochs={str(tp): epochs[tp] for tp in partitions},
        )
        return starts

    def _initial_state(self, tp: TopicPartition, checkpoint: Checkpoint | None) -> Any:
        if self._app.state is None:
            return None
        return load_state(
            self._app.state,
            None if checkpoint is None else checkpoint.state,
            None if checkpoint is None else checkpoint.state_version,
            topic=tp.topic,
            partition=tp.partition,
        )

    def _reset_position(
        self, tp: TopicPartition, policy: Literal["earliest", "latest"]
    ) -> StartPosition:
        """The numeric offset the reset policy means now, so the position is known exactly (and
        logged); the policy name itself when the broker cannot say."""
        try:
            low, high = self._backend.watermarks(tp)
        except KafkaError as exc:
            log.warning(
                "reset_position_unresolved", topic=tp.topic, partition=tp.partition, error=str(exc)
            )
            return policy
        return low if policy == "earliest" else high

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        # Nothing is in flight here (see the module docstring): forgetting them is enough.
        next_offsets = self._forget(partitions)
        self._observer.partitions_revoked(partitions, lost=False)
        log.info(
            "partitions_revoked",
            partitions=[str(tp) for tp in partitions],
            next_offsets=next_offsets,
        )

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None:
        next_offsets = self._forget(partitions)
        self._observer.partitions_revoked(partitions, lost=True)
        log.warning(
            "partitions_lost",
            partitions=[str(tp) for tp in partitions],
            next_offsets=next_offsets,
        )

    def _forget(self, partitions: Sequence[TopicPartition]) -> dict[str, int | None]:
        """Drop the partitions; returns where each stood (its next offset), for the log."""
        forgotten: dict[str, int | None] = {}
        for tp in partitions:
            owned = self._owned.pop(tp, None)
            if owned is not None:
                forgotten[str(tp)] = owned.next_offset
        return forgotten
