"""What a run committed and why it stopped (`RunResult`), recorded while the engine runs.

The recorder is the engine's observer (forwarding to the metrics observer, if any) and the
wrapper around the driver: whatever ends the run (idle, a signal, `Runner.stop()`, an error, a
shutdown aborted by a second signal or the deadline), the caller gets a `RunResult`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from consumer.core.errors import OffsetkeeperError, RecordError, SinkError
from consumer.core.exit_codes import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTITIONS_STOPPED,
)
from consumer.core.records import TopicPartition
from consumer.engine.batch import PartitionWork
from consumer.engine.commit import CommittedBatch
from consumer.engine.group import Engine
from consumer.engine.observer import EngineObserver, NullObserver
from consumer.runtime.shutdown import ShutdownAborted

# Why a run stopped:
#   idle            stop_when_idle_s passed with every partition caught up
#   signal          SIGTERM or SIGINT: the batch in hand was committed, then the group left
#   stop_requested  `Runner.stop()` was called: the same graceful stop, asked from Python
#   aborted         a second signal, or the shutdown deadline: the batch in flight rolled back
#   error           an `OffsetkeeperError` ended it (the sink or Kafka past their retry
#                   deadlines, configuration found wrong at start-up, ...): see `error`
StopReason = Literal["idle", "signal", "stop_requested", "aborted", "error"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended. Partitions halted on a bad record do not end a run (the others go on);
    they are in `stopped_partitions`, and make the exit code 2."""

    stop_reason: StopReason
    exit_code: int
    # Per partition, the next offset this run's last commit for it stored in the sink.
    committed: Mapping[TopicPartition, int]
    records: int
    rows: int
    batches: int
    dead_letters: int
    stopped_partitions: Mapping[TopicPartition, RecordError]
    duration_s: float
    error: OffsetkeeperError | None = None

    @property
    def ok(self) -> bool:
        """A clean stop: no error, no abort, no partition halted."""
        return self.exit_code == EXIT_OK

    def raise_for_error(self) -> RunResult:
        """Raise `error` if the run ended with one; otherwise return the result."""
        if self.error is not None:
            raise self.error
        return self


@dataclass(slots=True)
class _Tally:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunRecorder:
    """The engine's observer for one run: notes each commit's offsets, forwards every call to
    `inner` (the metrics observer) and turns the driver's ending into a `RunResult`."""

    def __init__(self, inner: EngineObserver | None = None) -> None:
        self._inner: EngineObserver = inner or NullObserver()
        self._tally = _Tally()
        self.engine: Engine | None = None

    def outcome(
        self, drive: Callable[[], int], *, signalled: Callable[[], bool] = lambda: False
    ) -> RunResult:
        """Run `drive` (it returns the exit code) and say how it ended. An
        `OffsetkeeperError` is returned in the result, not raised; other exceptions (bugs)
        propagate."""
        started = time.monotonic()
        error: OffsetkeeperError | None = None
        reason: StopReason
        try:
            exit_code = drive()
        except OffsetkeeperError as exc:
            error, exit_code, reason = exc, EXIT_FAILED, "error"
        except ShutdownAborted:
            exit_code, reason = EXIT_ABORTED, "aborted"
        else:
            reason = self._graceful_reason(signalled())
        return self._result(reason, exit_code, time.monotonic() - started, error)

    def _graceful_reason(self, signalled: bool) -> StopReason:
        engine = self.engine
        if engine is None or not engine.stop_requested:
            return "idle"
        return "signal" if signalled else "stop_requested"

    def _result(
        self,
        reason: StopReason,
        exit_code: int,
        duration_s: float,
        error: OffsetkeeperError | None,
    ) -> RunResult:
        engine = self.engine
        stopped = {} if engine is None else engine.stopped_partitions
        if exit_code == EXIT_OK and stopped:
            exit_code = EXIT_PARTITIONS_STOPPED
        with self._tally.lock:
            committed = dict(sorted(self._tally.committed.items()))
        return RunResult(
            stop_reason=reason,
            exit_code=exit_code,
            committed=committed,
            records=0 if engine is None else engine.records_committed,
            rows=0 if engine is None else engine.rows_committed,
            batches=0 if engine is None else engine.batches_committed,
            dead_letters=0 if engine is None else engine.dead_lettered,
            stopped_partitions=stopped,
            duration_s=duration_s,
            error=error,
        )

    # -- EngineObserver: each call noted where a result needs it, then forwarded -------------

    def batch_committed(self, works: Sequence[PartitionWork], committed: CommittedBatch) -> None:
        with self._tally.lock:
            self._tally.committed.update(committed.next_offsets)
        self._inner.batch_committed(works, committed)

    def polled(self, records: int) -> None:
        self._inner.polled(records)

    def records_fetched(self, partition: TopicPartition, records: int) -> None:
        self._inner.records_fetched(partition, records)

    def sink_succeeded(self, action: str, duration_s: float) -> None:
        self._inner.sink_succeeded(action, duration_s)

    def sink_failed(self, action: str, error: SinkError) -> None:
        self._inner.sink_failed(action, error)

    def joined(self) -> None:
        self._inner.joined()

    def partitions_assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        self._inner.partitions_assigned(starts)

    def partitions_revoked(self, partitions: Sequence[TopicPartition], *, lost: bool) -> None:
        self._inner.partitions_revoked(partitions, lost=lost)

    def partitions_fenced(self, partitions: Sequence[TopicPartition]) -> None:
        self._inner.partitions_fenced(partitions)

    def partition_stopped(self, partition: TopicPartition, error: RecordError) -> None:
        self._inner.partition_stopped(partition, error)

    def records_lost(self, partition: TopicPartition, records: int) -> None:
        self._inner.records_lost(partition, records)

    def stopping(self) -> None:
        self._inner.stopping()
