"""The checkpoint tools' keyed state (consumer.cli.state_tools) on a real SQLite sink: sizes,
export and import of entries, and the eager upgrade of `checkpoint migrate --app`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumer import (
    Checkpoint,
    CheckpointFormatError,
    ConfigError,
    StateChange,
    StateSchema,
    TopicPartition,
)
from consumer.cli.checkpoint_tools import export_document, parse_export, store_checkpoints
from consumer.cli.state_tools import (
    blob_cleared,
    export_entries,
    parse_entries,
    plan_state_upgrade,
    replacing_changes,
    state_sizes,
)
from sinks import SqliteSink

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def _checkpoint(tp: TopicPartition, offset: int, blob: bytes | None = None) -> Checkpoint:
    return Checkpoint(
        "g",
        tp.topic,
        tp.partition,
        offset,
        datetime.now(tz=UTC),
        state=blob,
        state_version=None if blob is None else 1,
    )


@pytest.fixture
def sink(tmp_path: Path) -> SqliteSink:
    sink = SqliteSink(tmp_path / "s.db")
    sink.open(())
    store_checkpoints(
        sink,
        "g",
        [_checkpoint(P0, 5), _checkpoint(P1, 7)],
        [
            StateChange(P0, "a", b'{"n":1}', 1),
            StateChange(P0, "\ud800 lone\x00nul", b'"odd key"', 1),
            StateChange(P1, "b", b"[1,2]", 1),
        ],
    )
    return sink


def test_sizes_and_an_export_import_round_trip_replacing_the_state(
    sink: SqliteSink, tmp_path: Path
) -> None:
    assert state_sizes(sink, "g") == {P0: (2, 16), P1: (1, 5)}
    document = export_document(
        list(sink.load_checkpoints("g").values()),
        source="test",
        state_entries=export_entries(sink, "g", [P0, P1]),
    )
    text = json.dumps(document)  # what the file holds
    entries = parse_entries(json.loads(text), path="x", group="g")
    assert {tp: sorted(e.key for e in es) for tp, es in entries.items()} == {
        P0: ["a", "\ud800 lone\x00nul"],
        P1: ["b"],
    }

    other = SqliteSink(tmp_path / "other.db")
    other.open(())
    store_checkpoints(other, "g", [_checkpoint(P0, 1)], [StateChange(P0, "stale", b"0", 1)])
    checkpoints = parse_export(json.loads(text), path="x")
    changes = replacing_changes(other, "g", entries, [cp.topic_partition for cp in checkpoints])
    store_checkpoints(other, "g", checkpoints, changes)

    assert {e.key: e.value for e in other.scan_state("g", P0)} == {
        "a": b'{"n":1}',
        "\ud800 lone\x00nul": b'"odd key"',
    }
    assert [e.value for e in other.scan_state("g", P1)] == [b"[1,2]"]
    assert {tp: cp.next_offset for tp, cp in other.load_checkpoints("g").items()} == {P0: 5, P1: 7}


@pytest.mark.parametrize(
    "entry",
    [
        {"topic": "t", "partition": 0, "key": 3, "value": "1", "version": 1},
        {"topic": "t", "partition": 0, "key": "k", "value": "{bad", "version": 1},
        {"topic": "t", "partition": 0, "key": "k", "value": "1", "version": 0},
        {"topic": "t", "partition": -1, "key": "k", "value": "1", "version": 1},
        "not an object",
    ],
)
def test_a_bad_state_entry_in_an_export_is_refused_naming_it(entry: object) -> None:
    with pytest.raises(ConfigError, match="state entry") as raised:
        parse_entries({"state_entries": [entry]}, path="f.json", group="g")
    assert raised.value.context["index"] == 0


def test_an_entry_of_another_group_in_a_backup_is_left_out() -> None:
    entry = {"group": "other", "topic": "t", "partition": 0, "key": "k", "value": "1", "version": 1}
    assert parse_entries({"state_entries": [entry]}, path="f", group="g") == {}


def test_migrate_plans_a_blob_split_and_entry_upgrades(sink: SqliteSink) -> None:
    schema = StateSchema(version=2, upgraders={1: lambda value: {"v1": value}})
    from_entries = plan_state_upgrade(sink, "g", _checkpoint(P1, 7), schema)
    assert (from_entries.blob_entries, from_entries.upgraded) == (0, 1)
    assert from_entries.changes == (StateChange(P1, "b", b'{"v1":[1,2]}', 2),)

    blob = _checkpoint(P0, 5, blob=b'{"x": 1, "y": {"deep": true}}')
    from_blob = plan_state_upgrade(sink, "g", blob, schema)
    assert (from_blob.blob_entries, from_blob.upgraded) == (2, 2)
    assert {c.key: c.value for c in from_blob.changes} == {
        "x": b'{"v1":1}',
        "y": b'{"v1":{"deep":true}}',
    }
    assert blob_cleared(blob).state is None


def test_migrate_refuses_an_entry_newer_than_the_app(sink: SqliteSink) -> None:
    store_checkpoints(sink, "g", [_checkpoint(P1, 7)], [StateChange(P1, "b", b"1", 5)])
    with pytest.raises(CheckpointFormatError):
        plan_state_upgrade(
            sink, "g", _checkpoint(P1, 7), StateSchema(version=2, upgraders={1: str})
        )


def test_a_scan_pages_through_every_entry_the_empty_key_included(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "many.db")
    sink.open(())
    keys = ["", *(f"k{i:05}" for i in range(4_500))]
    store_checkpoints(
        sink, "g", [_checkpoint(P0, 1)], [StateChange(P0, key, b"1", 1) for key in keys]
    )
    assert [entry.key for entry in sink.scan_state("g", P0)] == keys
    assert sink.state_sizes("g", [P0, P1]) == {P0: (len(keys), len(keys))}
