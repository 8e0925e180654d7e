"""A test app that is not idempotent on its own: every time a record is applied, its output row
gets a fresh random id (the table's key), so applying a record twice, even within one process,
leaves two rows (or two output messages) for one (partition, offset).

Events are JSON: {"key": str, "version": int}; anything else is a bad record.
"""

from __future__ import annotations

import uuid
from typing import Any

from consumer import App, InvalidRecordError, Record, Row, Table

APPLIED = Table(
    name="applied_records",
    columns={
        "row_id": "text",
        "source_partition": "integer",
        "source_offset": "bigint",
        "event_key": "text",
        "version": "bigint",
    },
    key=("row_id",),
)

app = App(name="random-row-ids", tables=(APPLIED,), decode="json")


@app.process
def applied_record(record: Record) -> Row:
    event: Any = record.value
    if not isinstance(event, dict) or not isinstance(event.get("version"), int):
        raise InvalidRecordError("event needs a key and an integer version", field="version")
    return Row(
        "applied_records",
        {
            "row_id": uuid.uuid4().hex,
            "source_partition": record.partition,
            "source_offset": record.offset,
            "event_key": event["key"],
            "version": event["version"],
        },
    )
