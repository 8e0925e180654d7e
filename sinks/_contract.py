"""The `Sink` contract: the only way the engine touches durable storage.

Lifecycle and guarantees (the engine calls in this order, from one thread):

    open(tables)                        once; creates or migrates the sink's own tables
    acquire(group, partitions)          on assignment, in its own transaction: bumps and returns
                                        each partition's fencing epoch
    load_checkpoints(group, partitions) on assignment: the stored checkpoints (older formats are
                                        upgraded in memory; a newer format raises)
    begin()                             per batch
      write_rows(table, rows, origin)   zero or more times; rows are upserted by the table's key
                                        (the engine already deduplicated keys within the batch).
                                        A sink with `writes_per_partition` gets one call per
                                        (table, partition) with `origin` naming the partition and
                                        the batch's offset range; others get one call per table
                                        with rows merged across partitions and origin None
      save_checkpoints(group, checkpoints, epochs)
                                        conditional on every epoch still being current; raises
                                        `FencedError` naming the stale partitions otherwise
    commit() | rollback()               commit makes rows and checkpoints durable together;
                                        after any exception inside a batch the engine rolls back
    close()                             once; nothing is called after it

A sink that commits consumer offsets to Kafka itself (the transactional Kafka sink) also
implements `GroupBoundSink`: the engine hands it the consumer's group metadata before it
subscribes, and does not make its advisory offset commit (the sink's commit is the real one).

Replay jobs keep their plan in the sink (`create_job` / `load_job`, each its own transaction);
the document is opaque JSON to the sink.

A sink never commits on its own, so a crash at any instant leaves either the whole batch (rows
and checkpoints) or none of it. Exceptions are `SinkError` (or `FencedError`), chained with
`raise ... from` the driver's exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from consumer._app import Table
from consumer._checkpoint import Checkpoint
from consumer._records import TopicPartition

DEFAULT_CHECKPOINT_TABLE = "offsetkeeper_checkpoints"
DEFAULT_LEASE_TABLE = "offsetkeeper_leases"
JOB_TABLE = "offsetkeeper_replay_jobs"

# Checkpoint columns after the v1 ones (group_id, topic, partition, next_offset,
# format_version, updated_at): added by format v2. Sinks add them to a v1 table on open.
CHECKPOINT_V2_COLUMNS = ("epoch", "leader_epoch", "writer_version", "state", "state_version")


@dataclass(frozen=True, slots=True)
class RowsOrigin:
    """Where a `write_rows` call's rows came from: one partition's records in
    [first_offset, next_offset) of this batch, committed under `group` (for sinks with
    `writes_per_partition`)."""

    group: str
    partition: TopicPartition
    first_offset: int
    next_offset: int


class Sink(Protocol):
    """A transactional store for output rows and the checkpoints that produced them."""

    # True: write_rows is called per (table, partition) with a RowsOrigin (file sinks name
    # their files by it); False: per table, rows merged across the batch's partitions.
    writes_per_partition: bool

    @property
    def description(self) -> str:
        """Where this sink writes, with any password masked (safe to log)."""
        ...

    def open(self, tables: Sequence[Table]) -> None: ...

    def open_existing(self) -> None:
        """Connect without creating or changing anything, for read-only commands (dry runs,
        inspection). Reads of tables that do not exist yet return nothing."""
        ...

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]: ...

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        """Stored checkpoints of `group` (all of its partitions when `partitions` is None)."""
        ...

    def begin(self) -> None: ...

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None: ...

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def checkpoint_groups(self) -> list[str]:
        """Every group with stored checkpoints (replay jobs included), sorted."""
        ...

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        """Rewrite every checkpoint stored in an older format in the current one, in one
        transaction that locks them (so a live consumer's commit cannot interleave). Returns
        the checkpoints that were (or, with dry_run, would be) rewritten."""
        ...

    def create_job(self, job_id: str, document: str) -> str:
        """Store a job's document unless the job exists; return the stored document."""
        ...

    def load_job(self, job_id: str) -> str | None: ...

    def close(self) -> None: ...


@runtime_checkable
class GroupBoundSink(Protocol):
    """A sink that commits the consumed offsets to Kafka inside its own transaction, so it
    needs the consumer's group metadata (which fences a zombie member's commit)."""

    def bind_group_metadata(self, group_metadata: Callable[[], object]) -> None:
        """`group_metadata()` returns the client's current consumer group metadata (the
        confluent-kafka `ConsumerGroupMetadata`); called at each commit, as it changes with
        every rebalance."""
        ...
