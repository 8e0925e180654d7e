"""The commit sequence, written once. Every batch, from every backend, goes through here.

    0. (Caller, before) write the batch's dead letters and wait for the broker's
       acknowledgement of each, so no offset past a dead letter commits without it.
    1. Merge the batch's rows per table, one row per key (the newest source position wins).
    2. BEGIN a sink transaction.
    3. Write the rows (upsert by key: writing the same batch twice changes nothing; a sink
       that guards positions never lets an older record replace a newer row), then the
       changes of the partitions' keyed state (stateful apps).
    4. Save each partition's checkpoint (its next offset), conditional on the fencing epoch
       taken at assignment; a stale epoch raises FencedError.
    5. COMMIT. This is the only point where progress becomes durable: before it, a crash
       leaves nothing of the batch; after it, rows and offsets are both there.
    6. (Caller, after we return) copy the offsets to Kafka as an advisory commit.

On any failure in 2-5 the transaction is rolled back, so a batch is never half-written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from consumer.checkpoints.model import Checkpoint, writer_version
from consumer.core.errors import ConfigError
from consumer.core.records import TopicPartition
from consumer.engine.batch import MergedTable, PartitionWork, merge_rows
from consumer.engine.crash import CrashInjector
from consumer.engine.sink import PositionGuardedSink, RowsOrigin, Sink, StateStore


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    next_offsets: Mapping[TopicPartition, int]
    records: int
    rows: int


def commit_batch(
    sink: Sink,
    *,
    group: str,
    works: Sequence[PartitionWork],
    epochs: Mapping[TopicPartition, int],
    crash: CrashInjector,
    overwrite_newer: bool = False,
) -> CommittedBatch:
    """Steps 1-5 above. Raises SinkError/FencedError after rolling back. `overwrite_newer`:
    a position-guarded sink replaces rows regardless of their position (`replay
    --overwrite-newer`)."""
    writes = _merged_writes(sink, group, works)  # 1
    checkpoints = _checkpoints(group, works, epochs)
    # A partition that did not move (stopped at its first record) writes no state either.
    state_changes = [
        change
        for work in works
        if work.next_offset > work.first_offset
        for change in work.state_changes
    ]
    state_store = _state_store(sink) if state_changes else None
    rows = 0
    guarded = sink if isinstance(sink, PositionGuardedSink) else None
    sink.begin()  # 2
    try:
        for origin, merged in writes:  # 3
            for table, table_rows, positions in merged.values():
                if guarded is not None and table.mode == "upsert":
                    guarded.write_guarded_rows(
                        table, table_rows, positions, overwrite_newer=overwrite_newer
                    )
                else:
                    sink.write_rows(table, table_rows, origin)
                rows += len(table_rows)
        if state_store is not None:
            state_store.write_state(group, state_changes)
        crash.at("after-rows")
        sink.save_checkpoints(  # 4
            group,
            checkpoints,
            {cp.topic_partition: epochs[cp.topic_partition] for cp in checkpoints},
        )
        sink.commit()  # 5
    except BaseException:
        sink.rollback()
        raise
    crash.at("after-commit")
    return CommittedBatch(
        next_offsets={cp.topic_partition: cp.next_offset for cp in checkpoints},
        records=sum(work.records for work in works),
        rows=rows,
    )


def _state_store(sink: Sink) -> StateStore:
    if not isinstance(sink, StateStore):  # BatchLoop refuses a stateful app on such a sink
        raise ConfigError("state changes for a sink that cannot store keyed state")
    return sink


_Writes = list[tuple[RowsOrigin | None, Mapping[str, MergedTable]]]


def _merged_writes(sink: Sink, group: str, works: Sequence[PartitionWork]) -> _Writes:
    """Rows per table, one per key: per partition with its origin for a sink that names its
    output by partition, else merged across the batch's partitions."""
    if not sink.writes_per_partition:
        return [(None, merge_rows(works))]
    return [
        (
            RowsOrigin(group, work.partition, work.first_offset, work.next_offset),
            merge_rows([work]),
        )
        for work in works
        if work.rows
    ]


def _checkpoints(
    group: str,
    works: Sequence[PartitionWork],
    epochs: Mapping[TopicPartition, int],
) -> list[Checkpoint]:
    """Each partition's checkpoint after the batch (partitions that moved only). The state
    lives in entries (format 3): a format-2 blob is cleared, its entries written with it."""
    now = datetime.now(tz=UTC)
    version = writer_version()
    return [
        Checkpoint(
            group=group,
            topic=work.partition.topic,
            partition=work.partition.partition,
            next_offset=work.next_offset,
            updated_at=now,
            epoch=epochs[work.partition],
            leader_epoch=work.leader_epoch,
            writer_version=version,
        )
        for work in works
        if work.next_offset > work.first_offset
    ]
