"""Every value the engine's row check admits for the SQLite sink is stored exactly, and every
value it refuses is an InvalidRecordError naming its column: a property test over rows of
every column type with hostile values (tests/fixtures/values.py), through the real sink."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

from consumer import Checkpoint, TopicPartition
from sinks import SqliteSink
from tests.fixtures.values import ALL_TYPES, GeneratedRow, ThroughSink, rows

TP = TopicPartition("values", 0)


def test_admitted_values_are_stored_exactly_and_refused_ones_name_their_column(
    tmp_path: Path,
) -> None:
    db = tmp_path / "values.db"
    sink = SqliteSink(db)
    sink.open([ALL_TYPES])
    epochs = sink.acquire("g", [TP])
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reader.row_factory = sqlite3.Row

    def write(row: dict[str, Any]) -> None:
        sink.begin()
        try:
            sink.write_rows(ALL_TYPES, [row])
            checkpoint = Checkpoint("g", TP.topic, TP.partition, row["n"], datetime.now(tz=UTC))
            sink.save_checkpoints("g", [checkpoint], epochs)
            sink.commit()
        except BaseException:
            sink.rollback()
            raise

    def read(n: int) -> dict[str, Any]:
        stored = dict(reader.execute("SELECT * FROM all_types WHERE n = ?", (n,)).fetchone())
        doc = stored["doc"]
        stored["doc"] = None if doc is None else json.loads(doc)
        return stored

    through = ThroughSink(sink.value_limits, write, read)

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(generated=rows())
    def check(generated: GeneratedRow) -> None:
        through.check(generated)

    try:
        check()
    finally:
        reader.close()
        sink.close()
    assert through.stored > 50
    assert through.refused > 50
