"""The keyed state as a processor and the engine see it (consumer.engine.state): the mapping,
what a batch writes, the bounded cache and its reads, versions, and format-2 blobs."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer import (
    App,
    CheckpointError,
    CheckpointFormatError,
    ConfigError,
    KeyedState,
    RawRecord,
    Record,
    Row,
    StateChange,
    StateSchema,
    Table,
    TopicPartition,
)
from consumer.checkpoints.model import Checkpoint
from consumer.engine.batch import BadRecordPolicy, process_partition
from consumer.engine.loop import BatchLoop
from consumer.engine.state import (
    ENTRY_OVERHEAD_BYTES,
    BatchState,
    StateCache,
    open_partition_state,
)
from tests.fixtures.state_store import MemoryStateStore

TP = TopicPartition("events", 0)
TOTALS = Table("totals", {"key": "text", "count": "bigint"}, key=("key",))


def _decode(value: bytes | None) -> Any:
    return json.loads(value or b"null")


def _records(*keys: str, start: int = 0) -> list[RawRecord]:
    return [
        RawRecord("events", 0, start + i, 0, key.encode(), json.dumps({"key": key}).encode(), ())
        for i, key in enumerate(keys)
    ]


def _counting(*, version: int = 1, upgraders: Any = None, state_key: Any = None) -> App:
    app = App(
        "counting",
        (TOTALS,),
        state=StateSchema(version=version, upgraders=upgraders or {}),
        state_key=state_key,
    )

    @app.process
    def count(record: Record, state: KeyedState) -> Row:
        key = record.value["key"]
        entry = state.setdefault(key, {"count": 0})
        entry["count"] += 1  # in place: kept when the record succeeds
        return Row("totals", {"key": key, "count": entry["count"]})

    return app


def _changes(work: Any) -> dict[str, Any]:
    return {c.key: None if c.value is None else json.loads(c.value) for c in work.state_changes}


def test_a_batch_writes_only_the_keys_it_changed_with_in_place_changes_kept() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, "old", b'{"count":5}', 1)])
    store.write_state("g", [StateChange(TP, "untouched", b'{"count":9}', 1)])
    state = open_partition_state(store, StateCache(), "g", TP, None)

    work = process_partition(_counting(), _decode, TP, _records("old", "new", "new"), state)

    assert _changes(work) == {"old": {"count": 6}, "new": {"count": 2}}
    assert [values["count"] for _t, _k, values, _raw in work.rows] == [6, 1, 2]


def test_reading_a_key_without_changing_it_writes_nothing() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, "a", b'{"n":[1,2]}', 1)])
    app = App("reader", (TOTALS,), state=StateSchema())

    @app.process
    def read(record: Record, state: KeyedState) -> None:
        assert state["a"] == {"n": [1, 2]}
        assert "a" in state
        assert "b" not in state
        assert state.get("b", 7) == 7

    state = open_partition_state(store, StateCache(), "g", TP, None)
    assert process_partition(app, _decode, TP, _records("x"), state).state_changes == []


def test_the_mapping_deletes_pops_and_refuses_iteration_and_non_str_keys() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, k, b"1", 1) for k in ("a", "b")])
    view = BatchState(
        open_partition_state(store, StateCache(), "g", TP, None), StateSchema()
    ).record_view()

    del view["a"]
    assert view.pop("b") == 1
    assert view.pop("b", "gone") == "gone"
    with pytest.raises(KeyError):
        del view["missing"]
    with pytest.raises(KeyError):
        view["a"]
    with pytest.raises(TypeError, match="iterated"):
        list(view)
    with pytest.raises(TypeError, match="counted"):
        len(view)
    with pytest.raises(TypeError, match="str"):
        view[3] = 1  # type: ignore[index]


def test_a_failed_record_leaves_nothing_and_a_non_json_value_is_that_records_failure() -> None:
    app = App("bad", (TOTALS,), state=StateSchema())

    @app.process
    def store_odd(record: Record, state: KeyedState) -> None:
        key = record.value["key"]
        state["seen"] = state.get("seen", 0) + 1
        if key == "nan":
            state["bad"] = math.nan
        if key == "boom":
            raise ValueError("after changing the state")

    state = open_partition_state(MemoryStateStore(), StateCache(), "g", TP, None)
    work = process_partition(
        app,
        _decode,
        TP,
        _records("ok", "nan", "boom", "ok"),
        state,
        policy=BadRecordPolicy(action="dead-letter"),
        sleep=lambda _s: None,
    )

    assert _changes(work) == {"seen": 2}
    nan_letter, boom_letter = work.dead_letters
    assert nan_letter.error.field == "state['bad']"
    assert (nan_letter.error.offset, boom_letter.error.offset) == (1, 2)


def test_an_empty_partition_is_complete_and_never_read() -> None:
    store = MemoryStateStore()
    state = open_partition_state(store, StateCache(), "g", TP, None)
    process_partition(_counting(), _decode, TP, _records(*[f"k{i}" for i in range(50)]), state)
    assert state.complete
    assert store.reads == 0


def test_a_small_stored_state_is_loaded_whole_at_assignment() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, f"k{i}", b'{"count":1}', 1) for i in range(100)])
    state = open_partition_state(store, StateCache(), "g", TP, None)
    work = process_partition(_counting(), _decode, TP, _records("k1", "zz"), state)
    assert state.complete
    assert store.reads == 0
    assert _changes(work) == {"k1": {"count": 2}, "zz": {"count": 1}}


def test_evicted_entries_are_read_back_one_call_per_batch_with_state_key() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, f"k{i}", b'{"count":1}', 1) for i in range(1000)])
    cache = StateCache(max_bytes=40 * (ENTRY_OVERHEAD_BYTES + 20))  # about 40 entries
    state = open_partition_state(store, cache, "g", TP, None)
    assert not state.complete  # too big to preload

    app = _counting(state_key=lambda record: record.value["key"])
    keys = [f"k{i}" for i in range(0, 1000, 10)]  # 100 keys, more than the cache holds
    work = process_partition(app, _decode, TP, _records(*keys), state)

    assert store.reads == 1
    assert store.read_keys == 100
    assert _changes(work) == {key: {"count": 2} for key in keys}
    assert cache.bytes <= cache.max_bytes


def test_without_state_key_a_miss_is_one_read() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, f"k{i}", b'{"count":1}', 1) for i in range(1000)])
    state = open_partition_state(store, StateCache(max_bytes=10_000), "g", TP, None)
    work = process_partition(_counting(), _decode, TP, _records("k1", "k2", "k1"), state)
    assert store.reads == 2
    assert _changes(work) == {"k1": {"count": 3}, "k2": {"count": 2}}


def test_an_older_entry_is_upgraded_when_read_and_written_back_at_the_new_version() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, "a", b"4", 1), StateChange(TP, "b", b"7", 1)])
    app = _counting(version=2, upgraders={1: lambda count: {"count": count}})
    state = open_partition_state(store, StateCache(), "g", TP, None)

    work = process_partition(app, _decode, TP, _records("a"), state)

    assert work.state_changes == [StateChange(TP, "a", b'{"count":5}', 2)]  # "b" stays v1


def test_a_newer_entry_is_refused_and_not_blamed_on_the_record() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, "a", b'{"count":1}', 3)])
    state = open_partition_state(store, StateCache(), "g", TP, None)
    with pytest.raises(CheckpointFormatError, match="newer than this code knows"):
        process_partition(
            _counting(version=2, upgraders={1: dict}), _decode, TP, _records("a"), state
        )


def test_a_stored_entry_that_is_not_json_stops_with_a_clear_error() -> None:
    store = MemoryStateStore()
    store.write_state("g", [StateChange(TP, "a", b"{not json", 1)])
    state = open_partition_state(store, StateCache(), "g", TP, None)
    with pytest.raises(CheckpointError, match="not JSON"):
        process_partition(_counting(), _decode, TP, _records("a"), state)


def _v2_checkpoint(blob: bytes, version: int = 1) -> Checkpoint:
    return Checkpoint(
        "g", TP.topic, TP.partition, 10, datetime.now(tz=UTC), state=blob, state_version=version
    )


def test_a_format_2_blob_is_split_and_written_whole_by_the_first_batch() -> None:
    store = MemoryStateStore()
    checkpoint = _v2_checkpoint(b'{"a": 3, "b": 4}')
    app = _counting(version=2, upgraders={1: lambda count: {"count": count}})
    state = open_partition_state(store, StateCache(), "g", TP, checkpoint)

    work = process_partition(app, _decode, TP, _records("a", start=10), state)

    # "a" was read (upgraded and changed); "b" goes as the blob had it, upgraded when read.
    assert sorted(work.state_changes, key=lambda c: c.key) == [
        StateChange(TP, "a", b'{"count":4}', 2),
        StateChange(TP, "b", b"4", 1),
    ]
    assert store.reads == 0


@pytest.mark.parametrize("blob", [b"[1, 2]", b"7", b"not json"])
def test_a_blob_that_cannot_become_entries_is_refused(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        open_partition_state(MemoryStateStore(), StateCache(), "g", TP, _v2_checkpoint(blob))


def test_a_stateful_app_on_a_sink_without_keyed_state_is_refused_at_start_up() -> None:
    class NoState:
        description = "memo://nowhere"
        writes_per_partition = False

    with pytest.raises(ConfigError, match="memo://nowhere"):
        BatchLoop(_counting(), NoState(), group="g")  # type: ignore[arg-type]
