"""Keyed state in the SQL sinks: the `offsetkeeper_state` table, one row per entry.

    (group_id, topic, partition, key) -> value (JSON text as bytes), version

Keys are stored as bytes (UTF-8, lone surrogates passed through), so every str a processor
may use as a key round-trips, NUL and lone surrogates included (PostgreSQL text holds neither).
Values are the engine's strict JSON, ASCII-only. Changes are written inside the batch's
transaction (`write_state`), before its checkpoints; reads are of committed data, outside it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg import sql

from consumer import StateChange, StateEntry, TopicPartition
from sinks._sql import STATE_TABLE

# SQLite binds at most 32766 parameters per statement; PostgreSQL takes an array.
_SQLITE_KEYS_PER_READ = 500
_SCAN_ROWS = 2000

Mapped = Callable[..., AbstractContextManager[None]]


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def key_text(stored: bytes | memoryview) -> str:
    return bytes(stored).decode("utf-8", "surrogatepass")


def _entry(row: Sequence[Any]) -> StateEntry:
    return StateEntry(key=key_text(row[0]), value=bytes(row[1]), version=int(row[2]))


class SqliteStateTable:
    """The state table of a SQLite sink, over the sink's connection and error mapping."""

    def __init__(self, connection: Callable[[], sqlite3.Connection], mapped: Mapped) -> None:
        self._db = connection
        self._mapped = mapped

    def create(self) -> None:
        self._db().execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
            " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
            " key BLOB NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,"
            " PRIMARY KEY (group_id, topic, partition, key)) WITHOUT ROWID"
        )

    def read(self, group: str, tp: TopicPartition, keys: Collection[str]) -> dict[str, StateEntry]:
        wanted = [key_bytes(key) for key in keys]
        found: dict[str, StateEntry] = {}
        with self._mapped("cannot read state", rollback=False, missing_table_ok=True):
            for start in range(0, len(wanted), _SQLITE_KEYS_PER_READ):
                chunk = wanted[start : start + _SQLITE_KEYS_PER_READ]
                rows = self._db().execute(
                    f"SELECT key, value, version FROM {STATE_TABLE}"
                    " WHERE group_id = ? AND topic = ? AND partition = ?"
                    f" AND key IN ({', '.join('?' for _ in chunk)})",
                    (group, tp.topic, tp.partition, *chunk),
                )
                for row in rows:
                    entry = _entry(row)
                    found[entry.key] = entry
        return found

    def sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None
    ) -> dict[TopicPartition, tuple[int, int]]:
        sizes: dict[TopicPartition, tuple[int, int]] = {}
        selections: list[tuple[str, tuple[Any, ...]]] = (
            [("", ())]
            if partitions is None
            else [
                (" AND topic = ? AND partition = ?", (tp.topic, tp.partition)) for tp in partitions
            ]
        )
        with self._mapped("cannot count state", rollback=False, missing_table_ok=True):
            for where, params in selections:  # one partition at a time: its index range only
                for topic, partition, count, size in self._db().execute(
                    "SELECT topic, partition, count(*), coalesce(sum(length(value)), 0)"
                    f" FROM {STATE_TABLE} WHERE group_id = ?{where} GROUP BY topic, partition",
                    (group, *params),
                ):
                    sizes[TopicPartition(topic, partition)] = (int(count), int(size))
        return sizes

    def scan(self, group: str, tp: TopicPartition) -> Iterator[StateEntry]:
        last: bytes | None = None  # the empty key is a key too: the first page has no bound
        while True:  # in pages by key, so no cursor stays open between the caller's steps
            rows: list[Any] = []
            after = "" if last is None else " AND key > ?"
            with self._mapped("cannot read state", rollback=False, missing_table_ok=True):
                rows = (
                    self._db()
                    .execute(
                        f"SELECT key, value, version FROM {STATE_TABLE}"
                        f" WHERE group_id = ? AND topic = ? AND partition = ?{after}"
                        " ORDER BY key LIMIT ?",
                        (
                            group,
                            tp.topic,
                            tp.partition,
                            *(() if last is None else (last,)),
                            _SCAN_ROWS,
                        ),
                    )
                    .fetchall()
                )
            yield from (_entry(row) for row in rows)
            if len(rows) < _SCAN_ROWS:
                return
            last = bytes(rows[-1][0])

    def write(self, group: str, changes: Sequence[StateChange]) -> None:
        upserts = [
            (group, c.partition.topic, c.partition.partition, key_bytes(c.key), c.value, c.version)
            for c in changes
            if c.value is not None
        ]
        deletes = [
            (group, c.partition.topic, c.partition.partition, key_bytes(c.key))
            for c in changes
            if c.value is None
        ]
        with self._mapped("cannot write state", rollback=False):
            if upserts:
                self._db().executemany(
                    f"INSERT INTO {STATE_TABLE}"
                    " (group_id, topic, partition, key, value, version) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (group_id, topic, partition, key)"
                    " DO UPDATE SET value = excluded.value, version = excluded.version",
                    upserts,
                )
            if deletes:
                self._db().executemany(
                    f"DELETE FROM {STATE_TABLE}"
                    " WHERE group_id = ? AND topic = ? AND partition = ? AND key = ?",
                    deletes,
                )


_PG_TABLE = sql.Identifier(STATE_TABLE)
_PG_STAGE = sql.Identifier(f"{STATE_TABLE}_stage")


