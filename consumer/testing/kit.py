"""`run_app`: an app over given records, through the real engine, into a temporary SQLite
sink, with no Kafka (see the package docstring)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from consumer.cli.sinks import open_sink
from consumer.core.app import App, Table
from consumer.core.errors import ConfigError, RecordError
from consumer.core.records import RawRecord, TopicPartition
from consumer.deadletters.writer import resolve_topic
from consumer.decoding.topics import DecodeSettings, TopicDecoders
from consumer.engine.batch import BadRecordPolicy, DeadLetter
from consumer.engine.group import Engine, EngineSettings
from consumer.engine.sink import CheckpointAdmin, Sink, StateStore
from consumer.runner.result import RunRecorder, RunResult
from consumer.testing.memory_backend import ManualClock, MemoryBackend

# Timestamps of messages given none: a fixed instant plus the offset, so runs repeat exactly.
BASE_TIMESTAMP_MS = 1_700_000_000_000
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One record to put on a partition's log. `value`: a dict or list is JSON-encoded, a str
    UTF-8, bytes go as they are (Avro, ...), None is a tombstone; `key` a str (UTF-8) or
    bytes. `topic` None is `run_app`'s `topic`. Offsets follow the order given, per partition,
    from 0; `timestamp_ms` None is `BASE_TIMESTAMP_MS` + the offset."""

    value: Any
    key: str | bytes | None = None
    headers: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] = ()
    timestamp_ms: int | None = None
    partition: int = 0
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class AppRun:
    """What a `run_app` left behind, read back from the sink after the run."""

    # Per table, every row, its declared columns only (json decoded, booleans as bool),
    # ordered by the table's key.
    rows: Mapping[str, list[dict[str, Any]]]
    # Per partition, its keyed state entries (stateful apps), values decoded from JSON.
    state: Mapping[TopicPartition, dict[str, Any]]
    # Records given up on under on_bad_record="dead-letter", in the order they were written.
    dead_letters: list[DeadLetter]
    # Partitions halted on a bad record under on_bad_record="stop", with the error.
    stopped: Mapping[TopicPartition, RecordError]
    # Per partition, the next offset committed with the rows.
    committed: Mapping[TopicPartition, int]
    # The engine's own account of the run (records, rows, batches, exit code, ...).
    result: RunResult

    def table(self, name: str) -> list[dict[str, Any]]:
        """The rows of one table (KeyError for a table the app does not declare)."""
        return self.rows[name]


@dataclass(slots=True)
class _CollectedDeadLetters:
    """The dead-letter writer of a test run: letters are kept in memory, in order."""

    group: str
    template: str
    letters: list[DeadLetter] = field(default_factory=list)

    def topic_for(self, source_topic: str) -> str:
        return resolve_topic(self.template, group=self.group, source_topic=source_topic)

    def prepare(self, source_topics: Sequence[str]) -> None:
        for topic in source_topics:
            self.topic_for(topic)  # a bad template fails as it would with Kafka

    def write(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)

    def close(self) -> None:
        pass


def run_app(
    app: App,
    records: Iterable[Message | Any],
    *,
    topic: str = "events",
    group: str = "test",
    on_bad_record: Literal["stop", "dead-letter"] = "stop",
    dead_letter_topic: str = "{group}.dlq",
    bad_record_retries: int = 2,
    batch_max_records: int = 2000,
    decode: Mapping[str, str] | None = None,
    reader_schema: Mapping[str, str] | None = None,
    schema_dir: str = "schemas",
    schema_registry_url: str | None = None,
    state_cache_mb: int = 256,
    database: Path | str | None = None,
) -> AppRun:
    """Run `app` over `records` (each a `Message`, or a plain value for partition 0 of
    `topic`) until every partition is consumed or stopped, and return what it left.

    Settings have the names and defaults of `offsetkeeper run` (README "Configuration").
    Retries and backoff cost no time: the engine runs on a manual clock. `database` keeps the
    SQLite file (a second run over it resumes from its checkpoints and state); by default a
    temporary one is removed. An error that ends the run (not a bad record) is raised."""
    if on_bad_record not in ("stop", "dead-letter"):
        raise ConfigError("on_bad_record must be 'stop' or 'dead-letter'", given=on_bad_record)
    options = _Options(
        group=group,
        bad_records=BadRecordPolicy(action=on_bad_record, retries=bad_record_retries),
        dead_letter_topic=dead_letter_topic,
        batch_max_records=batch_max_records,
        decode=DecodeSettings(
            schema_registry_url=schema_registry_url,
            schema_dir=schema_dir,
            decode=dict(decode or {}),
            reader_schema=dict(reader_schema or {}),
        ),
        state_cache_bytes=state_cache_mb * _MIB,
    )
    logs = message_logs(records, topic)
    if database is not None:
        return _run_into(app, logs, Path(database), options)
    with tempfile.TemporaryDirectory(prefix="offsetkeeper-test-") as directory:
        return _run_into(app, logs, Path(directory) / "sink.db", options)


