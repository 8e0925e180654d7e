"""The sink contracts: the only way the engine and the tools touch durable storage.

A sink is split by capability, each a `typing.Protocol` that implementers need not inherit:

- `Sink`: rows and checkpoints written in one transaction, with fencing. The engine needs
  only this. Every sink implements it.
- `CheckpointAdmin`: what the `offsetkeeper checkpoint` tools need besides `Sink` (read-only
  opens, listing groups, migrating stored formats).
- `JobStore`: where replay jobs keep their plan, so a killed job resumes towards the same end.
- `GroupBoundSink`: a sink whose transaction commits the consumer's offsets to Kafka itself,
  fenced by the group generation (KIP-447) instead of an epoch of its own.
- `StateStore`: keyed processor state, entries keyed by (group, topic, partition, key) and
  written in the batch's transaction. A stateful app needs it; a sink without it is refused
  at start-up.

The engine calls a `Sink` from one thread, in this order:

    open(tables)
    ( acquire(group, partitions); load_checkpoints(group, partitions)     on each assignment
      ( read_state(...)* while processing                                  stateful apps
      begin(); write_rows(...)*; write_state(...)?; save_checkpoints(...);
      commit() | rollback() )*                                                 per batch
    )*
    close()

Nothing is called after `close()`, and no call overlaps another. A sink never commits on its
own, so a crash at any instant leaves either a whole batch (its rows and its checkpoints) or
none of it. Failures are `SinkError` (or `FencedError`), chained with `raise ... from` the
driver's exception; after any exception inside a batch the engine calls `rollback()`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from consumer.checkpoints.model import Checkpoint
from consumer.core.app import Table
from consumer.core.errors import FencedError
from consumer.core.records import SourcePosition, StoredPosition, TopicPartition


@dataclass(frozen=True, slots=True)
class RowsOrigin:
    """Where a `write_rows` call's rows came from: one partition's records in
    [first_offset, next_offset) of this batch, committed under `group` (for sinks with
    `writes_per_partition`)."""

    group: str
    partition: TopicPartition
    first_offset: int
    next_offset: int


def check_epochs(
    group: str,
    partitions: Iterable[TopicPartition],
    current: Mapping[TopicPartition, int],
    expected: Mapping[TopicPartition, int],
) -> None:
    """The fencing rule, written once: raise `FencedError` naming every partition whose epoch
    stored in the sink (`current`; missing means none) is not the one this member took at
    assignment (`expected`). A sink calls it inside the batch's transaction, after locking
    the partitions' epoch records, so no newer owner can interleave."""
    fenced = sorted({tp for tp in partitions if current.get(tp) != expected[tp]})
    if fenced:
        raise FencedError(
            "partitions were taken over by a newer owner; batch rolled back",
            partitions=[(tp.topic, tp.partition) for tp in fenced],
            group=group,
        )


@runtime_checkable
class Sink(Protocol):
    """Rows and the checkpoints that produced them, committed together, fenced per partition."""

    # True: write_rows is called per (table, partition) with a RowsOrigin (file sinks name
    # their files by it); False: per table, rows merged across the batch's partitions.
    writes_per_partition: bool

    @property
    def description(self) -> str:
        """Where this sink writes, with any password masked (safe to log)."""
        ...

    def open(self, tables: Sequence[Table]) -> None:
        """Connect, and create or migrate the sink's own tables and the app's output tables.
        Called once, before anything else. Idempotent across processes: members starting
        together may all call it. A sink that is not reachable yet raises `SinkError` (the
        engine retries it)."""
        ...

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Take ownership of `partitions` for `group`: in a transaction of its own, bump each
        partition's fencing epoch and return the new ones. From then on a commit by any
        earlier owner of these partitions fails with `FencedError`. Called on every
        assignment, before `load_checkpoints` for the same partitions."""
        ...

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        """The stored checkpoints of `group` (all of its partitions when `partitions` is None),
        upgraded in memory to the current format; a partition without one is absent. A
        stored format newer than this code raises `CheckpointFormatError`, and nothing is
        changed."""
        ...

    def begin(self) -> None:
        """Start a batch's transaction. Never called while one is open."""
        ...

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        """Upsert `rows` into `table` by its key, inside the open transaction; writing a row
        twice leaves one row. Keys are unique within a call (the engine merged them, last
        write in offset order wins). With `writes_per_partition`: one call per (table,
        partition) with `origin`; otherwise one call per table, `origin` None. Nothing is
        visible to readers before `commit()`."""
        ...

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        """Write `checkpoints` inside the open transaction, on condition that each partition's
        epoch is still `epochs[partition]` (see `check_epochs`); otherwise raise `FencedError`
        naming the stale partitions, having written nothing of them. Called once per batch,
        after its rows."""
        ...

    def commit(self) -> None:
        """Make the batch's rows and checkpoints durable together, atomically. On failure the
        batch is not committed (`SinkError`); the engine rolls back and may retry it."""
        ...

    def rollback(self) -> None:
        """Discard the open transaction, if any. Safe to call when none is open."""
        ...

    def close(self) -> None:
        """Release connections and locks. Called once; nothing is called after it."""
        ...


