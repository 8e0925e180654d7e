"""A stateful test app that is NOT idempotent: a count and a sum per key, kept in keyed state.

Events are JSON: {"key": str, "amount": int}. Each record adds 1 to its key's count and its
amount to the key's sum, and writes the key's new totals as a `kafka_state_totals` row (the
last row of a key holds its totals). A record processed twice, or a state change lost or kept
from an aborted batch, leaves a count or sum that differs from the one computed from the input.
"""

from __future__ import annotations

from typing import Any

from consumer import App, InvalidRecordError, KeyedState, Record, Row, StateSchema, Table

TOTALS = Table(
    name="kafka_state_totals",
    columns={
        "event_key": "text",
        "count": "bigint",
        "sum": "bigint",
        "source_partition": "integer",
        "source_offset": "bigint",
    },
    key=("event_key",),
)


def key_of(record: Record) -> str | None:
    event: Any = record.value
    key = event.get("key") if isinstance(event, dict) else None
    return key if isinstance(key, str) else None


app = App(
    name="kafka_state_totals",
    tables=(TOTALS,),
    decode="json",
    state=StateSchema(version=1),
    state_key=key_of,
)


@app.process
def add(record: Record, totals: KeyedState) -> Row:
    event: Any = record.value
    if not isinstance(event, dict) or not isinstance(event.get("key"), str):
        raise InvalidRecordError("event needs a key string", field="key")
    amount = event.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRecordError("event needs an integer amount", field="amount")
    key = event["key"]
    entry = totals.get(key) or {"count": 0, "sum": 0}
    entry = {"count": entry["count"] + 1, "sum": entry["sum"] + amount}
    totals[key] = entry
    return Row(
        "kafka_state_totals",
        {
            "event_key": key,
            **entry,
            "source_partition": record.partition,
            "source_offset": record.offset,
        },
    )
