"""A stateful test app that makes a double (or lost) apply visible: a count and a sum per key.

Events are the chaos events, JSON {"key": str, "version": int}. Each key's entry in the keyed
state is {"count": n, "sum": s}; every record adds 1 and its version, and upserts the new
totals into `state_totals`. Counting is not idempotent: a record applied twice (a zombie's
batch, a replayed batch on top of its own effect) shows as a count above the truth, a lost one
as a count below. `state_events` keeps one row per (partition, offset, writer) as in the
stateless chaos app.

`state_key` names the key of a record, so a batch's uncached entries are read in one call.
Test hooks (env): CHAOS_SELF_STOP_AT="PARTITION:OFFSET" makes the process SIGSTOP itself while
processing that record; a value "poison" (not JSON) is a bad record.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

from consumer import App, InvalidRecordError, KeyedState, Record, Row, StateSchema, Table
from tests.apps.kafka_state_totals import key_of

WRITER = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

TOTALS = Table(
    name="state_totals",
    columns={"event_key": "text", "count": "bigint", "total": "bigint", "writer": "text"},
    key=("event_key",),
)
EVENTS = Table(
    name="state_events",
    columns={"source_partition": "integer", "source_offset": "bigint", "writer": "text"},
    key=("source_partition", "source_offset", "writer"),
)


app = App(
    name="state_chaos",
    tables=(TOTALS, EVENTS),
    decode="json",
    state=StateSchema(version=1),
    state_key=key_of,
)

_stop_at = os.environ.get("CHAOS_SELF_STOP_AT")
_STOP_AT = tuple(int(part) for part in _stop_at.split(":")) if _stop_at else None
_stopped_once: list[bool] = []


@app.process
def count_and_sum(record: Record, state: KeyedState) -> list[Row]:
    event: Any = record.value
    if not isinstance(event, dict) or not isinstance(event.get("key"), str):
        raise InvalidRecordError("chaos event needs a key", field="key")
    if (record.partition, record.offset) == _STOP_AT and not _stopped_once:
        _stopped_once.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)  # a zombie in the middle of its batch
    entry = state.setdefault(event["key"], {"count": 0, "sum": 0})
    entry["count"] += 1
    entry["sum"] += int(event["version"])
    return [
        Row(
            "state_totals",
            {
                "event_key": event["key"],
                "count": entry["count"],
                "total": entry["sum"],
                "writer": WRITER,
            },
        ),
        Row(
            "state_events",
            {
                "source_partition": record.partition,
                "source_offset": record.offset,
                "writer": WRITER,
            },
        ),
    ]
