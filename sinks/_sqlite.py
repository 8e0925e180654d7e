"""SQLite sink: the embedded default. One file, WAL journal, one IMMEDIATE transaction per batch."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer import (
    CURRENT_FORMAT_VERSION,
    POSITION_COLUMNS,
    Checkpoint,
    RowsOrigin,
    SinkError,
    SourcePosition,
    StoredPosition,
    Table,
    TopicPartition,
    ValueLimits,
    check_epochs,
    check_identifier,
    position_values,
)
from sinks._sql import (
    CHECKPOINT_V2_COLUMNS,
    DEFAULT_CHECKPOINT_TABLE,
    DEFAULT_LEASE_TABLE,
    JOB_TABLE,
    CheckpointRows,
    Refusal,
    SqlSink,
    Written,
    own_table_names,
    position_guard,
    stored_columns,
    stored_position,
    unbindable_column,
)
from sinks._sql_state import SqliteStateTable, SqlStateMethods

_V2_TYPES = {
    "epoch": "INTEGER NOT NULL DEFAULT 0",
    "leader_epoch": "INTEGER",
    "writer_version": "TEXT",
    "state": "BLOB",
    "state_version": "INTEGER",
}

_SQLITE_TYPES = {
    "text": "TEXT",
    "bigint": "INTEGER",
    "integer": "INTEGER",
    "double": "REAL",
    "boolean": "INTEGER",
    "bytes": "BLOB",
    "json": "TEXT",
}

# The update time is stored as epoch milliseconds.
_CHECKPOINT_ROWS = CheckpointRows(
    updated_at_column="updated_at_ms",
    store_updated_at=lambda updated_at: int(updated_at.timestamp() * 1000),
)


# SQLite stores NaN as NULL: refused before the transaction. Infinities and NUL inside text
# round-trip exactly through Python's sqlite3 (tests/unit/test_sqlite_values.py).
_VALUE_LIMITS = ValueLimits(nan=False)

# Raised by Python's sqlite3 (or json) while binding a row's values, before SQLite sees them:
# an int beyond 64 bits (OverflowError), a lone surrogate (UnicodeEncodeError, a ValueError),
# a json value that is not strict JSON (ValueError, TypeError, RecursionError).
_BINDING_ERRORS = (OverflowError, ValueError, TypeError, RecursionError)
# "Error binding parameter 2: type 'dict' is not supported" (a ProgrammingError), 1-based.
_BINDING_PARAMETER = re.compile(r"Error binding parameter :?(\d+)")
# "NOT NULL constraint failed: t.c", "UNIQUE constraint failed: t.a, t.b",
# "CHECK constraint failed: <the expression, or the constraint's name>".
_CONSTRAINT_FAILED = re.compile(r"(NOT NULL|UNIQUE|CHECK|PRIMARY KEY) constraint failed: (.*)")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _quote(identifier: str) -> str:
    return f'"{identifier}"'


def _json_text(value: Any) -> str:
    """A json column's value as stored: strict JSON text (None is the JSON null)."""
    return json.dumps(value, allow_nan=False)


def _double(value: Any) -> Any:
    """A double column's value as bound: an int as the double it stands for (sqlite3 would bind
    an int beyond 64 bits as an INTEGER and fail, one within as INTEGER and let REAL affinity
    convert it)."""
    return float(value) if type(value) is int else value


