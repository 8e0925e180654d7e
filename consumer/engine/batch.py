"""Turning fetched records into per-partition work: decode, process, key the output rows.

Pure logic, no I/O (apart from the retry pauses of the bad-record policy): the same rules serve
every backend and every sink.

A record that fails to decode or whose processing raises is retried per `BadRecordPolicy`
(count, capped exponential backoff). After the last attempt it either stops the partition
(rows end before it, the checkpoint points at it) or becomes a `DeadLetter`: the partition goes
on, and the engine writes the dead letter to its topic before it commits an offset past it.
Errors that are not about the record (a schema registry outage, a misconfiguration) are never
retried here nor dead-lettered: they propagate to the engine.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import structlog

from consumer.core.app import App, Table
from consumer.core.errors import ConfigError, InvalidRecordError, OffsetkeeperError, RecordError
from consumer.core.records import RawRecord, Record, Row, SourcePosition, TopicPartition, replaces
from consumer.decoding.decoders import Decoder
from consumer.engine.sink import StateChange
from consumer.engine.state import BatchState, PartitionState, keys_of
from consumer.engine.values import RowChecker

log = structlog.get_logger("offsetkeeper.batch")

# A row with its table, its key, and the record that produced it (its source position).
KeyedRow = tuple[Table, tuple[Any, ...], Mapping[str, Any], RawRecord]
BadRecordAction = Literal["stop", "dead-letter"]


@dataclass(frozen=True, slots=True)
class BadRecordPolicy:
    """What happens to a record that fails: `retries` more attempts (pausing `backoff_s`,
    doubling up to `max_backoff_s`), then `action`."""

    action: BadRecordAction = "stop"
    retries: int = 0
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record given up on: the untouched original, why it failed, and how often it was tried."""

    record: RawRecord
    error: RecordError
    attempts: int


@dataclass(slots=True)
class PartitionWork:
    """What one batch did for one partition: rows in offset order, and where to resume."""

    partition: TopicPartition
    first_offset: int
    next_offset: int
    records: int = 0
    rows: list[KeyedRow] = field(default_factory=list)
    # Set when a record could not be handled: rows stop before it, next_offset points at it.
    error: RecordError | None = None
    # Stateful apps: what the processed records changed in the partition's keyed state.
    state_changes: list[StateChange] = field(default_factory=list)
    # Kafka leader epoch of the last processed record, where the client reported it.
    leader_epoch: int | None = None
    # Records given up on (policy "dead-letter"), in offset order; counted in `records`.
    dead_letters: list[DeadLetter] = field(default_factory=list)


def group_by_partition(records: Iterable[RawRecord]) -> dict[TopicPartition, list[RawRecord]]:
    """Records per partition, keeping each partition's fetch order (which is offset order)."""
    # Keyed by (topic, partition) tuples first: a TopicPartition per bucket, not per record.
    grouped: dict[tuple[str, int], list[RawRecord]] = {}
    for record in records:
        bucket = grouped.get((record.topic, record.partition))
        if bucket is None:
            grouped[record.topic, record.partition] = [record]
        else:
            bucket.append(record)
    return {TopicPartition(*key): bucket for key, bucket in grouped.items()}


# For `dlq replay --to pipeline`: the record to process in place of the fetched one, with its
# decoder; None when there is nothing to process (the position still moves past it).
Unwrap = Callable[[RawRecord], tuple[RawRecord, Decoder] | None]


def process_partition(
    app: App,
    decode: Decoder,
    partition: TopicPartition,
    records: Sequence[RawRecord],
    state: PartitionState | None = None,
    *,
    resolve: Callable[[Any], Any] | None = None,
    policy: BadRecordPolicy = BadRecordPolicy(),
    sleep: Callable[[float], None] = time.sleep,
    unwrap: Unwrap | None = None,
    checker: RowChecker | None = None,
) -> PartitionWork:
    """Run the app over one partition's records in order (see the module docstring for bad ones).

    For a stateful app, `state` is the partition's committed keyed state before these records;
    `PartitionWork.state_changes` is what the good records changed (consumer.engine.state).
    An `async def` processor's result is awaited through `resolve` (the asyncio driver).
    With `checker`, every row is checked against its table's column types (a row that fails
    is a bad record of the record that produced it).
    """
    runner = _RecordRunner(app, state, resolve=resolve, policy=policy, sleep=sleep, checker=checker)
    work = PartitionWork(
        partition=partition, first_offset=records[0].offset, next_offset=records[0].offset
    )
    if unwrap is None:
        runner.prefetch(records, decode)
    rows, run = work.rows, runner.run
    for index, raw in enumerate(records):
        if unwrap is None:
            outcome: list[KeyedRow] | _GaveUp | None = run(raw, decode)
        else:
            target = unwrap(raw)
            outcome = None if target is None else run(*target)
        if type(outcome) is list:  # the common case first
            rows.extend(outcome)
        elif isinstance(outcome, _GaveUp):
            if policy.action == "stop":  # rows end before it; the checkpoint points at it
                _processed(work, records, index)
                work.error = outcome.error
                work.state_changes = runner.state_changes()
                return work
            work.dead_letters.append(
                DeadLetter(record=outcome.record, error=outcome.error, attempts=outcome.attempts)
            )
    _processed(work, records, len(records))
    work.state_changes = runner.state_changes()
    return work