class PostgresStateTable:
    """The state table of a PostgreSQL sink: a batch's changes are COPYed into a temporary
    table and merged with one INSERT ... ON CONFLICT and one DELETE."""

    def __init__(self, connection: Callable[[], psycopg.Connection[Any]], mapped: Mapped) -> None:
        self._db = connection
        self._mapped = mapped

    def create(self, cursor: psycopg.Cursor[Any]) -> None:
        cursor.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                " key BYTEA NOT NULL, value BYTEA NOT NULL, version INTEGER NOT NULL,"
                " PRIMARY KEY (group_id, topic, partition, key))"
            ).format(_PG_TABLE)
        )

    def _read_only(self, query: sql.Composed, params: Sequence[Any]) -> list[Any]:
        """Rows of a query in a transaction of its own (reads happen outside the batch's)."""
        db = self._db()
        rows: list[Any] = []
        with self._mapped("cannot read state", missing_table_ok=True):
            with db.cursor() as cursor:
                cursor.execute(query, params)
                rows = cursor.fetchall()
            db.commit()
        return rows

    def read(self, group: str, tp: TopicPartition, keys: Collection[str]) -> dict[str, StateEntry]:
        rows = self._read_only(
            sql.SQL(
                "SELECT key, value, version FROM {} WHERE group_id = %s AND topic = %s"
                " AND partition = %s AND key = ANY(%s)"
            ).format(_PG_TABLE),
            (group, tp.topic, tp.partition, [key_bytes(key) for key in keys]),
        )
        return {entry.key: entry for entry in map(_entry, rows)}

    def sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None
    ) -> dict[TopicPartition, tuple[int, int]]:
        wanted = None if partitions is None else sorted(set(partitions))
        query = (
            "SELECT topic, partition, count(*), coalesce(sum(octet_length(value)), 0)"
            " FROM {} WHERE group_id = %s"
        )
        params: list[Any] = [group]
        if wanted is not None:  # only the partitions asked for: their index ranges
            query += " AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
            params += [[tp.topic for tp in wanted], [tp.partition for tp in wanted]]
        rows = self._read_only(
            sql.SQL(query + " GROUP BY topic, partition").format(_PG_TABLE), params
        )
        return {TopicPartition(t, p): (int(n), int(b)) for t, p, n, b in rows}

    def scan(self, group: str, tp: TopicPartition) -> Iterator[StateEntry]:
        last: bytes | None = None  # the empty key is a key too: the first page has no bound
        while True:  # in pages by key: no transaction stays open between the caller's steps
            after = "" if last is None else " AND key > %s"
            rows = self._read_only(
                sql.SQL(
                    "SELECT key, value, version FROM {} WHERE group_id = %s AND topic = %s"
                    f" AND partition = %s{after} ORDER BY key LIMIT %s"
                ).format(_PG_TABLE),
                (group, tp.topic, tp.partition, *(() if last is None else (last,)), _SCAN_ROWS),
            )
            yield from map(_entry, rows)
            if len(rows) < _SCAN_ROWS:
                return
            last = bytes(rows[-1][0])

    def write(self, group: str, changes: Sequence[StateChange]) -> None:
        deletes = any(change.value is None for change in changes)
        with self._mapped("cannot write state"), self._db().cursor() as cursor:
            cursor.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (topic TEXT, partition INTEGER,"
                    " key BYTEA, value BYTEA, version INTEGER) ON COMMIT DELETE ROWS"
                ).format(_PG_STAGE)
            )
            # Binary COPY: keys and values go as they are, not hex-escaped text.
            copy_sql = sql.SQL(
                "COPY {} (topic, partition, key, value, version) FROM STDIN (FORMAT BINARY)"
            )
            with cursor.copy(copy_sql.format(_PG_STAGE)) as copy:
                copy.set_types(["text", "int4", "bytea", "bytea", "int4"])
                for c in changes:
                    tp = c.partition
                    copy.write_row((tp.topic, tp.partition, key_bytes(c.key), c.value, c.version))
            cursor.execute(
                sql.SQL(
                    "INSERT INTO {table} (group_id, topic, partition, key, value, version)"
                    " SELECT %s, topic, partition, key, value, version FROM {stage}"
                    " WHERE value IS NOT NULL"
                    " ON CONFLICT (group_id, topic, partition, key)"
                    " DO UPDATE SET value = excluded.value, version = excluded.version"
                ).format(table=_PG_TABLE, stage=_PG_STAGE),
                (group,),
            )
            if deletes:
                cursor.execute(
                    sql.SQL(
                        "DELETE FROM {table} s USING {stage} d WHERE d.value IS NULL"
                        " AND s.group_id = %s AND s.topic = d.topic"
                        " AND s.partition = d.partition AND s.key = d.key"
                    ).format(table=_PG_TABLE, stage=_PG_STAGE),
                    (group,),
                )
            # ON COMMIT DELETE ROWS empties it at commit; a second call in the same
            # transaction must not see these rows again.
            cursor.execute(sql.SQL("TRUNCATE {}").format(_PG_STAGE))


class _StateTable(Protocol):
    def read(
        self, group: str, tp: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]: ...

    def sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None
    ) -> dict[TopicPartition, tuple[int, int]]: ...

    def scan(self, group: str, tp: TopicPartition) -> Iterator[StateEntry]: ...

    def write(self, group: str, changes: Sequence[StateChange]) -> None: ...


class SqlStateMethods:
    """The `consumer.StateStore` methods of a SQL sink: its `_state` table answers them."""

    @property
    def _state_table(self) -> _StateTable:
        return self._state  # type: ignore[attr-defined,no-any-return]

    def read_state(
        self, group: str, partition: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]:
        return self._state_table.read(group, partition, keys)

    def state_sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, tuple[int, int]]:
        return self._state_table.sizes(group, partitions)

    def scan_state(self, group: str, partition: TopicPartition) -> Iterator[StateEntry]:
        return self._state_table.scan(group, partition)

    def write_state(self, group: str, changes: Sequence[StateChange]) -> None:
        self._state_table.write(group, changes)
