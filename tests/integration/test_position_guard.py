"""Position-guarded upserts on the real SQL sinks (SQLite and PostgreSQL): a row is replaced
only by a write from a position that is not older, inside the upsert statement itself."""

from __future__ import annotations

from typing import Any

import pytest

from consumer import (
    PositionGuardedSink,
    RawRecord,
    StoredPosition,
    StoredRowsReader,
    Table,
    open_sink,
)
from tests.integration.conftest import SinkUnderTest

TOTALS = Table("totals", columns={"id": "text", "total": "bigint"}, key=("id",))
KEYS_ONLY = Table("seen", columns={"id": "text"}, key=("id",))


def _at(topic: str, partition: int, offset: int, timestamp_ms: int | None) -> RawRecord:
    return RawRecord(topic, partition, offset, timestamp_ms, None, None)


class Guarded:
    """A real sink of the URL, opened on the test's tables, one transaction per write."""

    def __init__(self, url: str, tables: tuple[Table, ...] = (TOTALS, KEYS_ONLY)) -> None:
        sink = open_sink(url)
        assert isinstance(sink, PositionGuardedSink)
        assert isinstance(sink, StoredRowsReader)
        sink.open(list(tables))
        self.sink = sink
        self.reader: StoredRowsReader = sink

    def write(
        self,
        rows: list[tuple[dict[str, Any], RawRecord]],
        *,
        table: Table = TOTALS,
        overwrite_newer: bool = False,
    ) -> None:
        assert isinstance(self.sink, PositionGuardedSink)
        self.sink.begin()  # type: ignore[attr-defined]
        self.sink.write_guarded_rows(
            table,
            [values for values, _at in rows],
            [position for _values, position in rows],
            overwrite_newer=overwrite_newer,
        )
        self.sink.commit()  # type: ignore[attr-defined]

    def stored(self, table: Table = TOTALS) -> dict[str, tuple[dict[str, Any], Any]]:
        return {values["id"]: (values, at) for values, at in self.reader.read_stored_rows(table)}

    def close(self) -> None:
        self.sink.close()  # type: ignore[attr-defined]


@pytest.fixture
def guarded(sink: SinkUnderTest) -> Any:
    opened = Guarded(sink.url)
    yield opened
    opened.close()


def test_within_a_partition_the_higher_offset_wins_and_an_equal_one_rewrites(
    guarded: Guarded,
) -> None:
    guarded.write([({"id": "k", "total": 5}, _at("orders", 0, 5, 1000))])
    # An older offset of the same partition, even with a later timestamp, does not replace it.
    guarded.write([({"id": "k", "total": 3}, _at("orders", 0, 3, 9999))])
    assert guarded.stored()["k"] == (
        {"id": "k", "total": 5},
        StoredPosition("orders", 0, 5, 1000),
    )
    # The same record again (a replay with a fixed app) rewrites it.
    guarded.write([({"id": "k", "total": 50}, _at("orders", 0, 5, 1000))])
    assert guarded.stored()["k"][0] == {"id": "k", "total": 50}
    guarded.write([({"id": "k", "total": 6}, _at("orders", 0, 6, 10))])
    assert guarded.stored()["k"] == ({"id": "k", "total": 6}, StoredPosition("orders", 0, 6, 10))


