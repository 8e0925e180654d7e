"""What a user writes: an `App` with declared output tables and a processor function."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from consumer.core.errors import ConfigError
from consumer.core.records import Record, Row

ColumnType = Literal["text", "bigint", "integer", "double", "boolean", "bytes", "json"]
COLUMN_TYPES: frozenset[str] = frozenset(
    ("text", "bigint", "integer", "double", "boolean", "bytes", "json")
)
DecodeName = Literal["json", "bytes", "utf8", "avro", "avro-local"]

# Matched with fullmatch: `$` would also match before a trailing newline ("orders\n").
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

ProcessorResult = Row | Iterable[Row] | None
# A stateless processor takes the record; a stateful one (App.state set) also takes the
# partition's state, which it may change in place.
Processor = Callable[[Record], ProcessorResult] | Callable[[Record, Any], ProcessorResult]
StateUpgrader = Callable[[Any], Any]
StateKeyFunction = Callable[[Record], "str | Iterable[str] | None"]


def check_identifier(name: str, *, what: str) -> str:
    """Table and column names are spliced into SQL, so only plain identifiers are allowed."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ConfigError(f"{what} must be a plain SQL identifier", name=name)
    return name


TableMode = Literal["upsert", "append"]

# offsetkeeper's own tables (checkpoints, leases, replay jobs, PostgreSQL staging tables) all
# start with this; an app table named so could overwrite the fencing epochs.
RESERVED_TABLE_PREFIX = "offsetkeeper_"


