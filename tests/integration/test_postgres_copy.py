"""PostgresSink's COPY against a real PostgreSQL, into a table it made and into one made by hand
with other types (PostgreSQL converts): every value the engine's checks let through is stored
exactly, absent columns as NULL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from consumer import Table, TopicPartition
from consumer.checkpoints.model import Checkpoint
from sinks._postgres import PostgresSink
from tests.fixtures.pg import create_database, query
from tests.fixtures.services import Service

GROUP = "copy-group"
TP = TopicPartition("events", 0)

ALL_TYPES = Table(
    name="all_types",
    columns={
        "id": "text",
        "big": "bigint",
        "small": "integer",
        "ratio": "double",
        "flag": "boolean",
        "blob": "bytes",
        "doc": "json",
    },
    key=("id",),
)

ROWS: list[dict[str, Any]] = [
    {
        "id": "plain",
        "big": 2**63 - 1,
        "small": -(2**31),
        "ratio": 0.1,
        "flag": True,
        "blob": b"\x00\xff",
        "doc": {"a": [1, 2**70, None]},
    },
    {"id": "ünïcödé 😀", "big": -(2**63), "ratio": 3, "blob": memoryview(b"mv"), "doc": None},
    {"id": "absent columns"},
    {"id": "nan", "ratio": float("nan"), "flag": False, "doc": "\\u0000 in a string, escaped"},
]


def _write(dsn: str, rows: list[dict[str, Any]]) -> PostgresSink:
    sink = PostgresSink(dsn)
    sink.open([ALL_TYPES])
    epochs = sink.acquire(GROUP, [TP])
    sink.begin()
    sink.write_rows(ALL_TYPES, rows)
    checkpoint = Checkpoint(
        group=GROUP,
        topic=TP.topic,
        partition=TP.partition,
        next_offset=len(rows),
        updated_at=datetime.now(tz=UTC),
        epoch=epochs[TP],
    )
    sink.save_checkpoints(GROUP, [checkpoint], epochs)
    sink.commit()
    return sink


def _stored(dsn: str) -> dict[str, tuple[Any, ...]]:
    found = query(
        dsn, "SELECT id, big, small, ratio::float8, flag, blob, doc FROM all_types ORDER BY id"
    )
    return {row[0]: row[1:] for row in found}


@pytest.mark.parametrize("made_by", ["offsetkeeper", "hand"])
def test_every_checked_value_is_stored_exactly(postgres: Service, made_by: str) -> None:
    dsn = create_database(postgres.address)
    if made_by == "hand":  # other types: text COPY, converted by PostgreSQL
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(
                "CREATE TABLE all_types (id VARCHAR(40) PRIMARY KEY, big NUMERIC(20, 0),"
                " small BIGINT, ratio NUMERIC, flag BOOLEAN, blob BYTEA, doc JSON)"
            )
    _write(dsn, ROWS).close()

    stored = _stored(dsn)
    assert stored["plain"][:5] == (2**63 - 1, -(2**31), 0.1, True, b"\x00\xff")
    assert stored["plain"][5] == {"a": [1, 2**70, None]}
    assert stored["ünïcödé 😀"][:3] == (-(2**63), None, 3.0)
    assert bytes(stored["ünïcödé 😀"][4]) == b"mv"
    assert stored["ünïcödé 😀"][5] is None  # JSON null (a json column's None is JSON)
    assert stored["absent columns"][:5] == (None, None, None, None, None)
    if made_by == "offsetkeeper":  # NUMERIC has NaN too, but compare the double column only
        assert stored["nan"][2] != stored["nan"][2]
    assert stored["nan"][5] == "\\u0000 in a string, escaped"
