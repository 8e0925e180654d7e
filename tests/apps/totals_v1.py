"""The totals example as it was with state version 1 (for the state-upgrade test)."""

from __future__ import annotations

from typing import Any

from consumer import App, Record, Row, StateSchema, Table

TOTALS = Table(
    name="customer_totals",
    columns={"customer": "text", "total_cents": "bigint"},
    key=("customer",),
)

app = App(name="totals", tables=(TOTALS,), decode="json", state=StateSchema(version=1))


@app.process
def add_payment(record: Record, totals: dict[str, int]) -> Row:
    event: Any = record.value
    customer = event["customer"]
    totals[customer] = totals.get(customer, 0) + event["amount_cents"]
    return Row("customer_totals", {"customer": customer, "total_cents": totals[customer]})
