"""A test app for dead-letter re-drive into an upsert table: the latest order per key.

Values are JSON {"order_id": str, "version": int, "poison": bool}. `app` raises on a poisoned
order (a processor bug); `fixed_app` is the same app after the fix. Rows are upserted by
order_id, so a re-driven letter older than a later write of its key must not replace it.
"""

from __future__ import annotations

from typing import Any

from consumer import App, Record, Row, Table

LATEST = Table(
    name="latest_orders", columns={"order_id": "text", "version": "bigint"}, key=("order_id",)
)

app = App(name="poison-latest", tables=(LATEST,), decode="json")
fixed_app = App(name="poison-latest-fixed", tables=(LATEST,), decode="json")


def _row(record: Record) -> Row:
    order: Any = record.value
    return Row("latest_orders", {"order_id": order["order_id"], "version": order["version"]})


@app.process
def buggy(record: Record) -> Row:
    if record.value.get("poison"):
        raise ValueError(f"cannot handle order {record.value['order_id']}")
    return _row(record)


@fixed_app.process
def fixed(record: Record) -> Row:
    return _row(record)
