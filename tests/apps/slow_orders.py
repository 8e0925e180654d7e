"""The orders example, slowed down on purpose, so a test can watch the lag fall and catch a
batch in the middle: every record takes SLOW_ORDERS_DELAY_S seconds (default 0.001) before the
example's own processor runs. Same `orders` table, same rows."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from consumer import App, Record, Row
from consumer.examples.orders import ORDERS, order_row

_DELAY_S = float(os.environ.get("SLOW_ORDERS_DELAY_S", "0.001"))

app = App(name="slow-orders", tables=(ORDERS,), decode="json")


@app.process
def slow_order_row(record: Record) -> Row | Iterable[Row] | None:
    time.sleep(_DELAY_S)
    return order_row(record)
