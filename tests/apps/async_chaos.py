"""The chaos app with an `async def` processor that awaits in the middle of every record."""

from __future__ import annotations

import asyncio
from typing import Any

from consumer import App, InvalidRecordError, Record, Row
from tests.apps.chaos import EVENTS, LATEST, WRITER

app = App(name="async-chaos", tables=(EVENTS, LATEST), decode="json")


@app.process
async def chaos_rows(record: Record) -> list[Row]:
    event: Any = record.value
    if not isinstance(event, dict) or "key" not in event or "version" not in event:
        raise InvalidRecordError("chaos event needs key and version", field="key")
    await asyncio.sleep(0.0002)  # e.g. an HTTP call through an asyncio client
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
