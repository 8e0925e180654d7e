"""Helpers shared by the integration tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.pg import create_database, query
from tests.fixtures.processes import ConsumerProcess
from tests.fixtures.services import Service


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


@dataclass
class SinkUnderTest:
    url: str
    query: Callable[[str], list[tuple[object, ...]]]

    def query_write(self, sql: str) -> None:
        """Run one statement that changes the sink behind offsetkeeper's back (fault setup)."""
        if self.url.startswith("sqlite:///"):
            with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30) as connection:
                connection.execute(sql)
        else:
            with psycopg.connect(self.url, autocommit=True) as connection:
                connection.execute(sql)  # type: ignore[arg-type]

    def checkpoints(self, group: str) -> dict[int, int]:
        rows = self.query(
            "SELECT partition, next_offset FROM offsetkeeper_checkpoints"
            f" WHERE group_id = '{group}'"
        )
        return {int(p): int(o) for p, o in rows}  # type: ignore[call-overload]


@pytest.fixture(params=["sqlite", "postgresql"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> SinkUnderTest:
    if request.param == "sqlite":
        db = tmp_path / "replay.db"

        def sqlite_query(sql: str) -> list[tuple[object, ...]]:
            if not db.exists():
                return []
            connection = sqlite3.connect(db, timeout=30)
            try:
                return connection.execute(sql).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
            finally:
                connection.close()

        return SinkUnderTest(f"sqlite:///{db}", sqlite_query)
    postgres: Service = request.getfixturevalue("postgres")
    dsn = create_database(postgres.address)
    return SinkUnderTest(dsn, lambda sql: query(dsn, sql))
