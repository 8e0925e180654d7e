"""Running totals per customer, kept as per-partition processor state.

Events: {"customer": str, "amount_cents": int, "currency": str (optional, default "EUR")} on a
topic keyed by customer, so all of one customer's payments are in one partition, in order.

Adding an amount to a total is not idempotent, so the total cannot be rebuilt from one record:
it lives in the partition's keyed state (one entry per customer), which offsetkeeper writes in
the same transaction as the row and the offset. A crash or a replay of the same offsets never
counts a payment twice.

State history (the app's own schema versions of one entry, keyed by customer):
  v1: total_cents
  v2: {"total_cents": int, "currency": str}   (v1 totals were all in EUR)

    offsetkeeper run --app consumer.examples.totals:app --group totals --topic payments \
        --sink sqlite:///totals.db
"""

from __future__ import annotations

from typing import Any

from consumer import App, InvalidRecordError, KeyedState, Record, Row, StateSchema, Table

TOTALS = Table(
    name="customer_totals",
    columns={"customer": "text", "total_cents": "bigint", "currency": "text"},
    key=("customer",),
)


def state_v1_to_v2(total_cents: int) -> dict[str, Any]:
    """One customer's entry, v1 -> v2 (run lazily when a v1 entry is read)."""
    return {"total_cents": total_cents, "currency": "EUR"}


def customer_of(record: Record) -> str | None:
    """The state key a payment touches, so a batch's uncached totals are read at once."""
    event: Any = record.value
    customer = event.get("customer") if isinstance(event, dict) else None
    return customer if isinstance(customer, str) else None


app = App(
    name="totals",
    tables=(TOTALS,),
    decode="json",
    state=StateSchema(version=2, upgraders={1: state_v1_to_v2}),
    state_key=customer_of,
)


@app.process
def add_payment(record: Record, totals: KeyedState) -> Row:
    event: Any = record.value
    if not isinstance(event, dict):
        raise InvalidRecordError("payment event is not a JSON object")
    customer, amount = event.get("customer"), event.get("amount_cents")
    if not isinstance(customer, str):
        raise InvalidRecordError("payment lacks a customer string", field="customer")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRecordError("payment lacks an integer amount_cents", field="amount_cents")
    entry = totals.setdefault(
        customer, {"total_cents": 0, "currency": event.get("currency", "EUR")}
    )
    entry["total_cents"] += amount
    return Row("customer_totals", {"customer": customer, **entry})
