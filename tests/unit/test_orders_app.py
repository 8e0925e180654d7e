"""consumer.examples.orders: valid order events become rows; anything else names its field."""

from __future__ import annotations

from typing import Any

import pytest

from consumer import InvalidRecordError, Record, Row, load_app
from consumer.decoding.decoders import decoder_for
from consumer.engine.batch import process_partition
from consumer.examples.orders import ORDERS, app
from consumer.examples.orders import order_row as process
from tests.fixtures.fake_backend import raw

VALID = {"order_id": "o-1", "customer": "c-7", "amount_cents": 1250, "status": "paid"}
FIELDS = ("order_id", "customer", "amount_cents", "status")


def _record(value: Any, offset: int = 0) -> Record:
    return Record(
        topic="orders", partition=0, offset=offset, timestamp_ms=None, key=None, value=value
    )


def order_row(record: Record) -> Row:
    """The example's processor, typed as what it returns: exactly one Row."""
    row = process(record)
    assert isinstance(row, Row)
    return row


def test_the_app_is_loadable_by_reference() -> None:
    loaded = load_app("consumer.examples.orders:app")
    assert loaded is app
    assert loaded.decode == "json"
    assert loaded.tables == (ORDERS,)
    assert ORDERS.key == ("order_id",)
    assert dict(ORDERS.columns) == {
        "order_id": "text",
        "customer": "text",
        "amount_cents": "bigint",
        "status": "text",
    }


def test_a_valid_event_becomes_one_orders_row() -> None:
    assert order_row(_record(dict(VALID))) == Row("orders", VALID)


def test_extra_fields_are_not_written() -> None:
    row = order_row(_record({**VALID, "coupon": "X", "note": None}))
    assert row == Row("orders", VALID)


def test_zero_and_negative_amounts_are_ints_and_accepted() -> None:
    assert order_row(_record({**VALID, "amount_cents": 0})).values["amount_cents"] == 0
    assert order_row(_record({**VALID, "amount_cents": -5})).values["amount_cents"] == -5


@pytest.mark.parametrize("missing", FIELDS)
def test_each_missing_field_is_named(missing: str) -> None:
    event = {k: v for k, v in VALID.items() if k != missing}
    with pytest.raises(InvalidRecordError) as caught:
        order_row(_record(event))
    assert caught.value.field == missing
    assert f"lacks field {missing!r}" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "type_name"),
    [
        ("order_id", 17, "int"),
        ("order_id", None, "NoneType"),
        ("customer", ["c"], "list"),
        ("amount_cents", "1250", "str"),
        ("amount_cents", 12.5, "float"),
        ("amount_cents", None, "NoneType"),
        ("amount_cents", True, "bool"),
        ("amount_cents", False, "bool"),
        ("status", {"s": 1}, "dict"),
    ],
)
def test_each_wrong_type_is_named(field: str, value: Any, type_name: str) -> None:
    with pytest.raises(InvalidRecordError) as caught:
        order_row(_record({**VALID, field: value}))
    assert caught.value.field == field
    assert f"got {type_name}" in str(caught.value)


@pytest.mark.parametrize("value", [None, [VALID], "order", 5])
def test_an_event_that_is_not_an_object_is_invalid(value: Any) -> None:
    with pytest.raises(InvalidRecordError, match="not a JSON object"):
        order_row(_record(value))


def test_through_the_batch_path_the_error_is_located() -> None:
    records = [
        raw("orders", 2, 40, VALID),
        raw("orders", 2, 41, {**VALID, "order_id": "o-2", "amount_cents": True}),
    ]

    work = process_partition(app, decoder_for(app.decode), records[0].topic_partition, records)

    assert [(key, dict(values)) for _table, key, values, _raw in work.rows] == [(("o-1",), VALID)]
    assert work.next_offset == 41
    error = work.error
    assert isinstance(error, InvalidRecordError)
    assert (error.topic, error.partition, error.offset, error.field) == (
        "orders",
        2,
        41,
        "amount_cents",
    )
