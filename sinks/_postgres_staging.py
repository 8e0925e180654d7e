"""The PostgreSQL sink's staging tables: temporary tables of the session that a batch's rows
are COPYed into before one merge into their table.

Lifetime: a staging table is made (CREATE TEMP TABLE IF NOT EXISTS) by the first batch of a
session that writes its table, inside that batch's transaction. A rollback undoes the CREATE,
so a table made in a transaction that did not commit is made again by the next one; a new
session (a reconnect) has none.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from consumer import Table

STAGING_PREFIX = "offsetkeeper_stage_"


class StagingTables:
    """Which staging tables exist in the session, and which the open transaction made."""

    def __init__(self) -> None:
        self._session: set[str] = set()
        self._transaction: set[str] = set()

    def staging_for(self, cursor: psycopg.Cursor[Any], table: Table) -> sql.Identifier:
        """The staging table of `table`, made in the open transaction if the session has none."""
        staging = sql.Identifier(f"{STAGING_PREFIX}{table.name}")
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
