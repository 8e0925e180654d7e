"""A deterministic test app with one table of each mode, for `offsetkeeper audit`.

Events are the JSON orders of `tests.fixtures.kafka_tools.order_event`. Each becomes the
order's latest state in `ledger_latest` (upsert by order_id) and one entry in `ledger_entries`
(append: one row per record, keyed by where it came from). Values of every column type, so the
audit compares each kind as the sinks store it.
"""

from __future__ import annotations

from typing import Any

from consumer import App, Record, Row, Table

LATEST = Table(
    name="ledger_latest",
    columns={
        "order_id": "text",
        "customer": "text",
        "amount_cents": "bigint",
        "ratio": "double",
        "paid": "boolean",
        "doc": "json",
        "raw_key": "bytes",
    },
    key=("order_id",),
)
ENTRIES = Table(
    name="ledger_entries",
    columns={"order_id": "text", "amount_cents": "bigint", "status": "text"},
    mode="append",
)

app = App(name="ledger", tables=(LATEST, ENTRIES), decode="json")


@app.process
def ledger_rows(record: Record) -> list[Row]:
    event: Any = record.value
    amount = int(event["amount_cents"])
    return [
        Row(
            "ledger_latest",
            {
                "order_id": event["order_id"],
                "customer": event["customer"],
                "amount_cents": amount,
                "ratio": amount / 7,
                "paid": amount % 2 == 0,
                "doc": {"status": event["status"], "cents": [amount, -amount]},
                "raw_key": record.key,
            },
        ),
        Row(
            "ledger_entries",
            {"order_id": event["order_id"], "amount_cents": amount, "status": event["status"]},
        ),
    ]
