"""What the SQL sinks (SQLite, PostgreSQL) share: their own tables' names, the checkpoint row
codec, and one base class that maps the driver's exceptions to `SinkError` (or, for a batch's
rows the database refuses, `RowsRefusedError`) at one place."""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from consumer import (
    CURRENT_FORMAT_VERSION,
    POSITION_COLUMNS,
    Checkpoint,
    ConfigError,
    RowsRefusedError,
    SinkError,
    SinkFullError,
    StoredPosition,
    Table,
    decode_checkpoint,
    encode_checkpoint,
)

DEFAULT_CHECKPOINT_TABLE = "offsetkeeper_checkpoints"
DEFAULT_LEASE_TABLE = "offsetkeeper_leases"
JOB_TABLE = "offsetkeeper_replay_jobs"
STATE_TABLE = "offsetkeeper_state"  # keyed processor state (sinks._sql_state)

_INT64 = (-(2**63), 2**63 - 1)

# Checkpoint columns after the v1 ones (group_id, topic, partition, next_offset,
# format_version, updated_at): added by format v2. Sinks add them to a v1 table on open.
CHECKPOINT_V2_COLUMNS = ("epoch", "leader_epoch", "writer_version", "state", "state_version")

_KEY_COLUMNS = ("group_id", "topic", "partition")


@dataclass(frozen=True, slots=True)
class CheckpointRows:
    """A `Checkpoint` <-> one row of a SQL sink's checkpoint table, the one mapping both SQL
    sinks use. Columns, in this order: group_id, topic, partition, next_offset,
    format_version, the update time, then the format-v2 columns (`CHECKPOINT_V2_COLUMNS`).
    The sinks differ only in how they store the update time (`updated_at_column`, converted by
    `store_updated_at`); either form (epoch milliseconds or a datetime) reads back."""

    updated_at_column: str
    store_updated_at: Callable[[datetime], object]

    @property
    def columns(self) -> tuple[str, ...]:
        return (
            *_KEY_COLUMNS,
            "next_offset",
            "format_version",
            self.updated_at_column,
            *CHECKPOINT_V2_COLUMNS,
        )

    def select_list(self, present: set[str]) -> str:
        """The columns to SELECT, given the table's `present` columns: a v1 table (opened
        read-only, so not migrated) has no v2 columns, which then read as NULL."""
        return ", ".join(
            column
            if column in present or column not in CHECKPOINT_V2_COLUMNS
            else f"NULL AS {column}"
            for column in self.columns
        )

    def upsert(self, placeholder: str) -> str:
        """INSERT of one row (parameters as `placeholder`) that replaces the stored checkpoint
        of its partition; the table is left as `{}` for the sink to fill in."""
        updates = ", ".join(
            f"{column} = excluded.{column}" for column in self.columns if column not in _KEY_COLUMNS
        )
        return (
            f"INSERT INTO {{}} ({', '.join(self.columns)})"
            f" VALUES ({', '.join(placeholder for _ in self.columns)})"
            f" ON CONFLICT ({', '.join(_KEY_COLUMNS)}) DO UPDATE SET {updates}"
        )

    def encode(self, checkpoint: Checkpoint) -> tuple[object, ...]:
        """The row of `checkpoint`, always in the current format."""
        record = encode_checkpoint(checkpoint)
        return (
            record["group"],
            record["topic"],
            record["partition"],
            record["next_offset"],
            CURRENT_FORMAT_VERSION,
            self.store_updated_at(record["updated_at"]),
            *(record[column] for column in CHECKPOINT_V2_COLUMNS),
        )

    def decode(self, row: Sequence[Any]) -> Checkpoint:
        """The checkpoint a row (selected with `select_list`) holds, upgraded in memory to the
        current format; a newer stored format raises `CheckpointFormatError`."""
        group, topic, partition, next_offset, format_version, updated_at, *v2 = row
        return decode_checkpoint(
            {
                "format_version": format_version,
                "group": group,
                "topic": topic,
                "partition": partition,
                "next_offset": next_offset,
                "updated_at": updated_at,
                **dict(zip(CHECKPOINT_V2_COLUMNS, v2, strict=True)),
            }
        )


