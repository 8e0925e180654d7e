"""The PostgreSQL sink's staging tables: temporary tables of the session that a batch's rows
are COPYed into before one merge into their table.

Names: PostgreSQL cuts identifiers at 63 bytes, so `offsetkeeper_stage_<table>` would let two
long table names with the same first 44 characters share one staging table. A staging name is
the prefix, the table name cut to 27 characters, and 16 hex digits of the name's SHA-256: at
most 63 bytes, distinct for distinct names.

Lifetime: a staging table is made (CREATE TEMP TABLE IF NOT EXISTS) by the first batch of a
session that writes its table, inside that batch's transaction. A rollback undoes the CREATE,
so a table made in a transaction that did not commit is made again by the next one; a new
session (a reconnect) has none.

COPY is in text format. Binary COPY measured about 0.6 us a row less of our CPU, but a value
the engine's checks did not see (a plugin writing past them) then fails in psycopg before the
server sees it, so the refusal loses the SQLSTATE and the column that text COPY's error names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from consumer import POSITION_COLUMNS, ConfigError, SourcePosition, Table, position_values

STAGING_PREFIX = "offsetkeeper_stage_"
_KEPT_CHARS = 27
_DIGEST_CHARS = 16


def staging_name(table: str) -> str:
    """The staging table of `table`: at most 63 bytes, distinct for distinct names."""
    digest = hashlib.sha256(table.encode()).hexdigest()[:_DIGEST_CHARS]
    return f"{STAGING_PREFIX}{table[:_KEPT_CHARS]}_{digest}"


def check_staging_names(tables: Sequence[Table]) -> None:
    """Two tables never share a staging table: 64 bits of SHA-256 apart, but never silently."""
    if len({staging_name(table.name) for table in tables}) != len(tables):
        raise ConfigError(
            "two tables would share a staging table", tables=[table.name for table in tables]
        )


class StagingTables:
    """Which staging tables exist in the session, and which the open transaction made."""

    def __init__(self) -> None:
        self._session: set[str] = set()
        self._transaction: set[str] = set()

    def staging_for(self, cursor: psycopg.Cursor[Any], table: Table) -> sql.Identifier:
        """The staging table of `table`, made in the open transaction if the session has none."""
        staging = sql.Identifier(staging_name(table.name))
        if table.name not in self._session and table.name not in self._transaction:
            cursor.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)"
                    " ON COMMIT DELETE ROWS"
                ).format(staging, sql.Identifier(table.name))
            )
            self._transaction.add(table.name)
        return staging

    def committed(self) -> None:
        """The transaction committed: what it made is the session's."""
        self._session |= self._transaction
        self._transaction.clear()

    def rolled_back(self) -> None:
        """The transaction rolled back: what it made is gone."""
        self._transaction.clear()

    def session_ended(self) -> None:
        """A new connection: temporary tables died with the old session."""
        self._session.clear()
        self._transaction.clear()


def copy_rows(
    cursor: psycopg.Cursor[Any],
    staging: sql.Identifier,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    positions: Sequence[SourcePosition] | None = None,
) -> None:
    """COPY `rows` into the staging table, a row's absent columns as NULL (a json column's
    value, None included, as JSON); with `positions`, each row's source position into the
    position columns."""
    columns = list(table.columns)
    json_at = [i for i, kind in enumerate(table.columns.values()) if kind == "json"]
    statement = sql.SQL("COPY {} ({}) FROM STDIN")
    copied = columns if positions is None else [*columns, *POSITION_COLUMNS]
    column_list = sql.SQL(", ").join(sql.Identifier(c) for c in copied)
    # Each row's values, then its position (nothing for a table without position columns).
    tails = repeat((), len(rows)) if positions is None else map(position_values, positions)
    with cursor.copy(statement.format(staging, column_list)) as copy:
        write = copy.write_row
        for row, tail in zip(rows, tails, strict=True):
            values = list(map(row.get, columns))
            for i in json_at:
                values[i] = Jsonb(values[i])
            values.extend(tail)
            write(values)
