"""The offsetkeeper apps under test: one row per record into `bench_events`, keyed by id.

`json_app` lets offsetkeeper decode JSON; `avro_app` takes the raw bytes (decode="bytes") and
decodes the Confluent wire format itself with fastavro and a schema parsed once.
"""

from __future__ import annotations

import workload

from consumer import App, InvalidRecordError, Record, Row, Table

EVENTS = Table(name=workload.TABLE, columns=workload.COLUMNS, key=(workload.KEY_COLUMN,))  # type: ignore[arg-type]

json_app = App(name="bench-json", tables=(EVENTS,), decode="json")
avro_app = App(name="bench-avro", tables=(EVENTS,), decode="bytes")


@json_app.process
def json_row(record: Record) -> Row:
    return Row(workload.TABLE, record.value)


@avro_app.process
def avro_row(record: Record) -> Row:
    value = record.value
    if not value or value[0] != 0:
        raise InvalidRecordError("value is not in the Confluent wire format")
    return Row(workload.TABLE, workload.decode_avro(value))


def app_for(encoding: str) -> App:
    return json_app if encoding == "json" else avro_app