def stored_columns(table: Table) -> dict[str, str]:
    """The columns a SQL sink stores for `table`: its own, and for an upsert table the source
    position of each row (`consumer.POSITION_COLUMNS`)."""
    return {**table.columns, **(POSITION_COLUMNS if table.mode == "upsert" else {})}


def position_guard(stored: str, *, topic_collation: str = "") -> str:
    """SQL for an upsert's conflict clause: the incoming row (`excluded`) may replace the
    `stored` row (`consumer.replaces`): a row without a position always; same partition, by
    offset; else by (timestamp, topic, partition, offset). `topic_collation` (e.g. `COLLATE
    "C"`) makes the database compare topics by code point, as Python does."""

    def order(row: str) -> str:
        topic = f"{row}.offsetkeeper_topic {topic_collation}".rstrip()
        return (
            f"{row}.offsetkeeper_timestamp, {topic},"
            f" {row}.offsetkeeper_partition, {row}.offsetkeeper_offset"
        )

    return (
        f"{stored}.offsetkeeper_offset IS NULL OR CASE"
        f" WHEN {stored}.offsetkeeper_topic = excluded.offsetkeeper_topic"
        f" AND {stored}.offsetkeeper_partition = excluded.offsetkeeper_partition"
        f" THEN excluded.offsetkeeper_offset >= {stored}.offsetkeeper_offset"
        f" ELSE ({order('excluded')}) >= ({order(stored)}) END"
    )


def stored_position(stored: Sequence[Any]) -> StoredPosition | None:
    """The position columns of a row (topic, partition, offset, timestamp), None if unset."""
    if len(stored) < len(POSITION_COLUMNS) or stored[2] is None:
        return None
    topic, partition, offset, timestamp = stored
    return StoredPosition(str(topic), int(partition), int(offset), int(timestamp))


def own_table_names(checkpoint_table: str, lease_table: str) -> dict[str, str]:
    """The sink's own tables by the URL option that names them; distinct, or a ConfigError."""
    names = {
        "checkpoint_table": checkpoint_table,
        "lease_table": lease_table,
        "jobs": JOB_TABLE,
        "state": STATE_TABLE,
    }
    folded = [name.casefold() for name in names.values()]
    if len(set(folded)) != len(folded):
        raise ConfigError(
            "the sink's own tables need distinct names",
            checkpoint_table=checkpoint_table,
            lease_table=lease_table,
            job_table=JOB_TABLE,
        )
    return names


@dataclass(frozen=True, slots=True)
class Refusal:
    """The database refused a batch's rows for a data reason: `why` (short, for the message),
    the column where known (the error's `field`), and what else the `RowsRefusedError`
    carries."""

    why: str
    column: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Written:
    """The rows a block writes into `table`, to name the column of a refused value."""

    table: Table | None = None
    rows: Sequence[Mapping[str, Any]] = ()


def unbindable_column(written: Written, *, nul: bool = False) -> str | None:
    """The column of the first value no SQL driver can bind as it is: a str that is not valid
    Unicode (a lone surrogate), or holds NUL where the driver refuses it (`nul`), an int
    beyond 64 bits in an integer column, a json value that is not strict JSON. Used only to
    name the field of a refusal whose error does not."""
    table = written.table
    if table is None:
        return None
    for row in written.rows:
        for column, column_type in table.columns.items():
            if _unbindable(column_type, row.get(column), nul=nul):
                return column
    return None


def _unbindable(column_type: str, value: Any, *, nul: bool) -> bool:
    if column_type == "json":
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return True
        return False
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return nul and "\x00" in value
    if type(value) is int and column_type != "double":
        return not _INT64[0] <= value <= _INT64[1]
    return False


