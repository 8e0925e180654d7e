"""The shipped example apps (consumer/examples/), run with the test kit: through the real
engine into SQLite, as `offsetkeeper run` would run them, with no Kafka."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consumer import InvalidRecordError, TopicPartition, encode_single_object
from consumer.examples import orders, orders_avro, totals
from consumer.testing import Message, run_app
from schemas import examples_dir


def _order(order_id: str, status: str, amount_cents: int = 1250) -> dict[str, Any]:
    return {"order_id": order_id, "customer": "c-7", "amount_cents": amount_cents, "status": status}


def test_orders_upserts_the_last_event_of_each_order_and_dead_letters_the_bad_ones() -> None:
    run = run_app(
        orders.app,
        [
            _order("o-1", "new"),
            Message(_order("o-2", "new"), partition=1),
            {"order_id": "o-3", "customer": "c-7", "amount_cents": "12", "status": "new"},
            _order("o-1", "paid"),
            Message(b"{not json", partition=1),
        ],
        topic="orders",
        on_bad_record="dead-letter",
    )

    assert run.table("orders") == [_order("o-1", "paid"), _order("o-2", "new")]
    assert [(d.record.partition, d.record.offset) for d in run.dead_letters] == [(0, 1), (1, 1)]
    assert isinstance(run.dead_letters[0].error, InvalidRecordError)
    assert run.dead_letters[0].error.context["field"] == "amount_cents"
    assert run.dead_letters[0].attempts == 3  # the first and bad_record_retries=2 more
    assert run.committed == {TopicPartition("orders", 0): 3, TopicPartition("orders", 1): 2}
    assert (run.result.records, run.result.dead_letters, run.result.exit_code) == (5, 2, 0)


def test_orders_stops_a_partition_at_a_bad_record_under_the_default_policy() -> None:
    run = run_app(
        orders.app,
        [_order("o-1", "new"), {"order_id": "o-2"}, _order("o-3", "new")],
        topic="orders",
    )

    assert run.table("orders") == [_order("o-1", "new")]
    stopped = run.stopped[TopicPartition("orders", 0)]
    assert (stopped.context["offset"], stopped.context["field"]) == (1, "customer")
    assert run.committed == {TopicPartition("orders", 0): 1}
    assert (run.result.exit_code, run.dead_letters) == (2, [])


def _avro(version: int, event: dict[str, Any]) -> bytes:
    schema = json.loads((examples_dir() / f"orders-v{version}.avsc").read_text())
    return encode_single_object(schema, event)


def test_orders_avro_reads_version_1_and_2_events_as_version_2() -> None:
    v1 = {
        "order_id": "o-1",
        "customer": "c-1",
        "amount_cents": 500,
        "status": "new",
        "coupon": None,
    }
    v2 = {
        "order_id": "o-2",
        "customer": "c-2",
        "amount_cents": 2**40,
        "status": "paid",
        "currency": "USD",
    }
    run = run_app(
        orders_avro.app,
        [_avro(1, v1), _avro(2, v2)],
        topic="orders",
        schema_dir=str(examples_dir()),
    )

    assert run.table("orders") == [
        {
            "order_id": "o-1",
            "customer": "c-1",
            "amount_cents": 500,
            "status": "new",
            "currency": "EUR",
        },
        {
            "order_id": "o-2",
            "customer": "c-2",
            "amount_cents": 2**40,
            "status": "paid",
            "currency": "USD",
        },
    ]
    assert run.result.ok


def test_totals_keeps_a_running_total_per_customer_in_keyed_state(tmp_path: Path) -> None:
    database = tmp_path / "totals.db"
    payments = [
        Message({"customer": "ann", "amount_cents": 100}, key="ann"),
        Message({"customer": "bob", "amount_cents": 7, "currency": "USD"}, key="bob", partition=1),
        Message({"customer": "ann", "amount_cents": 250}, key="ann"),
    ]
    first = run_app(totals.app, payments, topic="payments", database=database)

    assert first.table("customer_totals") == [
        {"customer": "ann", "total_cents": 350, "currency": "EUR"},
        {"customer": "bob", "total_cents": 7, "currency": "USD"},
    ]
    assert first.state == {
        TopicPartition("payments", 0): {"ann": {"total_cents": 350, "currency": "EUR"}},
        TopicPartition("payments", 1): {"bob": {"total_cents": 7, "currency": "USD"}},
    }

    # The same log again plus one payment: the committed ones are not counted twice.
    more = [*payments, Message({"customer": "ann", "amount_cents": 1}, key="ann")]
    second = run_app(totals.app, more, topic="payments", database=database)

    assert second.result.records == 1
    assert second.state[TopicPartition("payments", 0)] == {
        "ann": {"total_cents": 351, "currency": "EUR"}
    }
