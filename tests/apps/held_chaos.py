"""The chaos app (`tests.apps.chaos`), made not idempotent on its own, whose processing a test
can hold in the middle of a batch.

Besides the chaos rows (one per record and writer process), every time a record is applied it
adds a row with a fresh random id to `held_chaos_applies`: a record applied twice, even by one
process, leaves two rows for one (partition, offset).

While the file named by HELD_CHAOS_GATE exists, processing a record waits for it to go away:
the member holds its batch, uncommitted, for as long as the test wants. When it starts to
wait, it writes `<gate>.held` (JSON: pid, partition, offset), so the test knows the member is
mid-batch and which record it holds. Without HELD_CHAOS_GATE it never waits.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from consumer import App, Record, Row, Table
from tests.apps.chaos import EVENTS, LATEST, WRITER, chaos_rows

APPLIES = Table(
    name="held_chaos_applies",
    columns={
        "apply_id": "text",
        "source_partition": "integer",
        "source_offset": "bigint",
        "writer": "text",
    },
    key=("apply_id",),
)

_GATE = os.environ.get("HELD_CHAOS_GATE")
_POLL_S = 0.05

app = App(name="held-chaos", tables=(EVENTS, LATEST, APPLIES), decode="json")


def held_marker(gate: Path) -> Path:
    """Where a held member says what it holds."""
    return gate.with_name(gate.name + ".held")


def _hold_while_gated(gate: Path, record: Record) -> None:
    if not gate.exists():
        return
    marker = {"pid": os.getpid(), "partition": record.partition, "offset": record.offset}
    written = gate.with_name(gate.name + ".writing")
    written.write_text(json.dumps(marker))
    written.replace(held_marker(gate))  # the test never reads half a marker
    while gate.exists():
        time.sleep(_POLL_S)


@app.process
def held_chaos_rows(record: Record) -> list[Row]:
    if _GATE:
        _hold_while_gated(Path(_GATE), record)
    applied = {
        "apply_id": uuid.uuid4().hex,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "writer": WRITER,
    }
    return [*chaos_rows(record), Row("held_chaos_applies", applied)]