class SqlSink(abc.ABC):
    """The base of the SQL sinks: where a driver's exception becomes a `SinkError`.

    Every call that reaches the database runs under `_mapped`, httpx's
    `map_httpcore_exceptions` in miniature: the driver's exception (`driver_error`) is raised
    again as `SinkError(message, sink=..., <context>, reason=...)` chained with `raise ...
    from`; every other exception (`FencedError`, `CheckpointFormatError`, a `SinkError` of the
    sink's own) passes through unchanged. Where a batch's rows are written and committed
    (`written=`), a data refusal (`_refusal`: a value the database cannot store, a violated
    constraint, or a value the driver cannot even bind) is a `RowsRefusedError` instead, which
    the engine does not retry but isolates; everything else stays a `SinkError` (transient:
    retried), a full disk (`_is_storage_full`) a `SinkFullError`.
    """

    writes_per_partition = False

    # The root of the driver's exceptions (sqlite3.Error, psycopg.Error).
    driver_error: ClassVar[type[Exception]]

    # The sink's own tables by the URL option that names them (`own_table_names`).
    _own_tables: Mapping[str, str]

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where this sink writes, with any password masked (safe to log)."""

    @abc.abstractmethod
    def _rollback_quietly(self) -> None:
        """Roll back the open transaction, if any, raising nothing."""

    @abc.abstractmethod
    def _is_missing_table(self, exc: Exception) -> bool:
        """Whether the driver's `exc` says a table does not exist (yet)."""

    @abc.abstractmethod
    def _refusal(self, exc: Exception, written: Written) -> Refusal | None:
        """What `exc`, raised while `written` was written or committed, says when it is a data
        refusal; None when it is not (a lost connection, a lock, a full disk: transient)."""

    def _check_app_tables(self, tables: Sequence[Table]) -> None:
        """An app table named like one of the sink's own tables would overwrite the
        checkpoints or the fencing epochs: a ConfigError at open."""
        own = {name.casefold(): option for option, name in self._own_tables.items()}
        for table in tables:
            option = own.get(table.name.casefold())
            if option is not None:
                raise ConfigError(
                    "an app table has the name of the sink's own table",
                    table=table.name,
                    option=option,
                    sink=self.description,
                )

    def _error_context(self, exc: Exception) -> dict[str, Any]:
        """What of the driver's exception goes into the `SinkError`'s context."""
        return {"reason": str(exc)}

    def _is_storage_full(self, exc: Exception) -> bool:
        """Whether the driver's `exc` says the database has no space left on its disk: raised
        as a `SinkFullError` (retried like every `SinkError`, named "disk full" in the log)."""
        return False

    @contextlib.contextmanager
    def _mapped(
        self,
        message: str,
        *,
        rollback: bool = True,
        missing_table_ok: bool = False,
        show_reason: bool = True,
        written: Written | None = None,
        **context: Any,
    ) -> Iterator[None]:
        """Run the block; raise the driver's exceptions as `SinkError(message, **context)`.

        `rollback`: on any exception, first roll back the transaction the block was in.
        `missing_table_ok`: a table that does not exist yet (read-only opens of a store nothing
        was written to) is not an error: the block stops, and what it would have set keeps the
        value the caller gave it beforehand. `show_reason`: False leaves the driver's message
        out (it may quote a connection string). `written`: the block writes or commits a
        batch's rows; a data refusal is raised as `RowsRefusedError(message: why, field=...)`.
        """
        try:
            yield
        except BaseException as exc:
            if rollback:
                self._rollback_quietly()
            refusal = (
                self._refusal(exc, written)
                if written is not None and isinstance(exc, Exception)
                else None
            )
            if refusal is not None:
                raise RowsRefusedError(
                    f"{message}: {refusal.why}",
                    sink=self.description,
                    **{**refusal.context, **context},
                    field=refusal.column,
                ) from exc
            if not isinstance(exc, self.driver_error):
                raise
            if missing_table_ok and self._is_missing_table(exc):
                return
            details = self._error_context(exc) if show_reason else {}
            if self._is_storage_full(exc):
                raise SinkFullError(
                    f"disk full: {message}", sink=self.description, **context, **details
                ) from exc
            raise SinkError(message, sink=self.description, **context, **details) from exc