def _processed(work: PartitionWork, records: Sequence[RawRecord], count: int) -> None:
    """The work covers the first `count` records (all of them handled: rows or letters)."""
    work.records = count
    if count:
        last = records[count - 1]
        work.next_offset = last.offset + 1
        work.leader_epoch = last.leader_epoch


@dataclass(frozen=True, slots=True)
class _GaveUp:
    """A record that failed its last attempt."""

    record: RawRecord
    error: RecordError
    attempts: int


class _RecordRunner:
    """Runs the processor over one record at a time, retrying a failure per the policy. For a
    stateful app it holds the batch's keyed state: each attempt gets a fresh view of it, and
    only a successful one's changes are kept."""

    def __init__(
        self,
        app: App,
        state: PartitionState | None,
        *,
        resolve: Callable[[Any], Any] | None,
        policy: BadRecordPolicy,
        sleep: Callable[[float], None],
        checker: RowChecker | None,
    ) -> None:
        processor: Any = app.processor
        if processor is None:
            raise InvalidRecordError("app has no processor", app=app.name)
        self._app = app
        self._processor = processor
        # Decided once per batch, not per record: the check is measurable at 100k records/s.
        self._is_async = inspect.iscoroutinefunction(processor)
        self._resolve = resolve
        self._policy = policy
        self._sleep = sleep
        self._checker = checker
        self._state: BatchState | None = None
        if app.state is not None:
            if state is None:
                raise ConfigError("a stateful app's partition came without its state")
            self._state = BatchState(state, app.state)
        # Records decoded ahead by `prefetch`, by offset (used by their first attempt).
        self._decoded: dict[int, Record] = {}
        self._plain = self._state is None and not self._is_async

    def prefetch(self, records: Sequence[RawRecord], decode: Decoder) -> None:
        """Read the state entries the records will touch (`App.state_key`) in one call, when
        the partition's state is not all in memory. Records are decoded once, here."""
        state_key = self._app.state_key
        if self._state is None or state_key is None or self._state.owner.complete:
            return
        keys: list[str] = []
        for raw in records:
            try:
                record = _decoded(decode, raw)
            except Exception:  # noqa: S112 - its own attempt reports the failure
                continue
            self._decoded[raw.offset] = record
            keys.extend(keys_of(state_key, record))
        self._state.prefetch(keys)

    def state_changes(self) -> list[StateChange]:
        return [] if self._state is None else self._state.changes()

    def run(self, raw: RawRecord, decode: Decoder) -> list[KeyedRow] | _GaveUp:
        """The record's keyed rows, or how it failed after the policy's last attempt."""
        if self._plain:  # the first attempt of a stateless, synchronous app, inlined
            try:
                value = decode(raw.value)
                record = Record(
                    raw.topic,
                    raw.partition,
                    raw.offset,
                    raw.timestamp_ms,
                    raw.key,
                    value,
                    raw.headers,
                )
                return _keyed_rows(self._app, self._processor(record), raw, self._checker)
            except Exception as exc:  # handled by the policy, as every attempt's failure
                return self._attempts(raw, decode, exc)
        return self._attempts(raw, decode, None)

    def _attempts(
        self, raw: RawRecord, decode: Decoder, failed: Exception | None
    ) -> list[KeyedRow] | _GaveUp:
        """Attempts per the policy; `failed`: how a first attempt made already failed."""
        attempt = 0
        backoff = self._policy.backoff_s
        while True:
            attempt += 1
            if failed is None:
                try:
                    return self._attempt(raw, decode)
                except Exception as exc:  # a processor bug must be handled by policy
                    failed = exc
            if isinstance(failed, OffsetkeeperError) and not isinstance(failed, RecordError):
                raise failed  # about the setup, not this record: the engine handles it
            error = _located(failed, raw)
            failed = None
            if attempt > self._policy.retries:
                return _GaveUp(raw, error, attempt)
            log.warning(
                "record_retry",
                topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                attempt=attempt,
                backoff_s=backoff,
                error=str(error),
            )
            self._sleep(backoff)
            backoff = min(backoff * 2, self._policy.max_backoff_s)

    def _attempt(self, raw: RawRecord, decode: Decoder) -> list[KeyedRow]:
        """One attempt: decode (or take the record decoded ahead), process, key the rows,
        and keep the record's state changes."""
        decoded = self._decoded  # records decoded ahead by prefetch (usually none)
        ahead = decoded.pop(raw.offset, None) if decoded else None
        record = ahead or _decoded(decode, raw)
        if self._state is None:
            produced = self._processor(record)
            view = None
        else:
            view = self._state.record_view()
            produced = self._processor(record, view)
        if self._is_async:
            produced = _await(produced, self._resolve)
        keyed = _keyed_rows(self._app, produced, raw, self._checker)
        if self._state is not None and view is not None:
            self._state.keep(view)
        return keyed


