"""What a PostgreSQL error means for a batch's rows: a data refusal (`Refusal`, raised as
`consumer.RowsRefusedError` by `SqlSink._mapped`), or not (a `SinkError`, retried).

Refusals: SQLSTATE class 22 (data exception: a value out of range or not valid for its type,
a NUL in text, `\\u0000` in jsonb) and 23 (integrity constraint violation: NOT NULL, CHECK,
UNIQUE, FOREIGN KEY), and what psycopg raises dumping a value before the server sees it
(`psycopg.DataError` for a NUL in text, `UnicodeEncodeError` for a lone surrogate). Everything
else is transient: a lost connection (08), a serialization failure (40001), a deadlock
(40P01), a lack of resources (53), an operator's intervention (57).

The column: the server's `diag.column_name` (NOT NULL), else the column a COPY names in its
CONTEXT (a value not valid for its type), else the one column of a violated constraint, looked
up in the catalog (a CHECK constraint's error names none), else the first value no driver can
bind (`sinks._sql.unbindable_column`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg

from sinks._sql import Refusal, Written, unbindable_column

_REFUSED_CLASSES = frozenset({"22", "23"})
# Raised by psycopg while dumping a value (a lone surrogate cannot be encoded as UTF-8; a
# json value that json.dumps refuses).
_DUMPING_ERRORS = (ValueError, TypeError, OverflowError, RecursionError)
# The CONTEXT of an error raised by COPY: 'COPY offsetkeeper_stage_..., line 1, column amount: ...'
_COPY_COLUMN = re.compile(r"COPY [^,]+, line \d+, column (\w+)")


def refusal(
    exc: Exception,
    written: Written,
    constraint_column: Callable[[psycopg.Error], str | None],
) -> Refusal | None:
    """The refusal `exc` is (see the module docstring), or None. `constraint_column` looks the
    column of a violated constraint up (after the rollback)."""
    if not isinstance(exc, psycopg.Error):
        if isinstance(exc, _DUMPING_ERRORS):
            return Refusal(f"{type(exc).__name__}: {exc}", unbindable_column(written))
        return None
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # Raised by psycopg itself: DataError for a NUL in text; others (a lost connection)
        # are not about the values.
        if not isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
            return None
        return Refusal(str(exc).strip(), unbindable_column(written, nul=True))
    if sqlstate[:2] not in _REFUSED_CLASSES:
        return None
    diag = exc.diag
    copied = _COPY_COLUMN.search(diag.context or "")
    column = diag.column_name or (copied[1] if copied else None) or constraint_column(exc)
    return Refusal(
        (diag.message_primary or str(exc)).strip(),
        column,
        {
            "table": diag.table_name,
            "constraint": diag.constraint_name,
            "sqlstate": sqlstate,
            "reason": str(exc).strip(),
        },
    )


def constraint_column(
    connection: psycopg.Connection[Any] | None,
    exc: psycopg.Error,
    rollback_quietly: Callable[[], None],
) -> str | None:
    """The column of the constraint `exc` violated, when it has exactly one, from the catalog.
    Asked on `connection` after the batch's rollback, and rolled back; None if that fails."""
    diag = exc.diag
    if not diag.constraint_name or not diag.table_name or connection is None:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT a.attname FROM pg_constraint c JOIN pg_attribute a"
                " ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
                " WHERE c.conname = %s"
                " AND c.conrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))",
                (diag.constraint_name, diag.schema_name or "public", diag.table_name),
            )
            columns = [str(row[0]) for row in cursor.fetchall()]
        connection.rollback()
    except psycopg.Error:
        rollback_quietly()
        return None
    return columns[0] if len(columns) == 1 else None
