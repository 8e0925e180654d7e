"""A test app for bad records: orders whose processing fails on one key, and a fixed version.

Values are orders (JSON or Avro, chosen per topic by `--decode`): {"order_id": str,
"amount": float, ...}. Each becomes one row of `poison_orders`, keyed by where it came from
(an append table), so a record processed twice would show as a second write of the same key
and a record lost as a missing key. `app` raises on the key b"poison" (a processor bug);
`fixed_app` is the same app after the fix.
"""

from __future__ import annotations

from typing import Any

from consumer import App, Record, Row, Table

ORDERS = Table(
    name="poison_orders",
    columns={"order_id": "text", "amount": "double", "currency": "text"},
    mode="append",
)

POISON_KEY = b"poison"


def _row(record: Record) -> Row:
    order: Any = record.value
    return Row(
        "poison_orders",
        {
            "order_id": order["order_id"],
            # JSON orders carry "amount"; the Avro example orders carry "amount_cents".
            "amount": order["amount"] if "amount" in order else order["amount_cents"],
            "currency": order.get("currency"),
        },
    )


app = App(name="poison", tables=(ORDERS,), decode="json")
fixed_app = App(name="poison-fixed", tables=(ORDERS,), decode="json")


@app.process
def buggy(record: Record) -> Row:
    if record.key == POISON_KEY:
        raise ValueError(f"cannot price order {record.value['order_id']}")
    return _row(record)


@fixed_app.process
def fixed(record: Record) -> Row:
    return _row(record)
