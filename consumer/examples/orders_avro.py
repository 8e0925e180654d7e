"""Orders in Avro: order events of any schema version upserted into an `orders` table.

Values are Avro single-object encoded (`consumer.decoding.avro.encode_single_object`) with
`schemas/examples/orders-v1.avsc` or `orders-v2.avsc`, and read as version 2: a version-1 order
gets `currency` "EUR" and loses `coupon`, and its int `amount_cents` is read as a long. The
table is the JSON example's (consumer/examples/orders.py) plus `currency`.

    offsetkeeper run --app consumer.examples.orders_avro:app --group orders --topic orders \
        --schema-dir schemas/examples --sink sqlite:///orders.db

The reader schema is the installed package's copy of orders-v2.avsc, so the app works from any
working directory (`schemas.examples_dir()` is also what to give as `--schema-dir` elsewhere).
"""

from __future__ import annotations

from typing import Any

from consumer import App, InvalidRecordError, Record, Row, Table
from schemas import examples_dir

ORDERS = Table(
    name="orders",
    columns={
        "order_id": "text",
        "customer": "text",
        "amount_cents": "bigint",
        "status": "text",
        "currency": "text",
    },
    key=("order_id",),
)

READER_SCHEMA = str(examples_dir() / "orders-v2.avsc")

app = App(
    name="orders-avro",
    tables=(ORDERS,),
    decode="avro-local",
    reader_schema=READER_SCHEMA,
)


@app.process
def order_row(record: Record) -> Row:
    event: Any = record.value
    if not isinstance(event, dict):
        raise InvalidRecordError("order event is not an Avro record")
    # Read as orders-v2 every field is present with its type; a different reader schema given
    # with --reader-schema may lack one.
    missing = [column for column in ORDERS.columns if column not in event]
    if missing:
        raise InvalidRecordError(
            f"order event lacks field {missing[0]!r} (is the reader schema orders-v2?)",
            field=missing[0],
        )
    return Row("orders", {column: event[column] for column in ORDERS.columns})
