"""A test app that passes an order's values through unchecked, so that dirty data reaches the
engine's row check and the sink as the producer wrote it.

Events are JSON orders: {"order_id": str, "amount": int, "note": str, "price": float,
"attrs": any JSON, "paid": bool}. Each becomes one row of `passthrough_orders` whose values are
taken straight from the event (a missing field is NULL), with where it came from. The key is
(order_id, writer), `writer` an id unique to the process: the app is not idempotent on its own,
so a record committed by two processes (a batch applied twice across a crash) would show as
two rows of one (source_partition, source_offset).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from consumer import App, Record, Row, Table

WRITER = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

ORDERS = Table(
    name="passthrough_orders",
    columns={
        "order_id": "text",
        "writer": "text",
        "source_partition": "integer",
        "source_offset": "bigint",
        "amount": "bigint",
        "note": "text",
        "price": "double",
        "attrs": "json",
        "paid": "boolean",
    },
    key=("order_id", "writer"),
)

# The order's fields, copied into the row as they are.
FIELDS = ("order_id", "amount", "note", "price", "attrs", "paid")

app = App(name="passthrough", tables=(ORDERS,), decode="json")


@app.process
def passthrough(record: Record) -> Row:
    order: Any = record.value
    return Row(
        "passthrough_orders",
        {
            **{field: order.get(field) for field in FIELDS},
            "writer": WRITER,
            "source_partition": record.partition,
            "source_offset": record.offset,
        },
    )
