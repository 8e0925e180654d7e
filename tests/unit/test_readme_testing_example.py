"""The README's test-kit example ("Testing your app"), as it is printed there: keep the two
the same."""

from consumer import TopicPartition
from consumer.examples.orders import app
from consumer.testing import Message, run_app


def test_orders_are_upserted_and_bad_events_dead_lettered() -> None:
    run = run_app(
        app,
        [
            {"order_id": "o-1", "customer": "c-7", "amount_cents": 1250, "status": "new"},
            Message(
                {"order_id": "o-1", "customer": "c-7", "amount_cents": 1250, "status": "paid"},
                key="o-1",
                headers={"source": "web"},
            ),
            Message({"order_id": "o-2"}, partition=1),  # lacks fields: a bad record
        ],
        topic="orders",
        on_bad_record="dead-letter",
    )

    assert run.table("orders") == [
        {"order_id": "o-1", "customer": "c-7", "amount_cents": 1250, "status": "paid"},
    ]
    [letter] = run.dead_letters
    assert (letter.record.partition, letter.error.context["field"]) == (1, "customer")
    assert run.committed == {TopicPartition("orders", 0): 2, TopicPartition("orders", 1): 1}
