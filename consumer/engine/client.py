"""The `ClientBackend` contract: the one cut between the engine and a Kafka client library.

Backends translate their library's exceptions into `KafkaError` at this boundary; the engine
never sees a library's own exception or message types, only `RawRecord` and `TopicPartition`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from consumer.core.records import RawRecord, TopicPartition

StartPosition = int | Literal["earliest", "latest"]


class RebalanceListener(Protocol):
    """Called by the backend, on the engine's thread, from inside `poll_batch`.

    Ordering guarantees a backend must keep:

    - `on_assigned` runs before any record of those partitions is returned; the backend starts
      each partition at the position it returns, or assigns it paused where it returns None
      (the engine stopped it, e.g. on records lost to retention). It is also called with no
      partitions when the group hands this member an empty assignment, so the listener knows
      it has joined.
    - `on_out_of_range` runs when the client finds a partition's position outside its log
      (records deleted by retention before they were read, or a recreated topic). The backend
      never jumps on its own (no automatic offset reset): it seeks each partition to the
      offset returned for it and pauses the partitions the listener leaves out.
    - `on_revoked` runs before the partitions are released to another member, and after the last
      `poll_batch` that returned their records; the engine settles their in-flight work here.
    - `on_lost` replaces `on_revoked` when the partitions are already gone (session expired):
      nothing may be committed for them any more.
    """

    def on_assigned(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, StartPosition | None]: ...

    def on_out_of_range(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, int]: ...

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None: ...

    def on_lost(self, partitions: Sequence[TopicPartition]) -> None: ...


class ClientBackend(Protocol):
    """A Kafka consumer-group client as the engine needs it."""

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def poll_batch(
        self, max_records: int, timeout_s: float, fill_s: float = 0.0
    ) -> list[RawRecord]:
        """Up to `max_records` records, in offset order per partition. Takes what the client
        holds at once; waits up to `timeout_s` only when it holds nothing ([] after that), and
        once it has a record, up to `fill_s` more for the batch to fill. Records fetched
        before a rebalance callback that moved their partition are not returned (the
        partition is fetched again from where the listener put it)."""
        ...

    def pause(self, partitions: Sequence[TopicPartition]) -> None: ...

    def resume(self, partitions: Sequence[TopicPartition]) -> None: ...

    def commit_advisory(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Best-effort copy of committed progress to Kafka, for lag tools. Never authoritative."""
        ...

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        """(low, high) offsets of the partition's log, asked of the broker."""
        ...

    def group_metadata(self) -> object:
        """The client's current consumer group metadata, for a sink that commits offsets in a
        Kafka transaction (`consumer.GroupBoundSink`). ConfigError where the client cannot."""
        ...

    def close(self) -> None:
        """Leave the group and release the client. Safe to call twice."""
        ...


class PartitionReader(Protocol):
    """Reads chosen partitions by manual assignment: no group membership, no commits to Kafka.

    Used by replay and by the checkpoint tools, so that the live consumer group is never
    disturbed. Errors are `KafkaError`; an unknown topic or partition is a `ConfigError`.
    """

    def partitions(self, topic: str) -> list[int]:
        """The topic's partition numbers; ConfigError when the topic does not exist."""
        ...

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]: ...

    def offsets_for_time(
        self, partitions: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        """Per partition, the first offset whose timestamp is >= timestamp_ms (None: none is)."""
        ...

    def assign(self, positions: Mapping[TopicPartition, int]) -> None: ...

    def poll_batch(self, max_records: int, timeout_s: float) -> list[RawRecord]: ...

    def pause(self, partitions: Sequence[TopicPartition]) -> None: ...

    def out_of_range(self) -> list[TopicPartition]:
        """Partitions whose fetch position fell outside the log (records deleted by retention
        before they were read) since the last call. The reader never jumps on its own: they
        fetch nothing more until assigned again."""
        ...

    def position(self, partition: TopicPartition) -> int | None:
        """The next offset the reader will return for the partition (None: not known yet)."""
        ...

    def group_members(self, group: str) -> list[str]:
        """Client ids of the consumer group's active members (empty when none)."""
        ...

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        """The offsets a plain Kafka consumer group has committed (next offset to read)."""
        ...

    def close(self) -> None: ...
