"""PostgreSQL sink (psycopg 3): COPY into a staging table, one merge, checkpoints, one COMMIT."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    FencedError,
    RowsOrigin,
    SinkError,
    Table,
    TopicPartition,
    check_identifier,
    decode_checkpoint,
    encode_checkpoint,
    mask_url,
)
from sinks._sql import (
    CHECKPOINT_V2_COLUMNS,
    DEFAULT_CHECKPOINT_TABLE,
    DEFAULT_LEASE_TABLE,
    JOB_TABLE,
)

_V2_TYPES = {
    "epoch": "BIGINT NOT NULL DEFAULT 0",
    "leader_epoch": "INTEGER",
    "writer_version": "TEXT",
    "state": "BYTEA",
    "state_version": "INTEGER",
}

_PG_TYPES = {
    "text": "TEXT",
    "bigint": "BIGINT",
    "integer": "INTEGER",
    "double": "DOUBLE PRECISION",
    "boolean": "BOOLEAN",
    "bytes": "BYTEA",
    "json": "JSONB",
}

# Serializes DDL between members starting at once (CREATE ... IF NOT EXISTS still races).
_DDL_LOCK_KEY = 0x6F6B_6464  # "okdd"


class PostgresSink:
    """Writes rows and checkpoints to PostgreSQL in one transaction per batch."""

    writes_per_partition = False

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
        self._tables: tuple[Table, ...] = ()
        self._connection: psycopg.Connection[Any] | None = None
        self._staged: set[str] = set()

    @property
    def description(self) -> str:

        return mask_url(self._dsn)

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._connection is not None and not self._connection.closed:
            if not self._connection.broken:
                return self._connection
            self._connection.close()
        try:
            conninfo = make_conninfo(self._dsn, **self._options)
            self._connection = psycopg.connect(conninfo, autocommit=False)
        except psycopg.Error as exc:
            raise SinkError("cannot connect to PostgreSQL", sink=self.description) from exc
        self._staged.clear()  # temporary staging tables died with the old session
        return self._connection

    @property
    def _db(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            raise SinkError("sink is not open", sink=self.description)
        return self._connection

    def _fail(self, message: str, exc: psycopg.Error, **context: Any) -> SinkError:
        self._rollback_quietly()
        return SinkError(
            message,
            sink=self.description,
            sqlstate=exc.sqlstate,
            reason=str(exc).strip(),
            **context,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self, tables: Sequence[Table]) -> None:
        self._tables = tuple(tables)
        db = self._connect()
        try:
            with db.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
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
                present = _existing_columns(cursor, self._checkpoint_name)
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
                cursor.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (job_id TEXT PRIMARY KEY,"
                        " document TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                    ).format(sql.Identifier(JOB_TABLE))
                )
                for table in tables:
                    self._create_table(cursor, table)
            db.commit()
        except psycopg.Error as exc:
            raise self._fail("cannot create sink tables", exc) from exc

    def open_existing(self) -> None:
        self._connect()

    def _create_table(self, cursor: psycopg.Cursor[Any], table: Table) -> None:
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_PG_TYPES[t]))
            for c, t in table.columns.items()
        )
        key = sql.SQL(", ").join(sql.Identifier(c) for c in table.key)
        cursor.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                sql.Identifier(table.name), columns, key
            )
        )
        present = _existing_columns(cursor, table.name)
        for column, column_type in table.columns.items():
            if column in present:
                # ALTER would take an ACCESS EXCLUSIVE lock even with IF NOT EXISTS, and
                # deadlock with running members' batches; only migrate what is missing.
                continue
            cursor.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    sql.Identifier(table.name),
                    sql.Identifier(column),
                    sql.SQL(_PG_TYPES[column_type]),
                )
            )

    def close(self) -> None:
        if self._connection is not None:
            self._rollback_quietly()
            self._connection.close()
            self._connection = None

    # -- assignment ------------------------------------------------------------------------------

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        db = self._connect()
        epochs: dict[TopicPartition, int] = {}
        try:
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
        except psycopg.Error as exc:
            raise self._fail("cannot acquire partition epochs", exc) from exc
        return epochs

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        wanted = None if partitions is None else set(partitions)
        db = self._connect()
        try:
            with db.cursor() as cursor:
                checkpoints = self._read_checkpoints(cursor, group)
            db.commit()
        except psycopg.errors.UndefinedTable:
            self._rollback_quietly()
            return {}
        except psycopg.Error as exc:
            raise self._fail("cannot read checkpoints", exc) from exc
        if wanted is None:
            return checkpoints
        return {tp: cp for tp, cp in checkpoints.items() if tp in wanted}

    def _read_checkpoints(
        self, cursor: psycopg.Cursor[Any], group: str
    ) -> dict[TopicPartition, Checkpoint]:
        # A v1 table opened read-only has no v2 columns: read them as NULL.
        present = _existing_columns(cursor, self._checkpoint_name)
        v2 = sql.SQL(", ").join(
            sql.Identifier(c) if c in present else sql.SQL("NULL AS {}").format(sql.Identifier(c))
            for c in CHECKPOINT_V2_COLUMNS
        )
        cursor.execute(
            sql.SQL(
                "SELECT group_id, topic, partition, next_offset, format_version,"
                " updated_at, {} FROM {} WHERE group_id = %s"
            ).format(v2, self._checkpoints),
            (group,),
        )
        checkpoints: dict[TopicPartition, Checkpoint] = {}
        for row in cursor.fetchall():
            checkpoints[TopicPartition(row[1], row[2])] = decode_checkpoint(
                {
                    "format_version": row[4],
                    "group": row[0],
                    "topic": row[1],
                    "partition": row[2],
                    "next_offset": row[3],
                    "updated_at": row[5],
                    **dict(zip(CHECKPOINT_V2_COLUMNS, row[6:], strict=True)),
                }
            )
        return checkpoints

    # -- the batch transaction -------------------------------------------------------------------

    def begin(self) -> None:
        # psycopg opens the transaction at the first statement; make sure the session is alive.
        self._connect()

    def _staging_for(self, cursor: psycopg.Cursor[Any], table: Table) -> sql.Identifier:
        staging = sql.Identifier(f"offsetkeeper_stage_{table.name}")
        if table.name not in self._staged:
            cursor.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)"
                    " ON COMMIT DELETE ROWS"
                ).format(staging, sql.Identifier(table.name))
            )
            self._staged.add(table.name)
        return staging

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        if not rows:
            return
        columns = list(table.columns)
        json_columns = {c for c, t in table.columns.items() if t == "json"}
        column_list = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        updates = [c for c in columns if c not in table.key]
        conflict = (
            sql.SQL("DO UPDATE SET ")
            + sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates
            )
            if updates
            else sql.SQL("DO NOTHING")
        )
        try:
            with self._db.cursor() as cursor:
                staging = self._staging_for(cursor, table)
                with cursor.copy(
                    sql.SQL("COPY {} ({}) FROM STDIN").format(staging, column_list)
                ) as copy:
                    for row in rows:
                        copy.write_row(
                            [
                                Jsonb(row.get(c)) if c in json_columns else row.get(c)
                                for c in columns
                            ]
                        )
                cursor.execute(
                    sql.SQL(
                        "INSERT INTO {target} ({columns}) SELECT {columns} FROM {staging}"
                        " ON CONFLICT ({key}) {conflict}"
                    ).format(
                        target=sql.Identifier(table.name),
                        columns=column_list,
                        staging=staging,
                        key=sql.SQL(", ").join(sql.Identifier(c) for c in table.key),
                        conflict=conflict,
                    )
                )
                # ON COMMIT DELETE ROWS empties it at commit; a retry in the same
                # transaction must not see these rows twice.
                cursor.execute(sql.SQL("TRUNCATE {}").format(staging))
        except psycopg.Error as exc:
            raise self._fail("cannot write rows", exc, table=table.name) from exc

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        if not checkpoints:
            return
        partitions = sorted({cp.topic_partition for cp in checkpoints})
        try:
            with self._db.cursor() as cursor:
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
                _refuse_stale_epochs(group, partitions, current, epochs)
                self._write_checkpoints(cursor, checkpoints)
        except FencedError:
            self._rollback_quietly()
            raise
        except psycopg.Error as exc:
            raise self._fail("cannot save checkpoints", exc) from exc

    def _write_checkpoints(
        self, cursor: psycopg.Cursor[Any], checkpoints: Sequence[Checkpoint]
    ) -> None:
        records = [encode_checkpoint(cp) for cp in checkpoints]
        cursor.executemany(
            sql.SQL(
                "INSERT INTO {} AS c"
                " (group_id, topic, partition, next_offset, format_version, updated_at,"
                " epoch, leader_epoch, writer_version, state, state_version)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (group_id, topic, partition) DO UPDATE SET"
                " next_offset = EXCLUDED.next_offset,"
                " format_version = EXCLUDED.format_version,"
                " updated_at = EXCLUDED.updated_at, epoch = EXCLUDED.epoch,"
                " leader_epoch = EXCLUDED.leader_epoch,"
                " writer_version = EXCLUDED.writer_version,"
                " state = EXCLUDED.state, state_version = EXCLUDED.state_version"
            ).format(self._checkpoints),
            [
                (
                    r["group"],
                    r["topic"],
                    r["partition"],
                    r["next_offset"],
                    CURRENT_FORMAT_VERSION,
                    r["updated_at"],
                    *(r[column] for column in CHECKPOINT_V2_COLUMNS),
                )
                for r in records
            ],
        )

    def checkpoint_groups(self) -> list[str]:
        db = self._connect()
        try:
            with db.cursor() as cursor:
                cursor.execute(
                    sql.SQL("SELECT DISTINCT group_id FROM {} ORDER BY group_id").format(
                        self._checkpoints
                    )
                )
                rows = cursor.fetchall()
            db.commit()
        except psycopg.errors.UndefinedTable:
            self._rollback_quietly()
            return []
        except psycopg.Error as exc:
            raise self._fail("cannot list checkpoint groups", exc) from exc
        return [str(row[0]) for row in rows]

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        db = self._connect()
        try:
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
        except psycopg.errors.UndefinedTable:
            self._rollback_quietly()
            return []  # nothing stored yet
        except psycopg.Error as exc:
            raise self._fail("cannot migrate checkpoints", exc) from exc
        except BaseException:
            self._rollback_quietly()
            raise
        return older

    def create_job(self, job_id: str, document: str) -> str:
        db = self._connect()
        jobs = sql.Identifier(JOB_TABLE)
        try:
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
        except psycopg.Error as exc:
            raise self._fail("cannot store replay job", exc, job=job_id) from exc
        if row is None:
            raise SinkError("replay job vanished after insert", job=job_id)
        return str(row[0])

    def load_job(self, job_id: str) -> str | None:
        db = self._connect()
        try:
            with db.cursor() as cursor:
                cursor.execute(
                    sql.SQL("SELECT document FROM {} WHERE job_id = %s").format(
                        sql.Identifier(JOB_TABLE)
                    ),
                    (job_id,),
                )
                row = cursor.fetchone()
            db.commit()
        except psycopg.errors.UndefinedTable:
            self._rollback_quietly()
            return None
        except psycopg.Error as exc:
            raise self._fail("cannot read replay job", exc, job=job_id) from exc
        return None if row is None else str(row[0])

    def commit(self) -> None:
        try:
            self._db.commit()
        except psycopg.Error as exc:
            raise self._fail("commit failed; batch rolled back", exc) from exc

    def rollback(self) -> None:
        self._rollback_quietly()

    def _rollback_quietly(self) -> None:
        connection = self._connection
        if connection is None or connection.closed:
            return
        try:
            connection.rollback()
        except psycopg.Error:
            # A broken session cannot roll back; closing it discards the transaction.
            connection.close()


def _existing_columns(cursor: psycopg.Cursor[Any], table: str) -> set[str]:
    cursor.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    )
    return {str(row[0]) for row in cursor.fetchall()}


def _refuse_stale_epochs(
    group: str,
    partitions: Sequence[TopicPartition],
    current: Mapping[TopicPartition, int],
    ours: Mapping[TopicPartition, int],
) -> None:
    fenced = [tp for tp in partitions if current.get(tp) != ours[tp]]
    if fenced:
        raise FencedError(
            "partitions were taken over by a newer owner; batch rolled back",
            partitions=[(tp.topic, tp.partition) for tp in fenced],
            group=group,
        )
