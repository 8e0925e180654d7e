"""An in-memory `ClientBackend`: partition logs held in lists, one consumer group member that
owns every partition, and a manual clock, so the engine runs with no Kafka and no waiting.

It keeps the contract's guarantees as the engine sees them: the listener's `on_assigned` runs
inside the first `poll_batch`, before any record is returned, and each partition starts where
it says (paused where it says None); partitions are read round-robin, in offset order each;
paused partitions are not read; `close` revokes what is still assigned, as leaving the group
does. An empty poll advances the clock by its timeout (a real poll would have waited that
long), so `stop_when_idle_s` passes at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from consumer.core.errors import KafkaError
from consumer.core.records import RawRecord, TopicPartition
from consumer.engine.client import RebalanceListener, StartPosition

# A run the engine never ends (it never found every partition caught up) fails with
# KafkaError after this many empty polls instead of spinning forever.
MAX_IDLE_POLLS = 10_000


class ManualClock:
    """A monotonic clock that moves only when told: give `now` and `sleep` to the engine."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now_s = start

    def now(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += max(seconds, 0.0)


class MemoryBackend:
    """See the module docstring. `logs` holds each partition's records at consecutive offsets
    (a partition with none is an empty log)."""

    def __init__(
        self,
        logs: Mapping[TopicPartition, Sequence[RawRecord]],
        *,
        clock: ManualClock | None = None,
        max_idle_polls: int = MAX_IDLE_POLLS,
    ) -> None:
        self.clock = clock or ManualClock()
        self._logs = {tp: list(records) for tp, records in logs.items()}
        self._listener: RebalanceListener | None = None
        self._positions: dict[TopicPartition, int] = {}
        self._assigned = False
        self._paused: set[TopicPartition] = set()
        self._max_idle_polls = max_idle_polls
        self._idle_polls = 0
        self.topics: list[str] = []
        self.advisory_commits: list[dict[TopicPartition, int]] = []
        self.closed = False

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.topics = list(topics)
        self._listener = listener

    def poll_batch(
        self, max_records: int, timeout_s: float, fill_s: float = 0.0
    ) -> list[RawRecord]:
        if self.closed:
            raise KafkaError("poll after close")
        if self._listener is not None and not self._assigned:
            self._assigned = True
            self._assign(self._listener)
        batch = self._fetch(max_records)
        if not batch:
            self._idle_polls += 1
            if self._idle_polls > self._max_idle_polls:
                raise KafkaError(
                    "the engine kept polling an idle in-memory backend",
                    empty_polls=self._idle_polls,
                )
            self.clock.sleep(timeout_s)
        return batch

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.difference_update(partitions)

    def commit_advisory(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        self.advisory_commits.append(dict(next_offsets))

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        records = self._logs.get(partition, [])
        if not records:
            return 0, 0
        return records[0].offset, records[-1].offset + 1

    def group_metadata(self) -> object:
        return ("in-memory group", id(self))

    def close(self) -> None:
        if self.closed:
            return
        if self._listener is not None and self._positions:
            self._listener.on_revoked(sorted(self._positions))
        self._positions.clear()
        self.closed = True

    # -- internals -------------------------------------------------------------------------

    def _assign(self, listener: RebalanceListener) -> None:
        owned = sorted(tp for tp in self._logs if tp.topic in self.topics)
        starts = listener.on_assigned(owned)
        for tp in owned:
            self._positions[tp] = self._start(tp, starts.get(tp))

    def _start(self, tp: TopicPartition, start: StartPosition | None) -> int:
        low, high = self.watermarks(tp)
        if start is None:  # held by the engine: assigned, paused
            self._paused.add(tp)
            return low
        if start == "earliest":
            return low
        if start == "latest":
            return high
        return int(start)

    def _fetch(self, max_records: int) -> list[RawRecord]:
        pending: dict[TopicPartition, list[RawRecord]] = {}
        for tp, position in sorted(self._positions.items()):
            records = self._logs[tp]
            low = records[0].offset if records else 0
            unread = records[max(position - low, 0) : max(position - low, 0) + max_records]
            if tp not in self._paused and unread:
                pending[tp] = unread
        batch: list[RawRecord] = []
        while pending and len(batch) < max_records:
            for tp in list(pending):
                if len(batch) >= max_records:
                    break
                record = pending[tp].pop(0)
                batch.append(record)
                self._positions[tp] = record.offset + 1
                if not pending[tp]:
                    del pending[tp]
        return batch
