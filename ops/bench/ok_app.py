"""The offsetkeeper apps under test: one row per record into `bench_events`, keyed by id.

`json_app` lets offsetkeeper decode JSON; `avro_app` lets it decode Avro (`avro-local`: the
Confluent wire format, writer schema from `write_schema_dir`'s file named for schema id 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import workload

from consumer import App, Record, Row, Table

EVENTS = Table(name=workload.TABLE, columns=workload.COLUMNS, key=(workload.KEY_COLUMN,))  # type: ignore[arg-type]

json_app = App(name="bench-json", tables=(EVENTS,), decode="json")
avro_app = App(name="bench-avro", tables=(EVENTS,), decode="avro-local")


@json_app.process
def json_row(record: Record) -> Row:
    return Row(workload.TABLE, record.value)


@avro_app.process
def avro_row(record: Record) -> Row:
    return Row(workload.TABLE, record.value)


def write_schema_dir(directory: Path) -> Path:
    """A schema directory for `avro-local`: the bench event schema as schema id 1."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"bench-event.{workload.SCHEMA_ID}.avsc").write_text(
        json.dumps(workload.AVRO_SCHEMA), encoding="utf-8"
    )
    return directory


def app_for(encoding: str) -> App:
    return json_app if encoding == "json" else avro_app
