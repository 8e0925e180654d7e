"""Comparing what a range should have written (the recompute, `consumer.audit.memory`) with
what the sink holds, row by row.

Upsert tables: every key whose last write falls inside the range must hold that write's
values and position. A stored row from a newer position outside the range is out of scope
(written later, by the live group or another topic); a stored row from a position inside the
range that the recompute did not produce, or with no position at all, is unexpected.
Append tables: the rows whose source position is inside the range must be exactly the
recomputed ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from consumer.audit.memory import ExpectedTable, Key
from consumer.core.app import Table
from consumer.core.records import SourcePosition, StoredPosition, replaces

Verdict = Literal["matching", "missing", "different", "unexpected"]
VERDICTS: tuple[Verdict, ...] = ("matching", "missing", "different", "unexpected")
# A row outside the audited range (a newer write of a key): not compared.
OUT_OF_SCOPE = "newer_outside_range"

# Partition label of a stored row that has no source position.
NO_POSITION = "none"


@dataclass(frozen=True, slots=True)
class Sample:
    """Audit only the keys whose stable hash modulo `every` is `slice` (every=1: all keys)."""

    every: int = 1
    slice: int = 0

    def takes(self, key: Key) -> bool:
        if self.every == 1:
            return True
        digest = hashlib.sha256(_canonical(list(key)).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.every == self.slice


@dataclass(frozen=True, slots=True)
class Ranges:
    """The audited offsets: per (topic, partition), [start, end)."""

    by_partition: Mapping[tuple[str, int], tuple[int, int]]

    def holds(self, topic: str, partition: int, offset: int) -> bool:
        bounds = self.by_partition.get((topic, partition))
        return bounds is not None and bounds[0] <= offset < bounds[1]


@dataclass(slots=True)
class PartitionCounts:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(slots=True)
class TableReport:
    """One table's verdicts per partition (the partition of the write the row is judged by)."""

    table: str
    mode: str
    partitions: dict[str, PartitionCounts] = field(default_factory=dict)
    out_of_scope: int = 0

    def add(
        self,
        verdict: Verdict,
        partition: str,
        example: dict[str, Any] | None,
        max_examples: int,
    ) -> None:
        counts = self.partitions.setdefault(partition, PartitionCounts())
        counts.counts[verdict] += 1
        if example is not None and verdict != "matching":
            shown = counts.examples.setdefault(verdict, [])
            if len(shown) < max_examples:
                shown.append(example)

    def total(self, verdict: Verdict) -> int:
        return sum(counts.counts[verdict] for counts in self.partitions.values())

    @property
    def clean(self) -> bool:
        return all(self.total(v) == 0 for v in VERDICTS if v != "matching")

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "mode": self.mode,
            "totals": {v: self.total(v) for v in VERDICTS},
            OUT_OF_SCOPE: self.out_of_scope,
            "partitions": {
                partition: {"counts": counts.counts, "examples": counts.examples}
                for partition, counts in sorted(self.partitions.items())
            },
        }


def compare_table(
    expected: ExpectedTable,
    stored: Iterable[tuple[dict[str, Any], StoredPosition | None]],
    ranges: Ranges,
    *,
    sample: Sample = Sample(),
    max_examples: int = 5,
) -> TableReport:
    """The verdict of every sampled row of one table (see the module docstring)."""
    return _TableAudit(expected, ranges, sample, max_examples).run(stored)


_Entry = tuple[Mapping[str, Any], SourcePosition | None]


