"""The audit's verdicts, row by row, without a broker: what counts as matching, missing,
different, unexpected or out of scope, with values as each SQL driver returns them."""

from __future__ import annotations

from typing import Any

from consumer import RawRecord, StoredPosition, Table
from consumer.audit.compare import Ranges, Sample, compare_table
from consumer.audit.memory import ExpectedTable, MemorySink

TOTALS = Table(
    "totals",
    columns={"id": "text", "total": "bigint", "ok": "boolean", "doc": "json", "blob": "bytes"},
    key=("id",),
)
LOG = Table("log", columns={"note": "text"}, mode="append")
RANGES = Ranges({("t", 0): (0, 100), ("t", 1): (0, 100)})


def _at(partition: int, offset: int, timestamp_ms: int = 0) -> RawRecord:
    return RawRecord("t", partition, offset, timestamp_ms, None, None)


def _expected(*rows: tuple[dict[str, Any], RawRecord]) -> ExpectedTable:
    memory = MemorySink()
    memory.open([TOTALS, LOG])
    memory.write_guarded_rows(TOTALS, [r for r, _ in rows], [p for _, p in rows])
    return memory.tables["totals"]


def _row(key: str, total: int) -> dict[str, Any]:
    return {"id": key, "total": total, "ok": True, "doc": {"b": 1, "a": [2]}, "blob": b"\x00"}


def _stored(key: str, total: int, partition: int, offset: int) -> tuple[dict[str, Any], Any]:
    # As SQLite returns them: a boolean as 1, JSON keys in another order; bytes as memoryview
    # (PostgreSQL).
    values = {
        "id": key,
        "total": total,
        "ok": 1,
        "doc": {"a": [2], "b": 1},
        "blob": memoryview(b"\x00"),
    }
    return values, StoredPosition("t", partition, offset, 0)


def test_each_verdict() -> None:
    expected = _expected(
        (_row("same", 1), _at(0, 1)),
        (_row("altered", 2), _at(0, 2)),
        (_row("gone", 3), _at(0, 3)),
        (_row("stale", 4), _at(0, 9)),
        (_row("overtaken", 5), _at(0, 5)),
    )
    stored = [
        _stored("same", 1, 0, 1),
        _stored("altered", 20, 0, 2),
        _stored("stale", 4, 0, 4),  # an older write of the key: the newest one was lost
        _stored("overtaken", 6, 0, 500),  # newer, outside the range: the live group went on
        _stored("stray", 7, 1, 50),  # inside the range, but the range never wrote it
        ({"id": "hand", "total": 8}, None),  # no position: not written by offsetkeeper
        _stored("later", 9, 1, 700),  # outside the range, not written by it: not audited
    ]
    report = compare_table(expected, stored, RANGES)
    assert {v: report.total(v) for v in ("matching", "missing", "different", "unexpected")} == {
        "matching": 1,
        "missing": 1,
        "different": 2,
        "unexpected": 2,
    }
    assert report.out_of_scope == 2
    examples = report.partitions["0"].examples
    assert examples["different"][0]["columns"] == ["total"]
    assert "older position" in examples["different"][1]["why"]
    assert examples["missing"] == [{"key": ["gone"], "expected_at": "t[0]@3"}]
    assert report.partitions["none"].examples["unexpected"][0]["why"] == "no source position"
    assert not report.clean


def test_append_rows_are_judged_by_their_source_position() -> None:
    memory = MemorySink()
    memory.open([LOG])
    source = {"source_topic": "t", "source_partition": 0, "source_row": 0}
    memory.write_rows(LOG, [{"note": "a", **source, "source_offset": 1}])
    stored = [
        ({"note": "a", **source, "source_offset": 1}, None),
        ({"note": "x", **source, "source_offset": 2}, None),  # inside the range: unexpected
        ({"note": "y", **source, "source_offset": 200}, None),  # outside: not audited
    ]
    report = compare_table(memory.tables["log"], stored, RANGES)
    assert (report.total("matching"), report.total("unexpected"), report.out_of_scope) == (1, 1, 1)


def test_samples_partition_the_keys() -> None:
    rows = [(_row(f"k{i}", i), _at(0, i)) for i in range(60)]
    stored = [_stored(f"k{i}", i, 0, i) for i in range(60)]
    halves = [
        compare_table(_expected(*rows), stored, RANGES, sample=Sample(3, part)).total("matching")
        for part in range(3)
    ]
    assert sum(halves) == 60
    assert all(0 < half < 60 for half in halves)


def test_the_memory_sink_keeps_the_newest_position_per_key() -> None:
    expected = _expected((_row("k", 2), _at(0, 2)), (_row("k", 1), _at(0, 1)))
    assert expected.rows[("k",)][1] == _at(0, 2)
