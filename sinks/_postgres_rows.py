"""How the PostgreSQL sink writes a table's rows and reads them back.

A batch's rows of one table are COPYed into the session's staging table, then merged into
their table by one INSERT ... ON CONFLICT. Upsert tables also carry each row's source position
(`consumer.POSITION_COLUMNS`), and the merge's conflict clause keeps a stored row whose
position is newer (`consumer.replaces`), in the same statement: no extra round trip and no
read-modify-write race with another writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from consumer import POSITION_COLUMNS, SourcePosition, StoredPosition, Table
from sinks._postgres_staging import StagingTables, copy_rows
from sinks._sql import position_guard, stored_columns, stored_position

PG_TYPES = {
    "text": "TEXT",
    "bigint": "BIGINT",
    "integer": "INTEGER",
    "double": "DOUBLE PRECISION",
    "boolean": "BOOLEAN",
    "bytes": "BYTEA",
    "json": "JSONB",
}

# The stored row is aliased "stored" in the merge; COLLATE "C" orders topics by code point, as
# Python does (the database's collation could order them otherwise).
_POSITION_GUARD = position_guard("stored", topic_collation='COLLATE "C"')


def on_conflict(table: Table, *, positions: bool = False, guarded: bool = False) -> sql.Composable:
    """What an upsert does with a row whose key exists: replace its other columns (and, with
    `positions`, its position columns); `guarded`: only when the stored row's position is not
    newer."""
    updates = [c for c in table.columns if c not in table.key]
    if positions:
        updates += list(POSITION_COLUMNS)
    if not updates:
        return sql.SQL("DO NOTHING")
    action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates
    )
    return action + sql.SQL(" WHERE " + _POSITION_GUARD) if guarded else action


def merge_rows(
    db: psycopg.Connection[Any],
    staging_tables: StagingTables,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    positions: Sequence[SourcePosition] | None,
    conflict: sql.Composable,
) -> None:
    """COPY the rows (with their positions) into the staging table, then one upsert, inside
    the open transaction."""
    merged = list(table.columns) if positions is None else [*table.columns, *POSITION_COLUMNS]
    column_list = sql.SQL(", ").join(sql.Identifier(c) for c in merged)
    with db.cursor() as cursor:
        staging = staging_tables.staging_for(cursor, table)
        copy_rows(cursor, staging, table, rows, positions)
        cursor.execute(
            sql.SQL(
                "INSERT INTO {target} AS stored ({columns}) SELECT {columns} FROM {staging}"
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


def read_stored_rows(
    conninfo: str, table: Table
) -> Iterator[tuple[dict[str, Any], StoredPosition | None]]:
    """Every row of `table` with its stored source position, streamed in one snapshot over a
    read-only connection of its own: a long read never holds up the batch transactions."""
    names = list(table.columns)
    selected = list(stored_columns(table))
    with psycopg.connect(conninfo) as reader:
        reader.read_only = True
        with reader.cursor(name="offsetkeeper_read_rows") as cursor:
            cursor.itersize = 5000
            cursor.execute(
                sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in selected),
                    sql.Identifier(table.name),
                )
            )
            for stored in cursor:
                yield dict(zip(names, stored, strict=False)), stored_position(stored[len(names) :])


def create_app_table(cursor: psycopg.Cursor[Any], table: Table) -> None:
    """Create an app table, or add the columns it lacks (the position columns too)."""
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(PG_TYPES[t]))
        for c, t in table.columns.items()
    )
    key = sql.SQL(", ").join(sql.Identifier(c) for c in table.key)
    cursor.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
            sql.Identifier(table.name), columns, key
        )
    )
    present = existing_columns(cursor, table.name)
    # Upsert tables keep each row's source position; rows of an older table have none
    # (NULL), which counts as oldest.
    for column, column_type in stored_columns(table).items():
        if column in present:
            # ALTER would take an ACCESS EXCLUSIVE lock even with IF NOT EXISTS, and
            # deadlock with running members' batches; only migrate what is missing.
            continue
        cursor.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                sql.Identifier(table.name),
                sql.Identifier(column),
                sql.SQL(PG_TYPES[column_type]),
            )
        )


def existing_columns(cursor: psycopg.Cursor[Any], table: str) -> set[str]:
    cursor.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    )
    return {str(row[0]) for row in cursor.fetchall()}