def _await(awaitable: Any, resolve: Callable[[Any], Any] | None) -> Any:
    if resolve is None:
        awaitable.close()  # never awaited: say why instead of warning about it
        raise ConfigError("async processors need the asyncio driver: use --backend aiokafka")
    return resolve(awaitable)


def _decoded(decode: Decoder, raw: RawRecord) -> Record:
    # Positional: keywords make building a record measurably slower at 100k records/s.
    return Record(
        raw.topic,
        raw.partition,
        raw.offset,
        raw.timestamp_ms,
        raw.key,
        decode(raw.value),
        raw.headers,
    )


def _located(exc: Exception, raw: RawRecord) -> RecordError:
    if isinstance(exc, RecordError):
        return exc.located(topic=raw.topic, partition=raw.partition, offset=raw.offset)
    error = RecordError(
        f"processor raised {type(exc).__name__}: {exc}",
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
    )
    error.__cause__ = exc
    return error


def _keyed_rows(
    app: App,
    produced: Row | Iterable[Row] | None,
    raw: RawRecord,
    checker: RowChecker | None = None,
) -> list[KeyedRow]:
    if produced is None:
        return []
    if type(produced) is Row:  # the common case: one row, no list to build
        return [_keyed_row(app, produced, raw, 0, checker)]
    rows = [produced] if isinstance(produced, Row) else list(produced)
    return [_keyed_row(app, row, raw, index, checker) for index, row in enumerate(rows)]


def _keyed_row(
    app: App, row: Row, raw: RawRecord, index: int, checker: RowChecker | None
) -> KeyedRow:
    table = app.tables_by_name.get(row.table)
    if table is None:  # the processor's bug, shown on the record that hit it
        raise InvalidRecordError("row for an undeclared table", app=app.name, table=row.table)
    values = row.values
    if table.mode == "append":
        values = {
            **values,
            "source_topic": raw.topic,
            "source_partition": raw.partition,
            "source_offset": raw.offset,
            "source_row": index,
        }
    columns = table.columns.keys()
    if not values.keys() <= columns:
        raise InvalidRecordError(
            "row has columns the table does not declare",
            table=table.name,
            field=sorted(values.keys() - columns)[0],
        )
    try:
        key = tuple([values[column] for column in table.key])
    except KeyError as exc:
        raise InvalidRecordError(
            "row lacks a key column", table=table.name, field=str(exc.args[0])
        ) from None
    if checker is not None:
        checker.check(table, values)
        try:
            hash(key)
        except TypeError:  # a json key column given a dict or a list
            raise InvalidRecordError(
                "a key column's value cannot be a key (not hashable)", table=table.name
            ) from None
    return (table, key, values, raw)


class MergedTable(NamedTuple):
    """A table's rows of a batch, one per key, each with the source position that wrote it."""

    table: Table
    rows: list[Mapping[str, Any]]
    positions: list[SourcePosition]


def merge_rows(works: Iterable[PartitionWork]) -> dict[str, MergedTable]:
    """Rows per table with one row per key: the row from the newest source position wins
    (`consumer.core.records.replaces`: within a partition the last in offset order; across
    partitions by record timestamp, then topic, partition and offset), the same rule the SQL
    sinks apply against the rows already stored."""
    # Per table, the winning KeyedRow of each key (kept whole: no tuple built per row).
    merged: dict[str, tuple[Table, dict[tuple[Any, ...], KeyedRow]]] = {}
    for work in works:
        for keyed in work.rows:
            table = keyed[0]
            entry = merged.get(table.name)
            if entry is None:
                entry = (table, {})
                merged[table.name] = entry
            by_key = entry[1]
            key = keyed[1]
            # Re-insert so the dict order follows the last write (stable for the sink).
            earlier = by_key.pop(key, None)
            if earlier is not None and not replaces(keyed[3], earlier[3]):
                by_key[key] = earlier
            else:
                by_key[key] = keyed
    return {
        name: MergedTable(
            table,
            [keyed[2] for keyed in by_key.values()],
            [keyed[3] for keyed in by_key.values()],
        )
        for name, (table, by_key) in merged.items()
    }