class SqliteSink(SqlStateMethods, SqlSink):
    """Writes rows and checkpoints to one SQLite database file in a single transaction.

    Capabilities: `consumer.Sink`, `consumer.LimitedSink`, `consumer.CheckpointAdmin`,
    `consumer.JobStore`, `consumer.StateStore` (`sinks._sql_state`). Fencing: an epoch per
    (group, partition) in the lease table, checked by `consumer.check_epochs` in
    `save_checkpoints` under the database's write lock (BEGIN IMMEDIATE), so no newer owner's
    `acquire` can interleave.

    Values (`value_limits`, through `consumer.LimitedSink`, checked by the engine before the
    transaction): no NaN in a double column (SQLite stores it as NULL).

    Errors: calls the engine makes inside a batch (`begin`, `write_rows`, `save_checkpoints`)
    and reads leave the rollback to the caller (the engine always calls `rollback()` after a
    failure); calls that open their own transaction roll it back before raising. A batch's
    rows refused for a data reason are a `consumer.RowsRefusedError` naming the table and,
    where known, the column: `sqlite3.IntegrityError` (a violated constraint, from
    `write_rows` or `commit`), `sqlite3.DataError` (a value too big), and the errors Python's
    sqlite3 raises binding a value (an int beyond 64 bits, a lone surrogate, an unsupported
    type). `sqlite3.OperationalError` (locked, disk I/O) stays a `SinkError`, a full disk
    (SQLITE_FULL) a `SinkFullError`; both are retried. Each carries SQLite's error name as
    `code` (e.g. SQLITE_BUSY).
    """

    driver_error = sqlite3.Error

    def __init__(
        self,
        path: str | Path,
        *,
        checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE,
        lease_table: str = DEFAULT_LEASE_TABLE,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self._path = Path(path)
        self._checkpoint_table = _quote(check_identifier(checkpoint_table, what="checkpoint table"))
        self._lease_table = _quote(check_identifier(lease_table, what="lease table"))
        self._own_tables = own_table_names(checkpoint_table, lease_table)
        self._busy_timeout_s = busy_timeout_s
        self._connection: sqlite3.Connection | None = None
        self._upsert_sql: dict[str, str] = {}
        # Per upsert table: the position-guarded upsert, and the one that overwrites newer rows.
        self._guarded_sql: dict[str, tuple[str, str]] = {}
        self._encoders: dict[str, tuple[Callable[[Any], Any] | None, ...]] = {}
        self._state = SqliteStateTable(lambda: self._db, self._mapped)

    @property
    def description(self) -> str:
        return f"sqlite:///{self._path}"

    @property
    def value_limits(self) -> ValueLimits:
        return _VALUE_LIMITS

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise SinkError("sink is not open", sink=self.description)
        return self._connection

    def _is_missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)

    def _is_storage_full(self, exc: Exception) -> bool:
        # SQLITE_FULL: a write met ENOSPC (or the database reached max_page_count).
        return isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode == sqlite3.SQLITE_FULL

    def _error_context(self, exc: Exception) -> dict[str, Any]:
        # The code lets /readyz and the status page name the failure without the message.
        code = exc.sqlite_errorname if isinstance(exc, sqlite3.Error) else None
        return {"code": code, "reason": str(exc)}

    def _refusal(self, exc: Exception, written: Written) -> Refusal | None:
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
            return Refusal(str(exc), _constraint_column(str(exc), written.table))
        binding = _BINDING_PARAMETER.match(str(exc))
        if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError) and binding:
            columns = list(written.table.columns) if written.table is not None else []
            index = int(binding[1]) - 1
            return Refusal(str(exc), columns[index] if 0 <= index < len(columns) else None)
        if isinstance(exc, _BINDING_ERRORS):
            return Refusal(f"{type(exc).__name__}: {exc}", unbindable_column(written))
        return None

    def open(self, tables: Sequence[Table]) -> None:
        self._check_app_tables(tables)
        with self._mapped("cannot open SQLite sink"):
            if self._path.parent != Path():
                self._path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
            # check_same_thread=False: the asyncio driver calls the sink from a worker pool,
            # one call at a time (the Sink contract is single-caller), so any thread may.
            self._connection = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we tell Kafka (advisory) or move on.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            self._create_own_tables()
            for table in tables:
                self._create_table(table)
            self._db.execute("COMMIT")

    def open_existing(self) -> None:
        with self._mapped("cannot open SQLite sink", rollback=False):
            if self._path.exists():
                self._connection = sqlite3.connect(
                    f"file:{self._path}?mode=ro",
                    uri=True,
                    timeout=self._busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                # Nothing stored yet: an empty in-memory database answers every read with nothing.
                self._connection = sqlite3.connect(
                    ":memory:", isolation_level=None, check_same_thread=False
                )

    def _create_own_tables(self) -> None:
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {self._checkpoint_table} ("
            " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
            " next_offset INTEGER NOT NULL, format_version INTEGER NOT NULL,"
            " updated_at_ms INTEGER NOT NULL,"
            " PRIMARY KEY (group_id, topic, partition))"
        )
        # Format v2 columns; a table created by v1 code gets them here (its rows keep
        # format_version 1 and are upgraded when read).
        present = {
            row[1] for row in self._db.execute(f"PRAGMA table_info({self._checkpoint_table})")
        }
        for column in CHECKPOINT_V2_COLUMNS:
            if column not in present:
                self._db.execute(
                    f"ALTER TABLE {self._checkpoint_table} ADD COLUMN {column} {_V2_TYPES[column]}"
                )
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {JOB_TABLE} ("
            " job_id TEXT PRIMARY KEY, document TEXT NOT NULL, created_at_ms INTEGER NOT NULL)"
        )
        self._state.create()
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {self._lease_table} ("
            " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
            " epoch INTEGER NOT NULL, acquired_at_ms INTEGER NOT NULL,"
            " PRIMARY KEY (group_id, topic, partition))"
        )

    def _create_table(self, table: Table) -> None:
        name = _quote(table.name)
        columns = ", ".join(
            f"{_quote(column)} {_SQLITE_TYPES[column_type]}"
            for column, column_type in table.columns.items()
        )
        key = ", ".join(_quote(column) for column in table.key)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}, PRIMARY KEY ({key}))")
        existing = {row[1] for row in self._db.execute(f"PRAGMA table_info({name})")}
        # Upsert tables keep each row's source position; rows of an older table have none
        # (NULL), which counts as oldest.
        for column, column_type in stored_columns(table).items():
            if column not in existing:
                self._db.execute(
                    f"ALTER TABLE {name} ADD COLUMN {_quote(column)} {_SQLITE_TYPES[column_type]}"
                )
        column_list = list(table.columns)
        updates = [c for c in column_list if c not in table.key]
        conflict = (
            "DO UPDATE SET " + ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in updates)
            if updates
            else "DO NOTHING"
        )
        self._upsert_sql[table.name] = (
            f"INSERT INTO {name} ({', '.join(_quote(c) for c in column_list)}) "
            f"VALUES ({', '.join('?' for _ in column_list)}) ON CONFLICT ({key}) {conflict}"
        )
        if table.mode == "upsert":
            self._guarded_sql[table.name] = _guarded_upserts(table)
        self._encoders[table.name] = tuple(
            _json_text if t == "json" else _double if t == "double" else None
            for t in table.columns.values()
        )

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        now_ms = _now_ms()
        epochs: dict[TopicPartition, int] = {}
        with self._mapped("cannot acquire partition epochs"):
            self._db.execute("BEGIN IMMEDIATE")
            for tp in partitions:
                row = self._db.execute(
                    f"INSERT INTO {self._lease_table}"
                    " (group_id, topic, partition, epoch, acquired_at_ms) VALUES (?, ?, ?, 1, ?)"
                    " ON CONFLICT (group_id, topic, partition)"
                    " DO UPDATE SET epoch = epoch + 1, acquired_at_ms = excluded.acquired_at_ms"
                    " RETURNING epoch",
                    (group, tp.topic, tp.partition, now_ms),
                ).fetchone()
                epochs[tp] = int(row[0])
            self._db.execute("COMMIT")
        return epochs

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        wanted = None if partitions is None else set(partitions)
        rows: list[Any] = []
        with self._mapped("cannot read checkpoints", rollback=False, missing_table_ok=True):
            present = {
                row[1] for row in self._db.execute(f"PRAGMA table_info({self._checkpoint_table})")
            }
            rows = self._db.execute(
                f"SELECT {_CHECKPOINT_ROWS.select_list(present)}"
                f" FROM {self._checkpoint_table} WHERE group_id = ?",
                (group,),
            ).fetchall()
        checkpoints: dict[TopicPartition, Checkpoint] = {}
        for row in rows:
            tp = TopicPartition(row[1], row[2])
            if wanted is None or tp in wanted:
                checkpoints[tp] = _CHECKPOINT_ROWS.decode(row)
        return checkpoints

    def begin(self) -> None:
        with self._mapped("cannot begin a transaction", rollback=False):
            self._db.execute("BEGIN IMMEDIATE")

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        if not rows:
            return
        sql = self._upsert_sql[table.name]
        columns = tuple(zip(table.columns, self._encoders[table.name], strict=True))
        written = Written(table, rows)
        with self._mapped("cannot write rows", rollback=False, written=written, table=table.name):
            params = [
                tuple(row.get(c) if encode is None else encode(row.get(c)) for c, encode in columns)
                for row in rows
            ]
            self._db.executemany(sql, params)

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        if not rows:
            return
        guarded, overwriting = self._guarded_sql[table.name]
        columns = tuple(zip(table.columns, self._encoders[table.name], strict=True))
        written = Written(table, rows)
        with self._mapped("cannot write rows", rollback=False, written=written, table=table.name):
            params = [
                (
                    *(
                        row.get(c) if encode is None else encode(row.get(c))
                        for c, encode in columns
                    ),
                    *position_values(position),
                )
                for row, position in zip(rows, positions, strict=True)
            ]
            self._db.executemany(overwriting if overwrite_newer else guarded, params)

    def read_stored_rows(
        self, table: Table
    ) -> Iterator[tuple[dict[str, Any], StoredPosition | None]]:
        names = list(table.columns)
        selected = list(stored_columns(table))
        decoders = [_json_loads if t == "json" else None for t in table.columns.values()]
        with self._mapped("cannot read rows", rollback=False, table=table.name):
            cursor = self._db.execute(
                f"SELECT {', '.join(_quote(c) for c in selected)} FROM {_quote(table.name)}"
            )
            for stored in cursor:
                values = {
                    name: value if decode is None or value is None else decode(value)
                    for name, value, decode in zip(names, stored, decoders, strict=False)
                }
                yield values, stored_position(stored[len(names) :])

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        with self._mapped("cannot save checkpoints", rollback=False):
            # The batch's BEGIN IMMEDIATE holds the database's write lock: no acquire by a
            # newer owner interleaves between this read and the commit. One query reads the
            # group's epochs (a group has few partitions); the rule is consumer's.
            current = {
                TopicPartition(topic, partition): int(epoch)
                for topic, partition, epoch in self._db.execute(
                    f"SELECT topic, partition, epoch FROM {self._lease_table} WHERE group_id = ?",
                    (group,),
                )
            }
            check_epochs(group, {cp.topic_partition for cp in checkpoints}, current, epochs)
            self._write_checkpoints(checkpoints)

    def _write_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        self._db.executemany(
            _CHECKPOINT_ROWS.upsert("?").format(self._checkpoint_table),
            [_CHECKPOINT_ROWS.encode(cp) for cp in checkpoints],
        )

    def checkpoint_groups(self) -> list[str]:
        rows: list[Any] = []
        with self._mapped("cannot list checkpoint groups", rollback=False, missing_table_ok=True):
            rows = self._db.execute(
                f"SELECT DISTINCT group_id FROM {self._checkpoint_table} ORDER BY group_id"
            ).fetchall()
        return [str(row[0]) for row in rows]

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        with self._mapped("cannot migrate checkpoints"):
            if not dry_run:
                self._db.execute("BEGIN IMMEDIATE")  # the write lock: no commit interleaves
            older = [
                checkpoint
                for group in self.checkpoint_groups()
                for checkpoint in self.load_checkpoints(group).values()
                if (checkpoint.read_from_format or CURRENT_FORMAT_VERSION) < CURRENT_FORMAT_VERSION
            ]
            if not dry_run:
                if older:
                    self._write_checkpoints(older)
                self._db.execute("COMMIT")
        return older

    def create_job(self, job_id: str, document: str) -> str:
        with self._mapped("cannot store replay job", job=job_id):
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"INSERT INTO {JOB_TABLE} (job_id, document, created_at_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id) DO NOTHING",
                (job_id, document, _now_ms()),
            )
            row = self._db.execute(
                f"SELECT document FROM {JOB_TABLE} WHERE job_id = ?", (job_id,)
            ).fetchone()
            self._db.execute("COMMIT")
        return str(row[0])

    def load_job(self, job_id: str) -> str | None:
        row = None
        with self._mapped(
            "cannot read replay job", rollback=False, missing_table_ok=True, job=job_id
        ):
            row = self._db.execute(
                f"SELECT document FROM {JOB_TABLE} WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def commit(self) -> None:
        # A deferred constraint (a foreign key) is checked at COMMIT: a refusal too.
        with self._mapped("commit failed; batch rolled back", written=Written()):
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        self._rollback_quietly()

    def _rollback_quietly(self) -> None:
        if self._connection is not None and self._connection.in_transaction:
            # The transaction may already be gone (the error that got us here ended it).
            with contextlib.suppress(sqlite3.Error):
                self._connection.execute("ROLLBACK")

    def close(self) -> None:
        if self._connection is not None:
            self._rollback_quietly()
            self._connection.close()
            self._connection = None

    def interrupt(self) -> None:
        """Abort the statement running on another thread (a shutdown aborting a batch)."""
        if self._connection is not None:
            self._connection.interrupt()


def _json_loads(text: Any) -> Any:
    return json.loads(text)


def _guarded_upserts(table: Table) -> tuple[str, str]:
    """The upsert of an upsert table with its source position (the position columns bound
    last): guarded (a stored row from a newer position stays, see
    `consumer.core.records.replaces`), and overwriting (`replay --overwrite-newer`)."""
    name = _quote(table.name)
    columns = [*table.columns, *POSITION_COLUMNS]
    key = ", ".join(_quote(column) for column in table.key)
    updates = ", ".join(
        f"{_quote(c)} = excluded.{_quote(c)}" for c in columns if c not in table.key
    )
    insert = (
        f"INSERT INTO {name} ({', '.join(_quote(c) for c in columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )
    return f"{insert} WHERE {position_guard(name)}", insert


def _now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)


def _constraint_column(message: str, table: Table | None) -> str | None:
    """The one column a failed constraint is about, where SQLite's message says it: "NOT NULL
    constraint failed: t.c", a UNIQUE constraint of one column, or a CHECK whose expression
    names exactly one of the table's columns ("CHECK constraint failed: amount >= 0"; a named
    CHECK constraint shows only its name)."""
    failed = _CONSTRAINT_FAILED.search(message)
    if failed is None or table is None:
        return None
    kind, what = failed.groups()
    if kind == "CHECK":
        named = {word for word in _WORD.findall(what) if word in table.columns}
        return named.pop() if len(named) == 1 else None
    columns = [part.strip().rpartition(".")[2] for part in what.split(",")]
    return columns[0] if len(columns) == 1 and columns[0] in table.columns else None
