"""The PostgreSQL sink against a real server, called directly (as the engine calls it): what
the database refuses is a RowsRefusedError naming table and column, a failed transaction never
leaves the session unusable (its staging table is made again), long table names get staging
tables of their own, and every value the engine's row check admits is stored exactly."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg.rows import dict_row

from consumer import Checkpoint, RowsRefusedError, SinkError, Table, TopicPartition
from sinks._postgres import PostgresSink
from sinks._postgres_staging import staging_name
from tests.fixtures.pg import create_database, query
from tests.fixtures.services import Service
from tests.fixtures.values import ALL_TYPES, GeneratedRow, ThroughSink, rows

pytestmark = pytest.mark.integration

GROUP = "g"
TP = TopicPartition("orders", 0)
ORDERS = Table(
    name="orders",
    columns={"id": "text", "amount": "bigint", "note": "text", "attrs": "json"},
    key=("id",),
)


@pytest.fixture
def dsn(postgres: Service) -> str:
    return create_database(postgres.address)


class Batches:
    """Batches written the way the engine writes them, one partition, offsets counted."""

    def __init__(self, sink: PostgresSink, *tables: Table) -> None:
        self.sink = sink
        sink.open(tables)
        self.epochs = sink.acquire(GROUP, [TP])
        self.next_offset = 0

    def commit(self, *writes: tuple[Table, list[dict[str, Any]]]) -> None:
        """begin, write_rows per table, save_checkpoints, commit; rollback on any failure."""
        self.sink.begin()
        try:
            for table, table_rows in writes:
                self.sink.write_rows(table, table_rows)
            checkpoint = Checkpoint(
                GROUP, TP.topic, TP.partition, self.next_offset + 1, datetime.now(tz=UTC)
            )
            self.sink.save_checkpoints(GROUP, [checkpoint], self.epochs)
            self.sink.commit()
        except BaseException:
            self.sink.rollback()
            raise
        self.next_offset += 1


@pytest.fixture
def batches(dsn: str) -> Iterator[Batches]:
    sink = PostgresSink(dsn)
    yield Batches(sink, ORDERS)
    sink.close()


def _order(order_id: str, **values: Any) -> dict[str, Any]:
    return {"id": order_id, "amount": 1, "note": "n", "attrs": {"k": 1}, **values}


def _orders(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, "SELECT id, amount, note, attrs FROM orders ORDER BY id")


@pytest.mark.parametrize(
    ("values", "field", "sqlstate"),
    [
        # Values the engine's row check refuses first, written here past it.
        ({"note": "nul \x00 inside"}, "note", None),  # psycopg: text cannot hold NUL
        ({"attrs": {"k": "nul \x00"}}, "attrs", "22P05"),  # jsonb: \u0000
        ({"amount": 10**30}, "amount", "22003"),  # out of range for bigint
        ({"amount": "twelve"}, "amount", "22P02"),  # text where bigint is declared: COPY names it
        # ("12" would be stored as 12: the engine's check refuses any str in a bigint column.)
        ({"note": "lone \ud800"}, "note", None),  # UnicodeEncodeError while dumping
    ],
)
def test_a_value_the_database_cannot_store_is_a_refusal_and_the_next_batch_commits(
    batches: Batches, dsn: str, values: dict[str, Any], field: str, sqlstate: str | None
) -> None:
    """The first batch of the session fails, after it made the staging table: the rollback
    undoes that CREATE, and the next batch must make it again (it used to fail with "relation
    offsetkeeper_stage_orders does not exist" forever)."""
    with pytest.raises(RowsRefusedError, match="cannot write rows") as caught:
        batches.commit((ORDERS, [_order("good"), _order("bad", **values)]))
    assert caught.value.context["table"] == "orders"
    assert caught.value.context["field"] == field
    if sqlstate is not None:
        assert caught.value.context["sqlstate"] == sqlstate
    assert _orders(dsn) == []
    assert batches.sink.load_checkpoints(GROUP) == {}

    batches.commit((ORDERS, [_order("good")]))
    batches.commit((ORDERS, [_order("again", amount=2)]))
    assert _orders(dsn) == [("again", 2, "n", {"k": 1}), ("good", 1, "n", {"k": 1})]
    assert batches.sink.load_checkpoints(GROUP)[TP].next_offset == 2


def test_a_violated_check_constraint_is_a_refusal_naming_its_column(
    batches: Batches, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "ALTER TABLE orders ADD CONSTRAINT amount_not_negative CHECK (amount >= 0)"
        )
        connection.execute(
            "ALTER TABLE orders ADD CONSTRAINT two_columns CHECK (amount < 100 OR note IS NULL)"
        )
    with pytest.raises(RowsRefusedError, match="amount_not_negative") as caught:
        batches.commit((ORDERS, [_order("a"), _order("negative", amount=-5)]))
    context = caught.value.context
    assert (context["table"], context["field"]) == ("orders", "amount")
    assert (context["constraint"], context["sqlstate"]) == ("amount_not_negative", "23514")
    with pytest.raises(RowsRefusedError, match="two_columns") as caught:
        batches.commit((ORDERS, [_order("big", amount=500)]))
    assert "field" not in caught.value.context, "a constraint of two columns names neither"
    batches.commit((ORDERS, [_order("a")]))
    assert _orders(dsn) == [("a", 1, "n", {"k": 1})]


def test_a_deferred_constraint_refused_at_commit_is_a_refusal(batches: Batches, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE notes (note TEXT PRIMARY KEY)")
        connection.execute(
            "ALTER TABLE orders ADD CONSTRAINT known_note FOREIGN KEY (note)"
            " REFERENCES notes (note) DEFERRABLE INITIALLY DEFERRED"
        )
        connection.execute("INSERT INTO notes VALUES ('n')")
    with pytest.raises(RowsRefusedError, match="commit failed") as caught:
        batches.commit((ORDERS, [_order("a", note="unknown")]))
    assert caught.value.context["sqlstate"] == "23503"
    assert caught.value.context["table"] == "orders"
    batches.commit((ORDERS, [_order("a")]))
    assert _orders(dsn) == [("a", 1, "n", {"k": 1})]


def test_a_lost_session_is_a_transient_sink_error_and_the_next_batch_commits(
    batches: Batches, dsn: str
) -> None:
    batches.commit((ORDERS, [_order("first")]))  # the session has its staging table now
    connection = batches.sink._connection
    assert connection is not None
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
    with pytest.raises(SinkError) as caught:
        batches.commit((ORDERS, [_order("lost")]))
    assert not isinstance(caught.value, RowsRefusedError), "retried, not isolated"
    batches.commit((ORDERS, [_order("second")]))  # a new session makes its staging table
    assert [row[0] for row in _orders(dsn)] == ["first", "second"]


def test_two_long_table_names_alike_in_their_first_44_characters_get_their_own_staging(
    dsn: str,
) -> None:
    common = "orders_of_the_northern_region_in_the_year_2025_"
    first = Table(
        name=f"{common}first_quarter"[:60], columns={"id": "text", "a": "bigint"}, key=("id",)
    )
    second = Table(
        name=f"{common}second_quarter"[:60],
        columns={"id": "text", "b": "text", "c": "double"},
        key=("id",),
    )
    assert len(first.name) == len(second.name) == 60
    assert first.name[:44] == second.name[:44]
    names = {staging_name(first.name), staging_name(second.name)}
    assert len(names) == 2
    assert all(len(name) <= 63 for name in names)
    sink = PostgresSink(dsn)
    try:
        batches = Batches(sink, first, second)
        batches.commit((first, [{"id": "x", "a": 1}]), (second, [{"id": "y", "b": "t", "c": 0.5}]))
        batches.commit((second, [{"id": "z", "b": "u", "c": 1.5}]), (first, [{"id": "w", "a": 2}]))
    finally:
        sink.close()
    assert query(dsn, f'SELECT id, a FROM "{first.name}" ORDER BY id') == [("w", 2), ("x", 1)]
    assert query(dsn, f'SELECT id, b, c FROM "{second.name}" ORDER BY id') == [
        ("y", "t", 0.5),
        ("z", "u", 1.5),
    ]


def test_admitted_values_are_stored_exactly_and_refused_ones_name_their_column(dsn: str) -> None:
    sink = PostgresSink(dsn)
    batches = Batches(sink, ALL_TYPES)
    reader = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def write(row: dict[str, Any]) -> None:
        batches.commit((ALL_TYPES, [row]))

    def read(n: int) -> dict[str, Any]:
        stored = reader.execute("SELECT * FROM all_types WHERE n = %s", (n,)).fetchone()
        assert stored is not None
        return dict(stored)

    through = ThroughSink(sink.value_limits, write, read)

    @settings(
        max_examples=300,
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
