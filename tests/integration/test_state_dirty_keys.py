"""Dirty keys and values in the SQL sinks' keyed state: every str a processor may use as a key
(NUL, lone surrogates, non-BMP, 10,000 characters) and JSON values with huge integers, NUL
escapes and deep nesting round-trip exactly through PostgreSQL's binary COPY and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumer import Checkpoint, StateChange, StateEntry, TopicPartition, open_sink
from consumer.cli.checkpoint_tools import store_checkpoints
from consumer.engine.state import encode_value
from tests.integration.conftest import SinkUnderTest

pytestmark = pytest.mark.integration

TP = TopicPartition("dirty", 0)
KEYS = ["plain", "nul\x00inside", "lone \ud800 surrogate", "\U0001f600 emoji", "é" * 10_000, ""]
VALUES = [
    2**200,
    "text with \x00 and \ud800",
    {"deep": [[[[[[[[[[{"x": None}]]]]]]]]]]},
    [1.5, -0.0, True, None],
    {"": "empty key"},
    "é",
]


def test_dirty_keys_and_values_round_trip_exactly(sink: SinkUnderTest) -> None:
    _round_trip(sink.url)


def test_dirty_keys_and_values_round_trip_exactly_in_the_file_sink(tmp_path: Path) -> None:
    _round_trip(f"file://{tmp_path / 'files'}")


def _round_trip(url: str) -> None:
    store = open_sink(url)
    store.open(())
    try:
        now = datetime.now(tz=UTC)
        changes = [
            StateChange(TP, key, encode_value(value), 1)
            for key, value in zip(KEYS, VALUES, strict=True)
        ]
        store_checkpoints(store, "g", [Checkpoint("g", TP.topic, TP.partition, 6, now)], changes)
        assert store.read_state("g", TP, KEYS) == {  # type: ignore[attr-defined]
            change.key: StateEntry(change.key, change.value or b"", 1) for change in changes
        }
        scanned = list(store.scan_state("g", TP))  # type: ignore[attr-defined]
        assert {(e.key, e.value) for e in scanned} == {(c.key, c.value) for c in changes}
        count, size = store.state_sizes("g", [TP])[TP]  # type: ignore[attr-defined]
        assert (count, size) == (len(KEYS), sum(len(c.value or b"") for c in changes))

        deleted = [StateChange(TP, KEYS[1], None, 1), StateChange(TP, KEYS[2], b"7", 2)]
        store_checkpoints(store, "g", [Checkpoint("g", TP.topic, TP.partition, 8, now)], deleted)
        after = store.read_state("g", TP, KEYS[:3])  # type: ignore[attr-defined]
        assert set(after) == {KEYS[0], KEYS[2]}
        assert (after[KEYS[2]].value, after[KEYS[2]].version) == (b"7", 2)
    finally:
        store.close()