class _TableAudit:
    def __init__(
        self, expected: ExpectedTable, ranges: Ranges, sample: Sample, max_examples: int
    ) -> None:
        self.table = table = expected.table
        self.ranges = ranges
        self.sample = sample
        self.max_examples = max_examples
        self.report = TableReport(table.name, table.mode)
        self.normalize = _normalizer(table)
        self._key = key_normalizer(table)
        # Keys as the sink gives them back (a boolean key column reads back as 0/1 from SQLite).
        self.wanted: dict[Key, _Entry] = {}
        for key, entry in expected.rows.items():
            normalized = self._key(key)
            if sample.takes(normalized):
                self.wanted[normalized] = entry

    def _add(self, verdict: Verdict, partition: str, example: dict[str, Any] | None) -> None:
        self.report.add(verdict, partition, example, self.max_examples)

    def run(self, stored: Iterable[tuple[dict[str, Any], StoredPosition | None]]) -> TableReport:
        for values, position in stored:
            key = self._key(values.get(column) for column in self.table.key)
            if not self.sample.takes(key):
                continue
            entry = self.wanted.pop(key, None)
            if self.table.mode == "append":
                self._judge_append(key, values, entry)
            else:
                self._judge_upsert(key, values, position, entry)
        for key, (_values, written_at) in self.wanted.items():
            partition = _partition_of(self.table, key, written_at)
            self._add("missing", partition, {"key": _shown(key), "expected_at": _at(written_at)})
        return self.report

    def _judge_upsert(
        self,
        key: Key,
        values: dict[str, Any],
        position: StoredPosition | None,
        entry: _Entry | None,
    ) -> None:
        shown: dict[str, Any] = {"key": _shown(key), "stored_at": _at(position)}
        if entry is None:
            if position is None:
                self._add("unexpected", NO_POSITION, {**shown, "why": "no source position"})
            elif self.ranges.holds(position.topic, position.partition, position.offset):
                why = "the range did not write this key"
                self._add("unexpected", str(position.partition), {**shown, "why": why})
            else:
                self.report.out_of_scope += 1
            return
        expected_values, expected_at = entry
        if expected_at is None:  # not a guarded write: compare values only
            self._judge_values(key, str(NO_POSITION), expected_values, values, shown)
            return
        partition = str(expected_at.partition)
        shown["expected_at"] = _at(expected_at)
        if position is not None and not replaces(expected_at, position):
            if self.ranges.holds(position.topic, position.partition, position.offset):
                why = "stored from a position inside the range that did not write this key last"
                self._add("unexpected", partition, {**shown, "why": why})
            else:
                self.report.out_of_scope += 1
            return
        if position is None or _at(position) != _at(expected_at):
            why = "stored from an older position (a lost or regressed write)"
            self._add("different", partition, {**shown, "why": why})
            return
        self._judge_values(key, partition, expected_values, values, shown)

    def _judge_append(self, key: Key, values: dict[str, Any], entry: _Entry | None) -> None:
        topic, partition, offset = str(key[0]), int(key[1]), int(key[2])
        shown = {"key": _shown(key)}
        if entry is None:
            if self.ranges.holds(topic, partition, offset):
                why = "the range did not write this row"
                self._add("unexpected", str(partition), {**shown, "why": why})
            else:
                self.report.out_of_scope += 1
            return
        self._judge_values(key, str(partition), entry[0], values, shown)

    def _judge_values(
        self,
        key: Key,
        partition: str,
        expected: Mapping[str, Any],
        stored: Mapping[str, Any],
        shown: dict[str, Any],
    ) -> None:
        columns = [
            column
            for column in self.table.columns
            if self.normalize(column, expected.get(column))
            != self.normalize(column, stored.get(column))
        ]
        if columns:
            self._add("different", partition, {**shown, "columns": columns})
        else:
            self._add("matching", partition, None)


def _partition_of(table: Table, key: Key, position: SourcePosition | None) -> str:
    if position is not None:
        return str(position.partition)
    return str(key[1]) if table.mode == "append" else NO_POSITION


def key_normalizer(table: Table) -> Callable[[Iterable[Any]], Key]:
    """A key (its values in key column order) as comparable across drivers: the app's value
    and the one the sink gives back compare equal (a boolean key column reads back as 0/1
    from SQLite)."""
    normalize = _normalizer(table)

    def key(values: Iterable[Any]) -> Key:
        return tuple(
            normalize(column, value) for column, value in zip(table.key, values, strict=True)
        )

    return key


def _normalizer(table: Table) -> Any:
    """Values as comparable across drivers: SQLite's 0/1 booleans, PostgreSQL's memoryviews,
    JSON in any key order, an int stored in a double column."""
    types = table.columns

    def normalize(column: str, value: Any) -> Any:
        if value is None:
            return None
        kind = types.get(column)
        if kind == "boolean":
            return bool(value)
        if kind == "bytes":
            return bytes(value)
        if kind == "json":
            return _canonical(value)
        if kind == "double":
            number = float(value)
            return "nan" if math.isnan(number) else number
        return value

    return normalize


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr, allow_nan=True)


def _shown(key: Key) -> list[Any]:
    return [v.hex() if isinstance(v, bytes | bytearray | memoryview) else v for v in key]


def _at(position: SourcePosition | None) -> str | None:
    if position is None:
        return None
    return f"{position.topic}[{position.partition}]@{position.offset}"