def case_collisions(names: Iterable[str]) -> list[list[str]]:
    """Groups of `names` that differ only in case (SQLite, and unquoted SQL, fold them)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    return [sorted(group) for group in groups.values() if len(group) > 1]


# Append tables are keyed by where each row came from, so a replayed record rewrites its rows.
SOURCE_COLUMNS: Mapping[str, ColumnType] = {
    "source_topic": "text",
    "source_partition": "integer",
    "source_offset": "bigint",
    "source_row": "integer",
}


# Upsert tables of the SQL sinks keep, per row, the source position that wrote it (see
# `consumer.core.records.replaces`): a write never replaces a row from a newer position.
POSITION_COLUMNS: Mapping[str, ColumnType] = {
    "offsetkeeper_topic": "text",
    "offsetkeeper_partition": "integer",
    "offsetkeeper_offset": "bigint",
    "offsetkeeper_timestamp": "bigint",
}
RESERVED_COLUMN_PREFIX = "offsetkeeper_"


@dataclass(frozen=True, slots=True)
class Table:
    """An output table: columns with types, and the key that makes a write idempotent.

    mode="upsert": rows are upserted by `key` (the last write of a key wins).
    mode="append": one row per output; offsetkeeper adds the `SOURCE_COLUMNS` (topic,
    partition, offset, row index within the record) and keys the table by them, so processing
    a record again never adds a second copy of its rows.
    """

    name: str
    columns: Mapping[str, ColumnType]
    key: tuple[str, ...] = ()
    mode: TableMode = "upsert"

    def __post_init__(self) -> None:
        check_identifier(self.name, what="table name")
        if self.name.casefold().startswith(RESERVED_TABLE_PREFIX):
            raise ConfigError(
                f"table names starting with {RESERVED_TABLE_PREFIX!r} are reserved for "
                "offsetkeeper's own tables (checkpoints, leases, replay jobs, staging)",
                table=self.name,
            )
        if self.mode == "append":
            if self.key:
                raise ConfigError("append tables are keyed by source; give no key", table=self.name)
            clash = sorted(c for c in self.columns if c.casefold() in SOURCE_COLUMNS)
            if clash:
                raise ConfigError(
                    "column names reserved for append tables", table=self.name, columns=clash
                )
            object.__setattr__(self, "columns", {**self.columns, **SOURCE_COLUMNS})
            object.__setattr__(self, "key", tuple(SOURCE_COLUMNS))
        elif self.mode != "upsert":
            raise ConfigError("unknown table mode", table=self.name, mode=self.mode)
        if not self.columns:
            raise ConfigError("a table needs at least one column", table=self.name)
        self._check_columns()
        if not self.key:
            raise ConfigError("a table needs key columns for idempotent writes", table=self.name)
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ConfigError("key columns are not declared columns", table=self.name, key=missing)

    def _check_columns(self) -> None:
        for column, column_type in self.columns.items():
            check_identifier(column, what="column name")
            if column.casefold().startswith(RESERVED_COLUMN_PREFIX):
                raise ConfigError(
                    f"column names starting with {RESERVED_COLUMN_PREFIX!r} are reserved for "
                    "the source position offsetkeeper keeps beside each row",
                    table=self.name,
                    column=column,
                )
            if column_type not in COLUMN_TYPES:
                raise ConfigError(
                    "unknown column type",
                    table=self.name,
                    column=column,
                    type=column_type,
                    known=sorted(COLUMN_TYPES),
                )
        collisions = case_collisions(self.columns)
        if collisions:
            raise ConfigError(
                "column names of a table must differ in more than case "
                "(SQLite and unquoted SQL treat them as one column)",
                table=self.name,
                columns=collisions,
            )


@dataclass(frozen=True, slots=True)
class StateSchema:
    """Keyed processor state, versioned by the app.

    The processor gets a mapping of str keys to JSON values per partition (`get`, `[]`, `in`,
    `del`, `setdefault`, `pop`; see `consumer.engine.state.KeyedState`). The entries a batch
    changed are written in the same sink transaction as its rows and offsets, so the state is
    exactly as durable as they are, and a batch costs what it changed, not the state's size.

    `version` is the app's own schema version of an entry's value; every entry is stored with
    the version that wrote it. `upgraders[n]` turns ONE ENTRY's value of version n into
    version n+1; the chain runs lazily, when an older entry is read (`offsetkeeper checkpoint
    migrate --app` runs it for every entry at once). A stored entry newer than `version` is
    refused, and nothing is written.
    """

    version: int = 1
    upgraders: Mapping[int, StateUpgrader] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ConfigError("state version must be 1 or more", version=self.version)
        missing = [n for n in range(1, self.version) if n not in self.upgraders]
        if missing:
            raise ConfigError(
                "state upgraders must cover every older version",
                version=self.version,
                missing_from=missing,
            )


@dataclass(slots=True)
class App:
    """A consumer application: how to decode values, what tables to write, how to map records.

    The processor is a pure function of one record: it returns zero or more `Row`s. It must not
    write anywhere itself; the engine writes its rows and the offsets in one sink transaction.
    With `state`, it is called as `processor(record, state)` with the partition's keyed
    state (see `StateSchema`). `state_key(record)` may name the state keys a record touches
    (a str, several, or None): the engine then reads a batch's uncached entries in one call
    per partition instead of one per key (worth it on PostgreSQL once the state outgrows the
    cache).
    """

    name: str
    tables: tuple[Table, ...]
    # How record values are decoded: one decoder for every topic, or one per topic (a topic
    # not in the mapping is refused at start-up). `--decode TOPIC=NAME` overrides it.
    decode: DecodeName | Mapping[str, DecodeName] = "json"
    processor: Processor | None = None
    state: StateSchema | None = None
    state_key: StateKeyFunction | None = None
    # Avro: the schema (an .avsc path) records are read as, for every topic or per topic;
    # records written with an older writer schema are resolved to it. `--reader-schema` overrides.
    reader_schema: str | Mapping[str, str] | None = None
    _tables_by_name: dict[str, Table] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tables_by_name = {table.name: table for table in self.tables}
        if len(self._tables_by_name) != len(self.tables):
            names = [table.name for table in self.tables]
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ConfigError("table names must be unique", app=self.name, tables=repeated)
        collisions = case_collisions(self._tables_by_name)
        if collisions:
            raise ConfigError(
                "table names of an app must differ in more than case "
                "(SQLite and unquoted SQL treat them as one table)",
                app=self.name,
                tables=collisions,
            )

    def decode_for(self, topic: str) -> str | None:
        """The decoder name this app declares for `topic` (None: the mapping omits the topic)."""
        if isinstance(self.decode, str):
            return self.decode
        return self.decode.get(topic)

    def reader_schema_for(self, topic: str) -> str | None:
        if self.reader_schema is None or isinstance(self.reader_schema, str):
            return self.reader_schema
        return self.reader_schema.get(topic)

    def process(self, fn: Processor) -> Processor:
        """Decorator that registers the processor function."""
        self.processor = fn
        return fn

    @property
    def tables_by_name(self) -> Mapping[str, Table]:
        """The app's tables by name (a row names its table)."""
        return self._tables_by_name

    def table(self, name: str) -> Table:
        try:
            return self._tables_by_name[name]
        except KeyError:
            raise ConfigError("row for an undeclared table", app=self.name, table=name) from None


def load_app(reference: str) -> App:
    """Import `module.path:attribute` and check that it is an `App` with a processor."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError("app reference must look like MODULE:ATTR", app=reference)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("cannot import the app's module", app=reference) from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigError("app reference does not name an offsetkeeper App", app=reference)
    if app.processor is None:
        raise ConfigError(
            "app has no processor (decorate a function with @app.process)", app=reference
        )
    return app
