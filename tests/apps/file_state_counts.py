"""A stateful test app for the file sink's keyed state: a count and a sum per key, which a
double (or lost) apply changes, so exactness shows in the state itself.

Events are the chaos events, JSON {"key": str, "version": int}. Each key's entry is
{"count": n, "sum": s} (`step`): every record adds 1 and its version; a version that is
49 modulo 50 deletes the entry instead (so tombstones go through the engine and the sink
too). Each record also upserts its key's totals into `file_state_totals` (count 0 after a
delete), so the last committed row per key must equal the key's entry.

The test computes the truth by folding `step` over the records of each partition in offset
order; the processor changes an entry it read in place or sets a new one, both of which the
engine must persist exactly once.
"""

from __future__ import annotations

from typing import Any

from consumer import App, InvalidRecordError, KeyedState, Record, Row, StateSchema, Table

TOTALS = Table(
    name="file_state_totals",
    columns={"event_key": "text", "count": "bigint", "total": "bigint"},
    key=("event_key",),
)
DELETE_EVERY = 50


def step(entry: dict[str, int] | None, version: int) -> dict[str, int] | None:
    """A key's entry after one record of `version` (None: no entry)."""
    if version % DELETE_EVERY == DELETE_EVERY - 1:
        return None
    count, total = (0, 0) if entry is None else (entry["count"], entry["sum"])
    return {"count": count + 1, "sum": total + version}


def _key(record: Record) -> str | None:
    event: Any = record.value
    key = event.get("key") if isinstance(event, dict) else None
    return key if isinstance(key, str) else None


app = App(
    name="file_state_counts",
    tables=(TOTALS,),
    decode="json",
    state=StateSchema(version=1),
    state_key=_key,
)


@app.process
def count_and_sum(record: Record, state: KeyedState) -> Row:
    event: Any = record.value
    key = _key(record)
    if key is None or not isinstance(event.get("version"), int):
        raise InvalidRecordError("the event needs a key and a version", field="key")
    version = event["version"]
    entry = state.get(key)
    after = step(entry, version)
    if after is None:
        state.pop(key, None)
        return Row("file_state_totals", {"event_key": key, "count": 0, "total": 0})
    if entry is None or version % 2:
        state[key] = after
    else:  # an in-place change of the value read: the engine must notice it
        entry["count"], entry["sum"] = after["count"], after["sum"]
    return Row(
        "file_state_totals", {"event_key": key, "count": after["count"], "total": after["sum"]}
    )