@runtime_checkable
class CheckpointAdmin(Protocol):
    """What the `offsetkeeper checkpoint` tools need besides `Sink`. They write through the
    `Sink` methods (`begin`, `save_checkpoints`, `commit`), under epochs they `acquire`."""

    def open_existing(self) -> None:
        """Connect without creating or changing anything, for read-only commands (dry runs,
        inspection). Reads of tables that do not exist yet return nothing."""
        ...

    def checkpoint_groups(self) -> list[str]:
        """Every group with stored checkpoints (replay jobs included), sorted."""
        ...

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        """Rewrite every checkpoint stored in an older format in the current one, in one
        transaction that locks them (so a live consumer's commit cannot interleave). Returns
        the checkpoints that were (or, with dry_run, would be) rewritten."""
        ...


@runtime_checkable
class JobStore(Protocol):
    """Replay job plans. The document is opaque JSON to the sink; each call is its own
    transaction, outside any batch."""

    def create_job(self, job_id: str, document: str) -> str:
        """Store a job's document unless the job exists; return the stored document (the
        first write wins, so two runs of one job agree on its plan)."""
        ...

    def load_job(self, job_id: str) -> str | None:
        """The stored document of the job, or None."""
        ...


@runtime_checkable
class InterruptibleSink(Protocol):
    """A sink whose call in progress on another thread can be made to fail soon: a shutdown
    aborting the batch in flight on the committer thread (its transaction rolls back)."""

    def interrupt(self) -> None: ...


@runtime_checkable
class PositionGuardedSink(Protocol):
    """A sink that keeps, beside each row of an upsert table, the source position that wrote
    it, and never lets an older position replace a newer one (`consumer.core.records.replaces`),
    inside the same upsert statement. Live consumption, replay and dead-letter re-drive all
    write through it, so a backfill beside the live group cannot regress a row."""

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        """Upsert `rows` of the upsert `table` (`positions[i]` wrote `rows[i]`) inside the open
        transaction: a stored row of the same key is replaced only if its position is not
        newer, or regardless with `overwrite_newer` (a deliberate recompute). Keys are
        unique within a call."""
        ...


@runtime_checkable
class StoredRowsReader(Protocol):
    """A sink whose tables can be read back row by row, for `offsetkeeper audit`
    and the overwrite count of `replay --overwrite-newer --dry-run`. Read-only and safe beside
    running members (one consistent snapshot, no locks that block their commits)."""

    def read_stored_rows(
        self, table: Table
    ) -> Iterator[tuple[dict[str, Any], StoredPosition | None]]:
        """Every row of `table` (its declared columns, values as the database driver returns
        them) with the source position stored beside it (None: none stored, or an append
        table, whose position is in its columns)."""
        ...


@runtime_checkable
class GroupBoundSink(Protocol):
    """A sink that commits the consumed offsets to Kafka inside its own transaction, fenced by
    the consumer group's generation (KIP-447) rather than by an epoch of its own: a zombie
    member's transaction is refused by the broker. The engine makes no advisory offset
    commit for it (the sink's commit is the real one)."""

    def bind_group_metadata(self, group_metadata: Callable[[], object]) -> None:
        """`group_metadata()` returns the client's current consumer group metadata (the
        confluent-kafka `ConsumerGroupMetadata`); called at each commit, as it changes with
        every rebalance. Called once, before `open`."""
        ...


class StateEntry(NamedTuple):
    """One stored entry of a partition's keyed state: the JSON text of its value (UTF-8) and
    the app's state version that wrote it (`App.state.version`). A named tuple: a batch makes
    one per changed key, and a frozen dataclass costs three times as much to build."""

    key: str
    value: bytes
    version: int


class StateChange(NamedTuple):
    """What a batch did to one entry: its new JSON value and version, or `value` None for a
    deleted entry."""

    partition: TopicPartition
    key: str
    value: bytes | None
    version: int


@runtime_checkable
class StateStore(Protocol):
    """Keyed processor state, stored as entries keyed by (group, topic, partition, key) and
    changed only inside a batch's transaction, together with its rows and checkpoints (format
    v3). The engine keeps a bounded cache of entries and reads the rest from here.

    Reads see committed data; they happen while records are processed, outside `begin()`
    ... `commit()`, and never change anything."""

    def read_state(
        self, group: str, partition: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]:
        """The stored entries of `partition` among `keys` (a key with no entry is absent)."""
        ...

    def state_sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, tuple[int, int]]:
        """(number of entries, bytes of their values) per partition of `group` that has
        entries (all of them when `partitions` is None)."""
        ...

    def scan_state(self, group: str, partition: TopicPartition) -> Iterator[StateEntry]:
        """Every stored entry of `partition`, in key order (for a full load, export and
        migration). May be read lazily; the caller finishes it before the next call."""
        ...

    def write_state(self, group: str, changes: Sequence[StateChange]) -> None:
        """Apply `changes` (one per key and partition at most) inside the open transaction,
        before `save_checkpoints`: upsert an entry, or delete it when `value` is None. Its
        partitions' epochs are checked by `save_checkpoints` in the same transaction, so a
        fenced batch writes no state either."""
        ...
