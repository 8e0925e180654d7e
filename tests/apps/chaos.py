"""A test app that makes double processing visible.

Every record becomes one row in `chaos_events`, keyed by (partition, offset, writer) where
`writer` is an id unique to the process. If two processes (or a zombie and its successor) both
committed the same record, there would be two rows for one (partition, offset). `chaos_latest`
keeps the last version per key, for the "last value wins" check.

Events are JSON: {"key": str, "version": int}.
Test hooks (env): CHAOS_SELF_STOP_AT="PARTITION:OFFSET" makes the process SIGSTOP itself while
processing that record, i.e. in the middle of a batch, before its commit.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

from consumer import App, InvalidRecordError, Record, Row, Table

WRITER = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

EVENTS = Table(
    name="chaos_events",
    columns={
        "source_partition": "integer",
        "source_offset": "bigint",
        "writer": "text",
        "event_key": "text",
        "version": "bigint",
    },
    key=("source_partition", "source_offset", "writer"),
)
LATEST = Table(
    name="chaos_latest",
    columns={"event_key": "text", "version": "bigint", "writer": "text"},
    key=("event_key",),
)

app = App(name="chaos", tables=(EVENTS, LATEST), decode="json")

_stop_at = os.environ.get("CHAOS_SELF_STOP_AT")
_STOP_AT = tuple(int(part) for part in _stop_at.split(":")) if _stop_at else None
_stopped_once: list[bool] = []


@app.process
def chaos_rows(record: Record) -> list[Row]:
    event: Any = record.value
    if not isinstance(event, dict) or "key" not in event or "version" not in event:
        raise InvalidRecordError("chaos event needs key and version", field="key")
    if (record.partition, record.offset) == _STOP_AT and not _stopped_once:
        _stopped_once.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)  # a zombie in the middle of its batch
    return [
        Row(
            "chaos_events",
            {
                "source_partition": record.partition,
                "source_offset": record.offset,
                "writer": WRITER,
                "event_key": event["key"],
                "version": event["version"],
            },
        ),
        Row(
            "chaos_latest",
            {"event_key": event["key"], "version": event["version"], "writer": WRITER},
        ),
    ]
