"""The chaos app, slowed down on purpose so a consumer stays far behind the log end: every
record takes SLOW_CHAOS_DELAY_S seconds (default 0.01) before the chaos processor runs."""

from __future__ import annotations

import os
import time

from consumer import App, Record, Row
from tests.apps.chaos import EVENTS, LATEST, chaos_rows

_DELAY_S = float(os.environ.get("SLOW_CHAOS_DELAY_S", "0.01"))

app = App(name="slow-chaos", tables=(EVENTS, LATEST), decode="json")


@app.process
def slow_chaos_rows(record: Record) -> list[Row]:
    time.sleep(_DELAY_S)
    return chaos_rows(record)
