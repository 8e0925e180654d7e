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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(slots=True)
class _Partition:
    position: int | None  # the next offset stored in the sink (None: not known yet)
    progress_at: float  # last commit, the assignment, or when lag appeared after none
    end: int | None = None  # the log end offset, as last sampled
    stopped_at: int | None = None  # the offset of the bad record that halted the partition

    @property
    def lag(self) -> int | None:
        if self.end is None or self.position is None:
            return None
        return max(self.end - self.position, 0)


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

    def sink_ok(self) -> None:
        self._last_beat = self._clock()
        if self._sink_failing_since is not None:
            with self._lock:
                self._sink_failing_since = None
                self._sink_failure = None

    def sink_failing_for(self) -> float:
        """Seconds the sink has been failing without a success in between (0.0: it is fine)."""
        since = self._sink_failing_since
        return 0.0 if since is None else self._clock() - since

    def assigned(self, starts: Mapping[TopicPartition, int | None]) -> None:
        now = self._clock()
        with self._lock:
            self._joined = True
            for tp, start in starts.items():
                self._partitions[tp] = _Partition(position=start, progress_at=now)

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
                partition.position = next_offset
                partition.progress_at = now
                lag = partition.lag
                if lag is not None:
                    lags[tp] = lag
        return lags

    def stopped(self, tp: TopicPartition, offset: int | None) -> None:
        with self._lock:
            partition = self._partitions.get(tp)
            if partition is not None:
                partition.stopped_at = -1 if offset is None else offset

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
                if partition.stopped_at is not None:
                    reasons.append(
                        f"{tp} is stopped on a bad record at offset {partition.stopped_at}"
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
