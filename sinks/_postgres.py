"""PostgreSQL sink (psycopg 3): COPY into a staging table, one merge, checkpoints, one COMMIT."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from consumer import (
    CURRENT_FORMAT_VERSION,
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
    mask_url,
)
from sinks._postgres_refusals import constraint_column, refusal
from sinks._postgres_rows import (
    create_app_table,
    existing_columns,
    merge_rows,
    on_conflict,
    read_stored_rows,
)
from sinks._postgres_staging import StagingTables, check_staging_names
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
)
from sinks._sql_state import PostgresStateTable, SqlStateMethods

_V2_TYPES = {
    "epoch": "BIGINT NOT NULL DEFAULT 0",
    "leader_epoch": "INTEGER",
    "writer_version": "TEXT",
    "state": "BYTEA",
    "state_version": "INTEGER",
}


# The update time is stored as a TIMESTAMPTZ: psycopg adapts the datetime as it is.
_CHECKPOINT_ROWS = CheckpointRows(
    updated_at_column="updated_at", store_updated_at=lambda updated_at: updated_at
)

# Serializes DDL between members starting at once (CREATE ... IF NOT EXISTS still races).
_DDL_LOCK_KEY = 0x6F6B_6464  # "okdd"

# text cannot hold NUL, and jsonb refuses "\u0000": refused before the transaction.
_VALUE_LIMITS = ValueLimits(nul_in_text=False, nul_in_json=False)


class PostgresSink(SqlStateMethods, SqlSink):
    """Writes rows and checkpoints to PostgreSQL in one transaction per batch.

    Capabilities: `consumer.Sink`, `consumer.LimitedSink`, `consumer.CheckpointAdmin`,
    `consumer.JobStore`, `consumer.StateStore`. Fencing: an epoch per (group, partition) in the
    lease table; `save_checkpoints` locks the batch's lease rows (FOR UPDATE, in one order) and
    checks them with `consumer.check_epochs`, so a newer owner's `acquire` waits for this
    batch's COMMIT or this batch sees its epoch. Values (`value_limits`, checked by the engine
    before the transaction): no NUL in text, no `\\u0000` in json (jsonb).

    Errors: a failed statement aborts a PostgreSQL transaction, so every failure rolls the
    session's transaction back before it is raised (`SqlSink._mapped`); a staging table made in
    it is made again by the next (`sinks._postgres_staging`). Rows refused for a data reason
    (`sinks._postgres_refusals`: SQLSTATE class 22 or 23, a value psycopg cannot dump) are a
    `consumer.RowsRefusedError` naming the table and, where known, the column; every other
    failure is a `SinkError` (retried).
    """

    driver_error = psycopg.Error

    def __init__(
        self,
        dsn: str,
        *,
        options: Mapping[str, str] | None = None,
        checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE,
        lease_table: str = DEFAULT_LEASE_TABLE,
    ) -> None:
        self._dsn = dsn
        self._options = dict(options or {})
        self._options.setdefault("connect_timeout", "10")
        self._checkpoint_name = check_identifier(checkpoint_table, what="checkpoint table")
        self._checkpoints = sql.Identifier(self._checkpoint_name)
        self._leases = sql.Identifier(check_identifier(lease_table, what="lease table"))
        self._own_tables = own_table_names(checkpoint_table, lease_table)
        self._tables: tuple[Table, ...] = ()
        self._connection: psycopg.Connection[Any] | None = None
        self._staging = StagingTables()
        self._state = PostgresStateTable(self._connect, self._mapped)

    @property
    def description(self) -> str:
        return mask_url(self._dsn)

    @property
    def value_limits(self) -> ValueLimits:
        return _VALUE_LIMITS

    def _is_missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.UndefinedTable)

    def _error_context(self, exc: Exception) -> dict[str, Any]:
        sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
        return {"sqlstate": sqlstate, "reason": str(exc).strip()}

    def _is_storage_full(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.DiskFull)  # SQLSTATE 53100

    def _refusal(self, exc: Exception, written: Written) -> Refusal | None:
        return refusal(
            exc,
            written,
            lambda error: constraint_column(self._connection, error, self._rollback_quietly),
        )

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._connection is not None and not self._connection.closed:
            if not self._connection.broken:
                return self._connection
            self._connection.close()
        # No reason shown: libpq's message may quote the connection string, password included.
        with self._mapped("cannot connect to PostgreSQL", rollback=False, show_reason=False):
            conninfo = make_conninfo(self._dsn, **self._options)
            self._connection = psycopg.connect(conninfo, autocommit=False)
        self._staging.session_ended()
        return self._connection

    @property
    def _db(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            raise SinkError("sink is not open", sink=self.description)
        return self._connection

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self, tables: Sequence[Table]) -> None:
        self._check_app_tables(tables)
        check_staging_names(tables)
        self._tables = tuple(tables)
        db = self._connect()
        with self._mapped("cannot create sink tables"):
            with db.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
                self._create_own_tables(cursor)
                for table in tables:
                    create_app_table(cursor, table)
            db.commit()

    def _create_own_tables(self, cursor: psycopg.Cursor[Any]) -> None:
        cursor.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                " next_offset BIGINT NOT NULL, format_version INTEGER NOT NULL,"
                " updated_at TIMESTAMPTZ NOT NULL,"
                " PRIMARY KEY (group_id, topic, partition))"
            ).format(self._checkpoints)
        )
        # Format v2 columns; a table created by v1 code gets them here (its rows keep
        # format_version 1 and are upgraded when read).
        present = existing_columns(cursor, self._checkpoint_name)
        for column in CHECKPOINT_V2_COLUMNS:
            if column in present:
                continue  # ALTER takes an exclusive lock even when it changes nothing
            cursor.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    self._checkpoints, sql.Identifier(column), sql.SQL(_V2_TYPES[column])
                )
            )
        cursor.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                " epoch BIGINT NOT NULL, acquired_at TIMESTAMPTZ NOT NULL,"
                " PRIMARY KEY (group_id, topic, partition))"
            ).format(self._leases)
        )
        self._state.create(cursor)
        cursor.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (job_id TEXT PRIMARY KEY,"
                " document TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ).format(sql.Identifier(JOB_TABLE))
        )

    def open_existing(self) -> None:
        self._connect()

    def close(self) -> None:
        if self._connection is not None:
            self._rollback_quietly()
            self._connection.close()
            self._connection = None

    def interrupt(self) -> None:
        """Cancel the statement running on another thread (a shutdown aborting a batch)."""
        connection = self._connection
        if connection is not None and not connection.closed:
            connection.cancel_safe(timeout=5.0)

    # -- assignment ------------------------------------------------------------------------------

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        db = self._connect()
        epochs: dict[TopicPartition, int] = {}
        with self._mapped("cannot acquire partition epochs"):
            with db.cursor() as cursor:
                for tp in sorted(partitions):  # one lock order for every member: no deadlocks
                    cursor.execute(
                        sql.SQL(
                            "INSERT INTO {leases} AS l"
                            " (group_id, topic, partition, epoch, acquired_at)"
                            " VALUES (%s, %s, %s, 1, now())"
                            " ON CONFLICT (group_id, topic, partition)"
                            " DO UPDATE SET epoch = l.epoch + 1, acquired_at = now()"
                            " RETURNING epoch"
                        ).format(leases=self._leases),
                        (group, tp.topic, tp.partition),
                    )
                    row = cursor.fetchone()
                    if row is None:
                        raise SinkError("lease upsert returned nothing", topic=tp.topic)
                    epochs[tp] = int(row[0])
            db.commit()
        return epochs

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        wanted = None if partitions is None else set(partitions)
        db = self._connect()
        checkpoints: dict[TopicPartition, Checkpoint] = {}
        with self._mapped("cannot read checkpoints", missing_table_ok=True):
            with db.cursor() as cursor:
                checkpoints = self._read_checkpoints(cursor, group)
            db.commit()
        if wanted is None:
            return checkpoints
        return {tp: cp for tp, cp in checkpoints.items() if tp in wanted}

    def _read_checkpoints(
        self, cursor: psycopg.Cursor[Any], group: str
    ) -> dict[TopicPartition, Checkpoint]:
        present = existing_columns(cursor, self._checkpoint_name)
        cursor.execute(
            sql.SQL("SELECT {} FROM {} WHERE group_id = %s").format(
                sql.SQL(_CHECKPOINT_ROWS.select_list(present)), self._checkpoints
            ),
            (group,),
        )
        checkpoints: dict[TopicPartition, Checkpoint] = {}
        for row in cursor.fetchall():
            checkpoints[TopicPartition(row[1], row[2])] = _CHECKPOINT_ROWS.decode(row)
        return checkpoints

    # -- the batch transaction -------------------------------------------------------------------

    def begin(self) -> None:  # psycopg opens the transaction at the first statement
        self._connect()

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        if rows:
            with self._mapped("cannot write rows", written=Written(table, rows), table=table.name):
                merge_rows(
                    self._db,
                    self._staging,
                    table,
                    rows,
                    positions=None,
                    conflict=on_conflict(table),
                )

    def write_guarded_rows(
        self,
        table: Table,
        rows: Sequence[Mapping[str, Any]],
        positions: Sequence[SourcePosition],
        *,
        overwrite_newer: bool = False,
    ) -> None:
        if rows:
            conflict = on_conflict(table, positions=True, guarded=not overwrite_newer)
            with self._mapped("cannot write rows", written=Written(table, rows), table=table.name):
                merge_rows(
                    self._db, self._staging, table, rows, positions=positions, conflict=conflict
                )

    def read_stored_rows(
        self, table: Table
    ) -> Iterator[tuple[dict[str, Any], StoredPosition | None]]:
        conninfo = make_conninfo(self._dsn, **self._options)
        with self._mapped("cannot read rows", table=table.name):
            yield from read_stored_rows(conninfo, table)

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        if not checkpoints:
            return
        partitions = sorted({cp.topic_partition for cp in checkpoints})
        with self._mapped("cannot save checkpoints"), self._db.cursor() as cursor:
            # Lock our lease rows: a new owner's acquire waits for our COMMIT, or we see
            # its newer epoch here and refuse to commit.
            cursor.execute(
                sql.SQL(
                    "SELECT topic, partition, epoch FROM {} WHERE group_id = %s"
                    " AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
                    " ORDER BY topic, partition FOR UPDATE"
                ).format(self._leases),
                (group, [tp.topic for tp in partitions], [tp.partition for tp in partitions]),
            )
            current = {TopicPartition(t, p): int(e) for t, p, e in cursor.fetchall()}
            check_epochs(group, partitions, current, epochs)
            self._write_checkpoints(cursor, checkpoints)

    def _write_checkpoints(
        self, cursor: psycopg.Cursor[Any], checkpoints: Sequence[Checkpoint]
    ) -> None:
        cursor.executemany(
            sql.SQL(_CHECKPOINT_ROWS.upsert("%s")).format(self._checkpoints),
            [_CHECKPOINT_ROWS.encode(cp) for cp in checkpoints],
        )

    def commit(self) -> None:
        # A deferred constraint is checked at COMMIT: a refusal too (of the table it names).
        with self._mapped("commit failed; batch rolled back", written=Written()):
            self._db.commit()
        self._staging.committed()

    def rollback(self) -> None:
        self._rollback_quietly()

    def _rollback_quietly(self) -> None:
        self._staging.rolled_back()  # a staging table made in it is gone
        connection = self._connection
        if connection is None or connection.closed:
            return
        try:
            connection.rollback()
        except psycopg.Error:
            # A broken session cannot roll back; closing it discards the transaction.
            connection.close()

    # -- checkpoint tools and replay jobs ----------------------------------------------------------

    def checkpoint_groups(self) -> list[str]:
        db = self._connect()
        rows: list[Any] = []
        with self._mapped("cannot list checkpoint groups", missing_table_ok=True):
            with db.cursor() as cursor:
                cursor.execute(
                    sql.SQL("SELECT DISTINCT group_id FROM {} ORDER BY group_id").format(
                        self._checkpoints
                    )
                )
                rows = cursor.fetchall()
            db.commit()
        return [str(row[0]) for row in rows]

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        db = self._connect()
        older: list[Checkpoint] = []  # also when nothing is stored yet (no table)
        with self._mapped("cannot migrate checkpoints", missing_table_ok=True):
            with db.cursor() as cursor:
                # Lock every older row: a live consumer's commit waits for us, never interleaves.
                cursor.execute(
                    sql.SQL(
                        "SELECT group_id FROM {} WHERE format_version < %s"
                        " ORDER BY group_id, topic, partition FOR UPDATE"
                    ).format(self._checkpoints),
                    (CURRENT_FORMAT_VERSION,),
                )
                groups = sorted({str(row[0]) for row in cursor.fetchall()})
                older = [
                    checkpoint
                    for group in groups
                    for checkpoint in self._read_checkpoints(cursor, group).values()
                    if (checkpoint.read_from_format or CURRENT_FORMAT_VERSION)
                    < CURRENT_FORMAT_VERSION
                ]
                if older and not dry_run:
                    self._write_checkpoints(cursor, older)
            if dry_run:
                db.rollback()
            else:
                db.commit()
        return older

    def create_job(self, job_id: str, document: str) -> str:
        db = self._connect()
        jobs = sql.Identifier(JOB_TABLE)
        with self._mapped("cannot store replay job", job=job_id):
            with db.cursor() as cursor:
                cursor.execute(
                    sql.SQL(
                        "INSERT INTO {} (job_id, document) VALUES (%s, %s)"
                        " ON CONFLICT (job_id) DO NOTHING"
                    ).format(jobs),
                    (job_id, document),
                )
                cursor.execute(
                    sql.SQL("SELECT document FROM {} WHERE job_id = %s").format(jobs), (job_id,)
                )
                row = cursor.fetchone()
            db.commit()
        if row is None:
            raise SinkError("replay job vanished after insert", job=job_id)
        return str(row[0])

    def load_job(self, job_id: str) -> str | None:
        db = self._connect()
        row = None
        with self._mapped("cannot read replay job", missing_table_ok=True, job=job_id):
            with db.cursor() as cursor:
                cursor.execute(
                    sql.SQL("SELECT document FROM {} WHERE job_id = %s").format(
                        sql.Identifier(JOB_TABLE)
                    ),
                    (job_id,),
                )
                row = cursor.fetchone()
            db.commit()
        return None if row is None else str(row[0])
