"""Liveness and readiness of a running consumer, decided from what the engine and the lag
sampler report. Written to from the engine and sampler threads, read from the HTTP thread.

Liveness (`/healthz`): the partition loop is alive, i.e. it polled, or tried the sink, within
`liveness_timeout_s`. A loop wedged in a call that never returns fails it; a sink or broker
outage does not (the loop keeps retrying; readiness reports those).

Readiness (`/readyz`): the consumer is doing its job: it joined the group and is committing, or
is idle with no lag. It is not ready while

- it has not joined the group yet, or is shutting down;
- the loop is stalled (liveness fails);
- the sink has been failing for `readiness_timeout_s` or longer (reported as the action, the
  error class, its cause's class and a code where the sink gave one, never the message: a
  sink's message can quote the row values it refused; the engine's log has it in full);
- a partition is stopped on a bad record (it will not move until someone acts);
- a partition has lag and committed nothing for `readiness_timeout_s` (lag that just appeared
  starts that clock, so a partition that was idle is not blamed for the time it had no work);
- the end offsets could not be read from Kafka for `readiness_timeout_s`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consumer.core.errors import OffsetkeeperError
from consumer.core.records import TopicPartition

# Context keys of a sink error that hold a code (PostgreSQL's SQLSTATE, a Kafka error name, the
# Kafka sink's transaction failure class), shown under these labels; nothing else is shown.
_CODE_KEYS = {"sqlstate": "SQLSTATE", "code": "code", "failure": "failure", "errno": "errno"}
# What may be served of a name or code: a short token, nothing that could carry a value.
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _token(value: object) -> str | None:
    text = str(value)
    return text if _TOKEN.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class SinkFailure:
    """What readiness may say about a failed sink call: safe to serve over HTTP.

    Never the error's message or its context values other than codes: a sink's message can
    quote the values of the row it refused (PostgreSQL's does), and /readyz is not the log.
    """

    action: str  # the sink call: open, acquire, commit, ...
    error: str  # the error's class name, e.g. SinkError
    cause: str | None = None  # the class of the driver error under it, e.g. psycopg.errors.X
    codes: tuple[tuple[str, str], ...] = ()  # (label, code), e.g. ("SQLSTATE", "22001")

    @classmethod
    def of(cls, action: str, error: BaseException) -> SinkFailure:
        cause = error.__cause__
        context = error.context if isinstance(error, OffsetkeeperError) else {}
        codes = tuple(
            (label, code)
            for key, label in _CODE_KEYS.items()
            if key in context and (code := _token(context[key])) is not None
        )
        return cls(
            action=_token(action) or "sink call",
            error=_token(type(error).__name__) or "error",
            cause=None if cause is None else _token(_qualified_name(type(cause))),
            codes=codes,
        )

    def describe(self) -> str:
        """E.g. `commit failed with SinkError (psycopg.errors.StringDataRightTruncation,
        SQLSTATE 22001)`."""
        details = ([self.cause] if self.cause else []) + [f"{k} {v}" for k, v in self.codes]
        suffix = f" ({', '.join(details)})" if details else ""
        return f"{self.action} failed with {self.error}{suffix}"


def _qualified_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of one health check: pass or fail, and a JSON-able body that says why."""

    ok: bool
    body: dict[str, Any]


# What the status page may show of the error that stopped a partition: a field name or an
# error class, never a value. Wider than `_TOKEN` (a field can be "nesting depth").
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
# The commit rates on the status page are taken over this window.
RATE_WINDOW_S = 60.0


def _name(value: str | None) -> str | None:
    return value if value is not None and _NAME.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class StopCause:
    """Where and why a partition stopped: safe to serve (no message, no row values)."""

    offset: int | None  # the bad record's offset (None: not known)
    error: str  # the error's class name, e.g. InvalidRecordError
    field: str | None = None  # the field or column, where the error named one

    @classmethod
    def of(cls, offset: int | None, error: str, field: str | None = None) -> StopCause:
        return cls(offset, _token(error) or "error", _name(field))


@dataclass(frozen=True, slots=True)
class PartitionState:
    """A snapshot of one owned partition, for the status page."""

    topic: str
    partition: int
    next_offset: int | None
    end_offset: int | None
    lag: int | None
    last_commit_age_s: float | None  # None: nothing committed since the assignment
    records_per_s: float  # records committed per second over `RATE_WINDOW_S`
    commits_per_min: float  # commits per minute over `RATE_WINDOW_S`
    stopped: StopCause | None


@dataclass(slots=True)
class _Partition:
    position: int | None  # the next offset stored in the sink (None: not known yet)
    progress_at: float  # last commit, the assignment, or when lag appeared after none
    end: int | None = None  # the log end offset, as last sampled
    stopped: StopCause | None = None  # why the partition halted, if it did
    committed_at: float | None = None  # the last commit's time
    commits: int = 0
    # (time, position, commits): one entry a second at most, for the rates.
    history: deque[tuple[float, int | None, int]] = field(default_factory=deque)

    @property
    def lag(self) -> int | None:
        if self.end is None or self.position is None:
            return None
        return max(self.end - self.position, 0)

    def note_commit(self, now: float, position: int) -> None:
        self.position, self.progress_at, self.committed_at = position, now, now
        self.commits += 1
        history = self.history
        if history and now - history[-1][0] < 1.0 and len(history) > 1:
            history[-1] = (now, position, self.commits)  # coalesce: one entry a second
        else:
            history.append((now, position, self.commits))
        while len(history) > 1 and history[1][0] <= now - RATE_WINDOW_S:
            history.popleft()  # keep one entry at or before the window's start

    def rates(self, now: float) -> tuple[float, float]:
        """(records per second, commits per minute) since the newest entry at or before the
        window's start (or the oldest, for a partition held for less than the window)."""
        if not self.history:
            return 0.0, 0.0
        baseline = self.history[0]
        for entry in self.history:
            if entry[0] > now - RATE_WINDOW_S:
                break
            baseline = entry
        since, position, commits = baseline
        elapsed = now - since
        if elapsed <= 0 or position is None or self.position is None:
            return 0.0, 0.0
        return (self.position - position) / elapsed, (self.commits - commits) * 60.0 / elapsed

    def state(self, tp: TopicPartition, now: float) -> PartitionState:
        records_per_s, commits_per_min = self.rates(now)
        return PartitionState(
            topic=tp.topic,
            partition=tp.partition,
            next_offset=self.position,
            end_offset=self.end,
            lag=self.lag,
            last_commit_age_s=None if self.committed_at is None else now - self.committed_at,
            records_per_s=records_per_s,
            commits_per_min=commits_per_min,
            stopped=self.stopped,
        )


@dataclass(frozen=True, slots=True)
class SinkState:
    """The sink as the status page shows it: failing since when, how often retried."""

    failing_for_s: float  # 0.0: the last call succeeded
    retries: int  # failed calls since the last success (each rolled back and retried)
    failure: SinkFailure | None


class Health:
    """See the module docstring. Every method is thread-safe."""

    def __init__(
        self,
        *,
        readiness_timeout_s: float = 30.0,
        liveness_timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.readiness_timeout_s = readiness_timeout_s
        self.liveness_timeout_s = liveness_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat = clock()
        self._joined = False
        self._stopping = False
        self._sink_failing_since: float | None = None
        self._sink_failure: SinkFailure | None = None
        self._sink_retries = 0
        self._ends_unknown_since: float | None = None
        self._partitions: dict[TopicPartition, _Partition] = {}

    # -- what the engine reports -------------------------------------------------------------

    def beat(self) -> None:
        """The loop is alive (a float store: cheap enough for every poll)."""
        self._last_beat = self._clock()

    def mark_joined(self) -> None:
        self._joined = True

    def mark_stopping(self) -> None:
        self._stopping = True  # a plain store: safe from a signal handler

    def sink_failed(self, failure: SinkFailure) -> None:
        """A sink call failed (the last failure is the one reported; see `SinkFailure`)."""
        self._last_beat = now = self._clock()
        with self._lock:
            if self._sink_failing_since is None:
                self._sink_failing_since = now
            self._sink_failure = failure
            self._sink_retries += 1

    def sink_ok(self) -> None:
        self._last_beat = self._clock()
        if self._sink_failing_since is not None:
            with self._lock:
                self._sink_failing_since = None
                self._sink_failure = None
                self._sink_retries = 0

    def sink_failing_for(self) -> float:
        """Seconds the sink has been failing without a success in between (0.0: it is fine)."""
        since = self._sink_failing_since
        return 0.0 if since is None else self._clock() - since

    def assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        now = self._clock()
        with self._lock:
            self._joined = True
            for tp, start in starts.items():
                partition = _Partition(position=start, progress_at=now)
                partition.history.append((now, start, 0))
                self._partitions[tp] = partition

    def released(self, partitions: Iterable[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._partitions.pop(tp, None)

    def committed(self, next_offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Record committed positions; returns the new lag of those whose end offset is known."""
        now = self._clock()
        lags: dict[TopicPartition, int] = {}
        with self._lock:
            for tp, next_offset in next_offsets.items():
                partition = self._partitions.get(tp)
                if partition is None:
                    continue
                if partition.history and partition.history[0][1] is None:
                    partition.history[0] = (now, next_offset, 0)  # its start was not known
                partition.note_commit(now, next_offset)
                lag = partition.lag
                if lag is not None:
                    lags[tp] = lag
        return lags

    def stopped(self, tp: TopicPartition, cause: StopCause) -> None:
        with self._lock:
            partition = self._partitions.get(tp)
            if partition is not None:
                partition.stopped = cause

    # -- what the lag sampler reports ------------------------------------------------------------

    def positions(self) -> dict[TopicPartition, int | None]:
        """The owned partitions and their stored positions (a copy)."""
        with self._lock:
            return {tp: p.position for tp, p in self._partitions.items()}

    def ends_sampled(self, ends: Mapping[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """Record sampled end offsets; returns the lag of each partition still owned."""
        now = self._clock()
        lags: dict[TopicPartition, int | None] = {}
        with self._lock:
            self._ends_unknown_since = None
            for tp, end in ends.items():
                partition = self._partitions.get(tp)
                if partition is None:
                    continue  # released while we asked the broker
                had_lag = bool(partition.lag)
                partition.end = end
                lag = partition.lag
                if lag and not had_lag:
                    partition.progress_at = now  # work just arrived: its clock starts now
                lags[tp] = lag
        return lags

    def ends_unknown(self) -> None:
        now = self._clock()
        with self._lock:
            if self._ends_unknown_since is None:
                self._ends_unknown_since = now

    # -- what the status page shows -----------------------------------------------------------

    def partition_states(self) -> tuple[PartitionState, ...]:
        """Every owned partition, in (topic, partition) order."""
        now = self._clock()
        with self._lock:
            return tuple(p.state(tp, now) for tp, p in sorted(self._partitions.items()))

    def sink_state(self) -> SinkState:
        now = self._clock()
        with self._lock:
            since = self._sink_failing_since
            return SinkState(
                failing_for_s=0.0 if since is None else now - since,
                retries=self._sink_retries,
                failure=self._sink_failure,
            )

    # -- the checks ------------------------------------------------------------------------------

    def liveness(self) -> Verdict:
        age = self._clock() - self._last_beat
        alive = age <= self.liveness_timeout_s
        return Verdict(
            alive,
            {
                "status": "alive" if alive else "stalled",
                "loop_last_seen_s": round(age, 3),
                "timeout_s": self.liveness_timeout_s,
            },
        )

    def readiness(self) -> Verdict:
        now = self._clock()
        limit = self.readiness_timeout_s
        reasons: list[str] = []
        with self._lock:
            if self._stopping:
                reasons.append("shutting down")
            elif not self._joined:
                reasons.append("joining the consumer group")
            beat_age = now - self._last_beat
            if beat_age > self.liveness_timeout_s:
                reasons.append(f"the partition loop has not run for {beat_age:.0f}s")
            if self._sink_failing_since is not None and now - self._sink_failing_since >= limit:
                failure = self._sink_failure
                reasons.append(
                    f"the sink has been failing for {now - self._sink_failing_since:.0f}s"
                    + ("" if failure is None else f": {failure.describe()}")
                )
            if self._ends_unknown_since is not None and now - self._ends_unknown_since >= limit:
                reasons.append(
                    f"end offsets unreadable from Kafka for {now - self._ends_unknown_since:.0f}s"
                )
            total_lag = 0
            unknown = 0
            for tp, partition in sorted(self._partitions.items()):
                lag = partition.lag
                if lag is None:
                    unknown += 1
                else:
                    total_lag += lag
                if partition.stopped is not None:
                    offset = partition.stopped.offset
                    reasons.append(
                        f"{tp} is stopped on a bad record at offset "
                        f"{-1 if offset is None else offset}"
                    )
                elif lag and now - partition.progress_at >= limit:
                    reasons.append(
                        f"{tp} lags by {lag} and committed nothing "
                        f"for {now - partition.progress_at:.0f}s"
                    )
            owned = len(self._partitions)
        ready = not reasons
        return Verdict(
            ready,
            {
                "status": "ready" if ready else "not ready",
                "reasons": reasons,
                "partitions": owned,
                "lag": total_lag,
                "lag_unknown_partitions": unknown,
            },
        )
