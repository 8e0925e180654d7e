"""Orders: JSON order events upserted into an `orders` table keyed by `order_id`.

Event: {"order_id": str, "customer": str, "amount_cents": int, "status": str}

    offsetkeeper run --app consumer.examples.orders:app --group orders --topic orders \
        --sink sqlite:///orders.db
"""

from __future__ import annotations

from typing import Any

from consumer import App, InvalidRecordError, Record, Row, Table

ORDERS = Table(
    name="orders",
    columns={"order_id": "text", "customer": "text", "amount_cents": "bigint", "status": "text"},
    key=("order_id",),
)

_FIELDS: dict[str, type] = {"order_id": str, "customer": str, "amount_cents": int, "status": str}

app = App(name="orders", tables=(ORDERS,), decode="json")


@app.process
def order_row(record: Record) -> Row:
    event: Any = record.value
    if not isinstance(event, dict):
        raise InvalidRecordError("order event is not a JSON object")
    values: dict[str, Any] = {}
    for field, expected in _FIELDS.items():
        if field not in event:
            raise InvalidRecordError(f"order event lacks field {field!r}", field=field)
        value = event[field]
        # bool is an int in Python; an amount of `true` is still wrong.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise InvalidRecordError(
                f"order field {field!r} must be {expected.__name__}, got {type(value).__name__}",
                field=field,
            )
        values[field] = value
    return Row("orders", values)