def test_across_partitions_the_later_timestamp_wins_then_topic_partition_offset(
    guarded: Guarded,
) -> None:
    guarded.write([({"id": "k", "total": 1}, _at("orders", 0, 100, 2000))])
    guarded.write([({"id": "k", "total": 2}, _at("orders", 1, 1, 1000))])
    assert guarded.stored()["k"][0]["total"] == 1, "an older timestamp from another partition"
    guarded.write([({"id": "k", "total": 3}, _at("orders", 1, 2, 3000))])
    assert guarded.stored()["k"][0]["total"] == 3
    # Equal timestamps: partition, then offset, break the tie.
    guarded.write([({"id": "k", "total": 4}, _at("orders", 0, 999, 3000))])
    assert guarded.stored()["k"][0]["total"] == 3, "partition 0 < partition 1 at the same time"
    guarded.write([({"id": "k", "total": 5}, _at("orders", 2, 0, 3000))])
    assert guarded.stored()["k"][0]["total"] == 5
    # No timestamp counts as the oldest time.
    guarded.write([({"id": "k", "total": 6}, _at("orders", 3, 0, None))])
    assert guarded.stored()["k"] == ({"id": "k", "total": 5}, StoredPosition("orders", 2, 0, 3000))


def test_topics_tie_break_by_code_point_whatever_the_database_collation(guarded: Guarded) -> None:
    # By code point "Z" < "a" < "é"; a linguistic collation orders them a, é, Z.
    guarded.write([({"id": "k", "total": 1}, _at("a", 0, 0, 500))])
    guarded.write([({"id": "k", "total": 2}, _at("Z", 0, 0, 500))])
    assert guarded.stored()["k"][0]["total"] == 1
    guarded.write([({"id": "k", "total": 3}, _at("é", 0, 0, 500))])
    assert guarded.stored()["k"][0]["total"] == 3


def test_a_deliberate_overwrite_replaces_a_newer_row(guarded: Guarded) -> None:
    guarded.write([({"id": "k", "total": 9}, _at("orders", 0, 9, 900))])
    guarded.write([({"id": "k", "total": 1}, _at("orders", 0, 1, 100))], overwrite_newer=True)
    assert guarded.stored()["k"] == ({"id": "k", "total": 1}, StoredPosition("orders", 0, 1, 100))


def test_a_table_of_key_columns_only_keeps_the_newest_position(guarded: Guarded) -> None:
    guarded.write([({"id": "k"}, _at("orders", 0, 7, 0))], table=KEYS_ONLY)
    guarded.write([({"id": "k"}, _at("orders", 0, 2, 0))], table=KEYS_ONLY)
    assert guarded.stored(KEYS_ONLY)["k"][1] == StoredPosition("orders", 0, 7, 0)
    guarded.write([({"id": "k"}, _at("orders", 0, 8, 0))], table=KEYS_ONLY)
    assert guarded.stored(KEYS_ONLY)["k"][1] == StoredPosition("orders", 0, 8, 0)


def test_an_existing_table_gets_the_position_columns_and_its_rows_count_as_oldest(
    sink: SinkUnderTest,
) -> None:
    sink.query_write("CREATE TABLE totals (id TEXT PRIMARY KEY, total BIGINT)")
    sink.query_write("INSERT INTO totals VALUES ('legacy', 41), ('untouched', 7)")
    opened = Guarded(sink.url)
    try:
        assert opened.stored() == {
            "legacy": ({"id": "legacy", "total": 41}, None),
            "untouched": ({"id": "untouched", "total": 7}, None),
        }
        opened.write([({"id": "legacy", "total": 42}, _at("orders", 0, 0, None))])
        assert opened.stored()["legacy"] == (
            {"id": "legacy", "total": 42},
            StoredPosition("orders", 0, 0, -1),
        )
    finally:
        opened.close()
    # Opening again changes nothing (the columns exist now).
    reopened = Guarded(sink.url)
    try:
        assert reopened.stored()["untouched"] == ({"id": "untouched", "total": 7}, None)
    finally:
        reopened.close()


def test_a_row_added_by_hand_has_no_position_and_is_replaced(
    sink: SinkUnderTest, guarded: Guarded
) -> None:
    sink.query_write("INSERT INTO totals (id, total) VALUES ('hand', 1)")
    assert guarded.stored()["hand"][1] is None
    guarded.write([({"id": "hand", "total": 2}, _at("orders", 0, 0, 0))])
    assert guarded.stored()["hand"][0]["total"] == 2
