"""sinks._sqlite: transactions, idempotent upserts, fencing epochs, checkpoints, migrations."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    CheckpointFormatError,
    ConfigError,
    FencedError,
    RowsRefusedError,
    SinkError,
    Table,
    TopicPartition,
)
from sinks import SqliteSink
from tests.fixtures.sqlite_db import checkpoints, epochs, query, table_rows

GROUP = "g"
TP0 = TopicPartition("orders", 0)
TP1 = TopicPartition("orders", 1)
TP2 = TopicPartition("orders", 2)
WHEN = datetime(2024, 6, 1, 8, 30, 0, 250000, tzinfo=UTC)

PROFILES = Table(
    name="profiles",
    columns={
        "id": "text",
        "name": "text",
        "visits": "bigint",
        "score": "double",
        "active": "boolean",
        "avatar": "bytes",
        "attrs": "json",
    },
    key=("id",),
)


def _checkpoint(tp: TopicPartition, next_offset: int, group: str = GROUP) -> Checkpoint:
    return Checkpoint(
        group=group,
        topic=tp.topic,
        partition=tp.partition,
        next_offset=next_offset,
        updated_at=WHEN,
    )


def _profile(pid: str, **values: Any) -> dict[str, Any]:
    return {"id": pid, "name": f"name-{pid}", "visits": 1, **values}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sink.db"


@pytest.fixture
def sink(db: Path) -> Iterator[SqliteSink]:
    opened = SqliteSink(db)
    opened.open([PROFILES])
    yield opened
    opened.close()


def _profiles(db: Path) -> list[dict[str, Any]]:
    """Committed profiles without the json column (its storage is tested on its own)."""
    rows = table_rows(db, "profiles", order_by="id")
    return [{k: v for k, v in row.items() if k != "attrs"} for row in rows]


def _stored(pid: str, **values: Any) -> dict[str, Any]:
    """A profile as SQLite gives it back (scalar columns never written are NULL)."""
    row: dict[str, Any] = {column: None for column in PROFILES.columns if column != "attrs"}
    row.update(_profile(pid, **values))
    return row


# -- open -----------------------------------------------------------------------------------------


def test_open_creates_the_declared_and_own_tables_in_wal_mode(sink: SqliteSink, db: Path) -> None:
    tables = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        "profiles",
        "offsetkeeper_checkpoints",
        "offsetkeeper_leases",
        "offsetkeeper_replay_jobs",
        "offsetkeeper_state",
    }
    columns = [(name, kind) for _cid, name, kind, *_ in query(db, "PRAGMA table_info(profiles)")]
    assert columns == [
        ("id", "TEXT"),
        ("name", "TEXT"),
        ("visits", "INTEGER"),
        ("score", "REAL"),
        ("active", "INTEGER"),
        ("avatar", "BLOB"),
        ("attrs", "TEXT"),
        # The source position of each row (an upsert table).
        ("offsetkeeper_topic", "TEXT"),
        ("offsetkeeper_partition", "INTEGER"),
        ("offsetkeeper_offset", "INTEGER"),
        ("offsetkeeper_timestamp", "INTEGER"),
    ]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert sink.description == f"sqlite:///{db}"


def test_open_twice_on_the_same_file_keeps_the_data(db: Path) -> None:
    first = SqliteSink(db)
    first.open([PROFILES])
    first.begin()
    first.write_rows(PROFILES, [_profile("a")])
    first.commit()
    first.close()

    second = SqliteSink(db)
    second.open([PROFILES])
    second.close()

    assert _profiles(db) == [_stored("a")]


def test_open_creates_missing_parent_directories(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "sink.db"
    sink = SqliteSink(nested)
    sink.open([PROFILES])
    sink.close()
    assert nested.is_file()


def test_a_sink_that_is_not_open_refuses_work(db: Path) -> None:
    sink = SqliteSink(db)
    with pytest.raises(SinkError, match="not open"):
        sink.begin()
    sink.open([PROFILES])
    sink.close()
    with pytest.raises(SinkError, match="not open"):
        sink.load_checkpoints(GROUP)
    sink.close()  # closing twice is harmless


# -- transactions: commit and rollback -----------------------------------------------------------


def test_commit_makes_rows_and_checkpoints_visible_together(sink: SqliteSink, db: Path) -> None:
    epoch = sink.acquire(GROUP, [TP0])[TP0]
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a"), _profile("b", visits=7)])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 12)], {TP0: epoch})

    # Another reader sees nothing of an uncommitted batch ...
    assert _profiles(db) == []
    assert checkpoints(db, GROUP) == {}

    sink.commit()

    # ... and all of it after COMMIT.
    assert _profiles(db) == [_stored("a"), _stored("b", visits=7)]
    assert checkpoints(db, GROUP) == {("orders", 0): 12}
    assert query(db, "SELECT format_version, updated_at_ms FROM offsetkeeper_checkpoints") == [
        (CURRENT_FORMAT_VERSION, int(WHEN.timestamp() * 1000))
    ]


def test_rollback_leaves_neither_rows_nor_checkpoints(sink: SqliteSink, db: Path) -> None:
    epoch = sink.acquire(GROUP, [TP0])[TP0]
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a")])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 5)], {TP0: epoch})
    sink.commit()

    sink.begin()
    sink.write_rows(PROFILES, [_profile("a", visits=99), _profile("new")])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 9)], {TP0: epoch})
    sink.rollback()

    assert _profiles(db) == [_stored("a")]
    assert checkpoints(db, GROUP) == {("orders", 0): 5}
    assert sink.load_checkpoints(GROUP)[TP0].next_offset == 5


def test_rollback_without_a_transaction_is_harmless(sink: SqliteSink, db: Path) -> None:
    sink.rollback()
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a")])
    sink.commit()
    assert _profiles(db) == [_stored("a")]


# -- idempotent upserts ---------------------------------------------------------------------


def test_upsert_by_key_last_write_wins(sink: SqliteSink, db: Path) -> None:
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a", visits=1), _profile("b", visits=1)])
    sink.commit()
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a", visits=2, name="renamed")])
    sink.commit()

    assert _profiles(db) == [_stored("a", visits=2, name="renamed"), _stored("b", visits=1)]


def test_rewriting_the_same_batch_is_idempotent(sink: SqliteSink, db: Path) -> None:
    batch = [_profile("a", visits=3), _profile("b", score=1.5), _profile("c", active=True)]
    epoch = sink.acquire(GROUP, [TP0])[TP0]
    for _ in range(2):
        sink.begin()
        sink.write_rows(PROFILES, batch)
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, 3)], {TP0: epoch})
        sink.commit()

    assert _profiles(db) == [
        _stored("a", visits=3),
        _stored("b", score=1.5),
        _stored("c", active=1),
    ]
    assert checkpoints(db, GROUP) == {("orders", 0): 3}


def test_a_table_of_key_columns_only_ignores_rewrites(db: Path) -> None:
    seen = Table("seen", columns={"topic": "text", "id": "bigint"}, key=("topic", "id"))
    sink = SqliteSink(db)
    sink.open([seen])
    rows = [{"topic": "t", "id": 1}, {"topic": "t", "id": 2}, {"topic": "u", "id": 1}]
    for _ in range(2):
        sink.begin()
        sink.write_rows(seen, rows)
        sink.commit()
    sink.close()

    assert table_rows(db, "seen", order_by="topic, id") == rows


def test_writing_no_rows_is_a_no_op(sink: SqliteSink, db: Path) -> None:
    sink.begin()
    sink.write_rows(PROFILES, [])
    sink.commit()
    assert _profiles(db) == []


@pytest.mark.parametrize(
    ("column", "value", "cause"),
    [
        ("name", {"not": "text"}, sqlite3.ProgrammingError),  # a type sqlite3 cannot bind
        ("visits", 10**30, OverflowError),  # "Python int too large to convert to SQLite INTEGER"
        ("visits", -(2**63) - 1, OverflowError),
        ("name", "lone \ud800", UnicodeEncodeError),
        ("attrs", {"x": math.nan}, ValueError),  # stored JSON is strict: never the text NaN
        ("attrs", {"when": WHEN}, TypeError),
        ("attrs", {1, 2}, TypeError),
    ],
)
def test_a_value_sqlite_cannot_bind_is_a_refusal_naming_table_and_column(
    sink: SqliteSink, db: Path, column: str, value: Any, cause: type[BaseException]
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    sink.begin()
    with pytest.raises(RowsRefusedError, match="cannot write rows") as caught:
        sink.write_rows(PROFILES, [_profile("good"), _profile("a", **{column: value})])
    sink.rollback()
    assert caught.value.context["table"] == "profiles"
    assert caught.value.context["field"] == column
    assert isinstance(caught.value.__cause__, cause)
    # The next batch commits: nothing of the refused one stayed behind.
    sink.begin()
    sink.write_rows(PROFILES, [_profile("b")])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)
    sink.commit()
    assert _profiles(db) == [_stored("b")]


def _with_constraints(db: Path) -> None:
    """The profiles table made by its owner before offsetkeeper opens it (CREATE TABLE IF NOT
    EXISTS keeps it), with constraints of its own."""
    with sqlite3.connect(db) as connection:
        connection.execute(
            "CREATE TABLE profiles (id TEXT, name TEXT NOT NULL,"
            " visits INTEGER CHECK (visits >= 0), score REAL, active INTEGER, avatar BLOB,"
            " attrs TEXT,"
            " CONSTRAINT short_name CHECK (length(name) < 10),"
            " PRIMARY KEY (id))"
        )
    connection.close()


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"visits": -1}, "visits", "CHECK constraint failed: visits >= 0"),
        ({"name": None}, "name", "NOT NULL constraint failed: profiles.name"),
        ({"name": "a name too long"}, None, "CHECK constraint failed: short_name"),
    ],
)
def test_a_violated_constraint_is_a_refusal(
    db: Path, values: dict[str, Any], field: str | None, message: str
) -> None:
    _with_constraints(db)
    sink = SqliteSink(db)
    sink.open([PROFILES])
    sink.begin()
    with pytest.raises(RowsRefusedError, match=message) as caught:
        sink.write_rows(PROFILES, [_profile("a", **values)])
    sink.rollback()
    assert caught.value.context.get("field") == field
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a")])
    sink.commit()
    sink.close()
    assert _profiles(db) == [_stored("a")]


def test_a_locked_database_is_a_transient_sink_error_not_a_refusal(db: Path) -> None:
    sink = SqliteSink(db, busy_timeout_s=0.05)
    sink.open([PROFILES])
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SinkError) as caught:
            sink.begin()
        assert not isinstance(caught.value, RowsRefusedError)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        sink.close()


def test_a_deferred_constraint_refused_at_commit_is_a_refusal(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE names (name TEXT PRIMARY KEY)")
        connection.execute(
            "CREATE TABLE profiles (id TEXT PRIMARY KEY, name TEXT"
            " REFERENCES names (name) DEFERRABLE INITIALLY DEFERRED,"
            " visits INTEGER, score REAL, active INTEGER, avatar BLOB, attrs TEXT)"
        )
    connection.close()
    sink = SqliteSink(db)
    sink.open([PROFILES])
    sink._db.execute("PRAGMA foreign_keys = ON")
    sink.begin()
    sink.write_rows(PROFILES, [_profile("a")])
    with pytest.raises(RowsRefusedError, match="FOREIGN KEY constraint failed"):
        sink.commit()
    sink.rollback()
    sink.close()
    assert _profiles(db) == []


def test_the_sink_declares_nan_unstorable_and_an_int_in_a_double_column_is_a_double(
    sink: SqliteSink, db: Path
) -> None:
    assert sink.value_limits.nan is False
    assert sink.value_limits.infinity is True
    assert sink.value_limits.nul_in_text is True
    sink.begin()
    sink.write_rows(
        PROFILES,
        [
            _profile("big", score=10**30),  # sqlite3 would bind it as an INTEGER and fail
            _profile("inf", score=-math.inf, name="nul \x00 inside"),
        ],
    )
    sink.commit()
    assert query(db, "SELECT id, name, score, typeof(score) FROM profiles ORDER BY id") == [
        ("big", "name-big", 1e30, "real"),
        ("inf", "nul \x00 inside", -math.inf, "real"),
    ]


# -- column types ------------------------------------------------------------------------------


def test_json_columns_round_trip(sink: SqliteSink, db: Path) -> None:
    attrs = {
        "tags": ["a", "b"],
        "nested": {"n": 1, "x": 2.5, "ok": True, "none": None},
        "text": "zürich ✓",
    }
    sink.begin()
    sink.write_rows(
        PROFILES,
        [_profile("a", attrs=attrs), _profile("b", attrs=[1, 2, 3]), _profile("c", attrs="s")],
    )
    sink.commit()

    stored = {pid: json.loads(text) for pid, text in query(db, "SELECT id, attrs FROM profiles")}
    assert stored == {"a": attrs, "b": [1, 2, 3], "c": "s"}


def test_scalar_column_types_are_stored_as_sqlite_values(sink: SqliteSink, db: Path) -> None:
    sink.begin()
    sink.write_rows(
        PROFILES,
        [_profile("a", visits=2**62, score=0.25, active=False, avatar=b"\x00\xffpng")],
    )
    sink.commit()

    assert query(db, "SELECT visits, score, active, avatar FROM profiles") == [
        (2**62, 0.25, 0, b"\x00\xffpng")
    ]


# -- fencing epochs --------------------------------------------------------------------------------


def test_acquire_increments_the_epoch_per_partition(sink: SqliteSink, db: Path) -> None:
    assert sink.acquire(GROUP, [TP0, TP1]) == {TP0: 1, TP1: 1}
    assert sink.acquire(GROUP, [TP0]) == {TP0: 2}
    assert sink.acquire(GROUP, [TP0, TP2]) == {TP0: 3, TP2: 1}
    assert sink.acquire("other-group", [TP0]) == {TP0: 1}

    assert epochs(db, GROUP) == {("orders", 0): 3, ("orders", 1): 1, ("orders", 2): 1}
    assert epochs(db, "other-group") == {("orders", 0): 1}


def test_acquire_is_committed_at_once(sink: SqliteSink, db: Path) -> None:
    sink.acquire(GROUP, [TP0])
    assert epochs(db, GROUP) == {("orders", 0): 1}


def test_a_stale_epoch_is_fenced_and_nothing_of_the_batch_is_visible(
    sink: SqliteSink, db: Path
) -> None:
    mine = sink.acquire(GROUP, [TP0, TP1, TP2])
    sink.begin()
    sink.write_rows(PROFILES, [_profile("before")])
    sink.save_checkpoints(
        GROUP, [_checkpoint(TP0, 1), _checkpoint(TP1, 1), _checkpoint(TP2, 1)], mine
    )
    sink.commit()

    # A newer owner takes partitions 1 and 2 (another process, its own connection).
    newer = SqliteSink(db)
    newer.open([PROFILES])
    assert newer.acquire(GROUP, [TP1, TP2]) == {TP1: 2, TP2: 2}
    newer.close()

    sink.begin()
    sink.write_rows(PROFILES, [_profile("zombie"), _profile("before", visits=50)])
    with pytest.raises(FencedError) as caught:
        sink.save_checkpoints(
            GROUP, [_checkpoint(TP0, 10), _checkpoint(TP1, 10), _checkpoint(TP2, 10)], mine
        )
    sink.rollback()

    assert caught.value.partitions == frozenset({("orders", 1), ("orders", 2)})
    assert caught.value.context["group"] == GROUP
    assert "('orders', 1)" in str(caught.value)
    assert "('orders', 2)" in str(caught.value)
    assert "('orders', 0)" not in str(caught.value)
    assert isinstance(caught.value, SinkError)
    # Neither the rows nor the still-valid partition's checkpoint of that batch survived.
    assert _profiles(db) == [_stored("before")]
    assert checkpoints(db, GROUP) == {("orders", 0): 1, ("orders", 1): 1, ("orders", 2): 1}


def test_a_partition_never_acquired_is_fenced(sink: SqliteSink, db: Path) -> None:
    sink.begin()
    with pytest.raises(FencedError) as caught:
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], {TP0: 1})
    sink.rollback()
    assert caught.value.partitions == frozenset({("orders", 0)})
    assert checkpoints(db, GROUP) == {}


def test_epochs_are_per_group(sink: SqliteSink, db: Path) -> None:
    mine = sink.acquire(GROUP, [TP0])
    sink.acquire("other-group", [TP0])  # another group's owner is no rival

    sink.begin()
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 4)], mine)
    sink.commit()

    assert checkpoints(db, GROUP) == {("orders", 0): 4}


# -- loading checkpoints ---------------------------------------------------------------------------


def test_reopening_the_sink_finds_the_checkpoints(db: Path) -> None:
    first = SqliteSink(db)
    first.open([PROFILES])
    epochs_taken = first.acquire(GROUP, [TP0, TP1])
    first.begin()
    first.save_checkpoints(GROUP, [_checkpoint(TP0, 100), _checkpoint(TP1, 7)], epochs_taken)
    first.commit()
    first.close()

    reopened = SqliteSink(db)
    reopened.open([PROFILES])
    try:
        assert reopened.load_checkpoints(GROUP) == {
            TP0: _checkpoint(TP0, 100),
            TP1: _checkpoint(TP1, 7),
        }
        assert reopened.load_checkpoints(GROUP, [TP1, TP2]) == {TP1: _checkpoint(TP1, 7)}
        assert reopened.load_checkpoints(GROUP, []) == {}
        assert reopened.load_checkpoints("other-group") == {}
    finally:
        reopened.close()


def test_a_checkpoint_of_a_newer_format_is_refused_on_load(sink: SqliteSink, db: Path) -> None:
    connection = sqlite3.connect(db)
    connection.execute(
        "INSERT INTO offsetkeeper_checkpoints (group_id, topic, partition, next_offset,"
        " format_version, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
        (GROUP, "orders", 0, 10, CURRENT_FORMAT_VERSION + 1, 0),
    )
    connection.commit()
    connection.close()

    with pytest.raises(CheckpointFormatError) as caught:
        sink.load_checkpoints(GROUP)
    assert f"v{CURRENT_FORMAT_VERSION + 1}" in str(caught.value)
    assert f"v{CURRENT_FORMAT_VERSION}" in str(caught.value)


def test_an_app_table_named_like_the_checkpoint_table_is_refused(db: Path) -> None:
    sink = SqliteSink(db, checkpoint_table="profiles")
    with pytest.raises(ConfigError, match="own table"):
        sink.open([PROFILES])
    assert not db.exists(), "refused before anything is created"


def test_custom_checkpoint_and_lease_tables(db: Path) -> None:
    sink = SqliteSink(db, checkpoint_table="my_checkpoints", lease_table="my_leases")
    sink.open([PROFILES])
    taken = sink.acquire(GROUP, [TP0])
    sink.begin()
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 3)], taken)
    sink.commit()
    sink.close()

    assert taken == {TP0: 1}
    assert query(db, "SELECT group_id, topic, partition, next_offset FROM my_checkpoints") == [
        (GROUP, "orders", 0, 3)
    ]
    assert query(db, "SELECT group_id, topic, partition, epoch FROM my_leases") == [
        (GROUP, "orders", 0, 1)
    ]
    tables = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        "profiles",
        "my_checkpoints",
        "my_leases",
        "offsetkeeper_replay_jobs",
        "offsetkeeper_state",
    }


# -- migrations -----------------------------------------------------------------------------------


def test_new_columns_of_a_declared_table_are_added_on_open(db: Path) -> None:
    v1 = Table("people", columns={"id": "text", "name": "text"}, key=("id",))
    v2 = Table(
        "people",
        columns={"id": "text", "name": "text", "email": "text", "tags": "json"},
        key=("id",),
    )
    old = SqliteSink(db)
    old.open([v1])
    old.begin()
    old.write_rows(v1, [{"id": "a", "name": "Ann"}])
    old.commit()
    old.close()

    new = SqliteSink(db)
    new.open([v2])
    new.begin()
    new.write_rows(v2, [{"id": "b", "name": "Bob", "email": "bob@example.org", "tags": ["x"]}])
    new.commit()
    new.close()

    columns = [(name, kind) for _cid, name, kind, *_ in query(db, "PRAGMA table_info(people)")]
    assert columns == [
        ("id", "TEXT"),
        ("name", "TEXT"),
        ("offsetkeeper_topic", "TEXT"),
        ("offsetkeeper_partition", "INTEGER"),
        ("offsetkeeper_offset", "INTEGER"),
        ("offsetkeeper_timestamp", "INTEGER"),
        ("email", "TEXT"),
        ("tags", "TEXT"),
    ]
    assert table_rows(db, "people", order_by="id") == [
        {"id": "a", "name": "Ann", "email": None, "tags": None},
        {"id": "b", "name": "Bob", "email": "bob@example.org", "tags": '["x"]'},
    ]
