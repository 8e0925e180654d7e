"""Helpers shared by the integration tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.processes import ConsumerProcess


@pytest.fixture
def consumers() -> Iterator[list[ConsumerProcess]]:
    """Every consumer process a test starts goes here, so none outlives the test."""
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.stop_if_running()


def sqlite_rows(db: Path, query: str) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return connection.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []  # tables not created yet
    finally:
        connection.close()


def sqlite_checkpoints(db: Path, group: str) -> dict[int, int]:
    rows = sqlite_rows(
        db,
        f"SELECT partition, next_offset FROM offsetkeeper_checkpoints WHERE group_id = '{group}'",
    )
    return {int(p): int(o) for p, o in rows}  # type: ignore[call-overload]
