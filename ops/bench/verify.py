"""Row-by-row checks of a contender's output after a run.

- rows: the table holds exactly one row per key, and each row is the one written by the last
  record of that key (every checked column equal to what the workload generated);
- checkpoints: offsetkeeper's stored next offset of every partition is the partition's end;
- ranges: the offset ranges the engine reported as committed tile [0, end) of every partition
  with no gap and no overlap: every record was committed exactly once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import workload

_SELECT = f"SELECT {', '.join(workload.CHECKED_COLUMNS)} FROM {workload.TABLE}"
_EXAMPLES = 5


def _compare(rows: Iterable[Sequence[Any]], expected: workload.Expected) -> dict[str, Any]:
    seen: set[str] = set()
    mismatched: list[str] = []
    unexpected: list[str] = []
    duplicated = 0
    for row in rows:
        key = str(row[0])
        if key in seen:
            duplicated += 1
            continue
        seen.add(key)
        if key not in expected.last_seq:
            unexpected.append(key)
            continue
        want = expected.row(key)
        got = dict(zip(workload.CHECKED_COLUMNS, row, strict=True))
        if any(got[c] != want[c] for c in workload.CHECKED_COLUMNS):
            mismatched.append(key)
    missing = len(expected.last_seq) - (len(seen) - len(unexpected))
    ok = not (mismatched or unexpected or duplicated or missing)
    return {
        "ok": ok,
        "rows": len(seen) + duplicated,
        "expected_rows": len(expected.last_seq),
        "missing": missing,
        "unexpected": len(unexpected),
        "duplicated": duplicated,
        "mismatched": len(mismatched),
        "examples": (mismatched + unexpected)[:_EXAMPLES],
    }


def pg_rows(dsn: str, expected: workload.Expected) -> dict[str, Any]:
    with psycopg.connect(dsn) as db, db.cursor() as cursor:
        cursor.execute(_SELECT)  # type: ignore[arg-type]
        return _compare(cursor, expected)


def sqlite_rows(path: Path, expected: workload.Expected) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _compare(db.execute(_SELECT), expected)
    finally:
        db.close()


def _checkpoint_query(group: str, topic: str, mark: str) -> str:
    return (
        "SELECT partition, next_offset FROM offsetkeeper_checkpoints"
        f" WHERE group_id = {mark} AND topic = {mark}"
    )


def pg_checkpoints(dsn: str, group: str, topic: str) -> dict[int, int]:
    with psycopg.connect(dsn) as db:
        found = db.execute(_checkpoint_query(group, topic, "%s"), (group, topic)).fetchall()  # type: ignore[arg-type]
    return {int(p): int(o) for p, o in found}


def sqlite_checkpoints(path: Path, group: str, topic: str) -> dict[int, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = db.execute(_checkpoint_query(group, topic, "?"), (group, topic)).fetchall()
    finally:
        db.close()
    return {int(p): int(o) for p, o in found}


def checkpoints(stored: Mapping[int, int], ends: Mapping[int, int]) -> dict[str, Any]:
    wrong = {p: (stored.get(p), end) for p, end in ends.items() if stored.get(p, 0) != end}
    return {"ok": not wrong, "wrong": {str(p): list(v) for p, v in wrong.items()}}


def ranges(
    reported: Mapping[str, Sequence[Sequence[int]]], ends: Mapping[int, int]
) -> dict[str, Any]:
    problems: list[str] = []
    for partition, end in ends.items():
        spans = sorted(tuple(r) for r in reported.get(str(partition), []))
        position = 0
        for first, after in spans:
            if first != position:
                kind = "overlap" if first < position else "gap"
                problems.append(f"p{partition}: {kind} at {position} (next range starts {first})")
            position = max(position, after)
        if position != end:
            problems.append(f"p{partition}: committed up to {position}, end is {end}")
    return {"ok": not problems, "problems": problems[:_EXAMPLES]}