@dataclass(frozen=True, slots=True)
class _Options:
    group: str
    bad_records: BadRecordPolicy
    dead_letter_topic: str
    batch_max_records: int
    decode: DecodeSettings
    state_cache_bytes: int


def message_logs(
    records: Iterable[Message | Any], topic: str
) -> dict[TopicPartition, list[RawRecord]]:
    """Each partition's log of the given records, at offsets from 0 in the order given;
    partition 0 of `topic` is there (empty) when no record is given for `topic`."""
    logs: dict[TopicPartition, list[RawRecord]] = {TopicPartition(topic, 0): []}
    for item in records:
        message = item if isinstance(item, Message) else Message(item)
        tp = TopicPartition(message.topic or topic, message.partition)
        log = logs.setdefault(tp, [])
        offset = len(log)
        log.append(
            RawRecord(
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                timestamp_ms=(
                    BASE_TIMESTAMP_MS + offset
                    if message.timestamp_ms is None
                    else message.timestamp_ms
                ),
                key=_encoded_key(message.key),
                value=encode_value(message.value),
                headers=_encoded_headers(message.headers),
            )
        )
    return logs


def encode_value(value: Any) -> bytes | None:
    """A value as the kit puts it on the log (see `Message`)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def _encoded_key(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def _encoded_headers(
    headers: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]],
) -> tuple[tuple[str, bytes | None], ...]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return tuple(
        (name, value.encode() if isinstance(value, str) else value) for name, value in pairs
    )


def _run_into(
    app: App, logs: Mapping[TopicPartition, list[RawRecord]], db: Path, options: _Options
) -> AppRun:
    url = f"sqlite:///{db.resolve()}"
    clock = ManualClock()
    backend = MemoryBackend(logs, clock=clock)
    dead_letters = _CollectedDeadLetters(options.group, options.dead_letter_topic)
    recorder = RunRecorder()
    engine = Engine(
        app,
        EngineSettings(
            group=options.group,
            topics=tuple(sorted({tp.topic for tp in logs})),
            batch_max_records=options.batch_max_records,
            stop_when_idle_s=1.0,
            bad_records=options.bad_records,
            state_cache_bytes=options.state_cache_bytes,
        ),
        backend,
        open_sink(url),
        clock=clock.now,
        sleep=clock.sleep,
        observer=recorder,
        decoders=TopicDecoders(app, options.decode),
        dead_letters=dead_letters if options.bad_records.action == "dead-letter" else None,
    )
    recorder.engine = engine
    result = recorder.outcome(engine.run).raise_for_error()
    return AppRun(
        rows={table.name: _table_rows(db, table) for table in app.tables},
        state=_stored_state(url, app, options.group, sorted(logs)),
        dead_letters=list(dead_letters.letters),
        stopped=dict(result.stopped_partitions),
        committed=dict(result.committed),
        result=result,
    )


def _table_rows(db: Path, table: Table) -> list[dict[str, Any]]:
    columns = list(table.columns)
    listed = ", ".join(f'"{column}"' for column in columns)
    order = ", ".join(f'"{column}"' for column in table.key)
    connection = sqlite3.connect(db)
    try:
        # Names are checked identifiers (consumer.core.app.check_identifier).
        found = connection.execute(f'SELECT {listed} FROM "{table.name}" ORDER BY {order}')
        return [
            {
                column: _column_value(table.columns[column], value)
                for column, value in zip(columns, row, strict=True)
            }
            for row in found.fetchall()
        ]
    finally:
        connection.close()


def _column_value(column_type: str, value: Any) -> Any:
    if value is None:
        return None
    if column_type == "json":
        return json.loads(value)
    if column_type == "boolean":
        return bool(value)
    return value


def _stored_state(
    url: str, app: App, group: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, dict[str, Any]]:
    if app.state is None:
        return {}
    sink: Sink = open_sink(url)
    if isinstance(sink, CheckpointAdmin):
        sink.open_existing()
    else:
        sink.open(app.tables)
    try:
        if not isinstance(sink, StateStore):
            raise ConfigError("the test sink keeps no state", sink=sink.description)
        state = {
            tp: {entry.key: json.loads(entry.value) for entry in sink.scan_state(group, tp)}
            for tp in partitions
        }
    finally:
        sink.close()
    return {tp: entries for tp, entries in state.items() if entries}
