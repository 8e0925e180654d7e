"""A batch the sink refused: find the records responsible.

The sink refuses a batch's rows (a constraint, a value it cannot store) as a whole. Each
partition is then committed on its own, and a refused part is halved until the refused
records stand alone; those follow the bad-record policy, the rest commits. Each part is a
complete commit (rows and checkpoint), so a crash at any point loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from consumer.core.app import StateSchema
from consumer.core.errors import RecordError, RowsRefusedError
from consumer.core.records import RawRecord, TopicPartition
from consumer.engine.batch import BadRecordPolicy, DeadLetter, PartitionWork
from consumer.engine.commit import CommittedBatch
from consumer.engine.crash import CrashInjector
from consumer.engine.positions import Position
from consumer.engine.state import BatchState, PartitionState

log = structlog.get_logger("offsetkeeper.engine")


class BatchLoop(Protocol):
    """What isolation needs of `consumer.engine.loop.BatchLoop`."""

    group: str
    positions: dict[TopicPartition, Position]
    records_committed: int
    rows_committed: int
    crash: CrashInjector
    bad_records: BadRecordPolicy

    def process(
        self,
        tp: TopicPartition,
        records: Sequence[RawRecord],
        state: PartitionState | None,
        skip: frozenset[int] = frozenset(),
    ) -> PartitionWork: ...

    def write_dead_letters(self, works: Sequence[PartitionWork]) -> None: ...

    def commit_works(self, works: list[PartitionWork]) -> CommittedBatch | None: ...

    def stop(self, tp: TopicPartition, error: RecordError, *, pause: bool = True) -> None: ...

    def state_schema(self) -> StateSchema: ...


def isolate(
    loop: BatchLoop,
    works: Sequence[PartitionWork],
    taken: Mapping[TopicPartition, Sequence[RawRecord]],
    refusal: RowsRefusedError,
) -> CommittedBatch | None:
    """Commit each partition on its own, halving a refused part until the refused records
    stand alone; those follow the bad-record policy, the rest commits. Each part is a
    complete commit (rows and checkpoint), so a crash at any point loses nothing."""
    log.warning(
        "rows_refused_isolating",
        group=loop.group,
        error=str(refusal),
        partitions=[str(w.partition) for w in works],
    )
    before = (loop.records_committed, loop.rows_committed)
    for work in works:
        position = loop.positions.get(work.partition)
        if position is None or position.stopped is not None:
            continue
        lettered = frozenset(letter.record.offset for letter in work.dead_letters)
        _commit_part(loop, work.partition, taken[work.partition], position.state, lettered, work)
    moved = {
        w.partition: loop.positions[w.partition].next_offset
        for w in works
        if w.partition in loop.positions
    }
    return CommittedBatch(
        next_offsets={tp: offset for tp, offset in moved.items() if offset is not None},
        records=loop.records_committed - before[0],
        rows=loop.rows_committed - before[1],
    )


def _commit_part(  # noqa: PLR0917 - the split's recursion passes all of them
    loop: BatchLoop,
    tp: TopicPartition,
    records: Sequence[RawRecord],
    state: PartitionState | None,
    lettered: frozenset[int],
    work: PartitionWork | None = None,
) -> bool:
    """Commit `records` from `state`, halving on a refusal; False once the partition
    stopped (a record under policy "stop") or was taken away."""
    if work is None:
        work = loop.process(tp, records, state, lettered)
        loop.write_dead_letters([work])
    try:
        loop.commit_works([work])
        loop.crash.at("after-split-part")
    except RowsRefusedError as refusal:
        if len(records) == 1:
            return _refused_record(loop, tp, records[0], state, refusal)
        half = len(records) // 2
        if not _commit_part(loop, tp, records[:half], state, lettered):
            return False
        return _commit_part(loop, tp, records[half:], loop.positions[tp].state, lettered)
    position = loop.positions.get(tp)
    return position is not None and position.stopped is None


def _refused_record(
    loop: BatchLoop,
    tp: TopicPartition,
    raw: RawRecord,
    state: PartitionState | None,
    refusal: RowsRefusedError,
) -> bool:
    """The sink refuses this record's rows: a bad record, handled by the policy."""
    error = RecordError(
        f"the sink refused the record's rows: {refusal.message}",
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        field=refusal.context.get("field"),
        table=refusal.context.get("table"),
    )
    error.__cause__ = refusal
    if loop.bad_records.action == "stop":
        loop.stop(tp, error)
        return False
    skipped = PartitionWork(tp, first_offset=raw.offset, next_offset=raw.offset + 1, records=1)
    if state is not None:  # the refused record's effect is not kept; a blob's entries are
        skipped.state_changes = BatchState(state, loop.state_schema()).changes()
    skipped.leader_epoch = raw.leader_epoch
    letter = DeadLetter(record=raw, error=error, attempts=1)
    skipped.dead_letters.append(letter)
    loop.write_dead_letters([skipped])
    loop.commit_works([skipped])
    position = loop.positions.get(tp)
    return position is not None and position.stopped is None
