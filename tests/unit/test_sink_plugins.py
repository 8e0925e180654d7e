"""Sinks as plugins: `consumer.open_sink` finds them by URL scheme in the `offsetkeeper.sinks`
entry points (here registered by a dist-info put on sys.path, as an installed distribution's
would be), and the third-party memo sink of tests/fixtures/plugin_sink keeps the Sink contract."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

import consumer
from consumer import Checkpoint, ConfigError, FencedError, Table, TopicPartition, open_sink
from consumer.cli.sinks import checkpoint_admin, job_store
from tests.fixtures.plugins import (
    MEMO_MODULE,
    MEMO_PLUGIN_DIR,
    entry_point_dist_info,
    load_memo_module,
)

OUR_SCHEMES = ["file", "kafka", "postgres", "postgresql", "sqlite"]
EVENTS = Table(name="events", columns={"id": "text", "n": "bigint"}, key=("id",))
ORDERS_3 = TopicPartition("orders", 3)


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty sys.path entry for dist-infos, with the memo sink's source importable (and
    forgotten again afterwards)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(MEMO_PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(MEMO_MODULE, None)


def test_an_unknown_scheme_is_a_config_error_listing_the_known_schemes() -> None:
    with pytest.raises(ConfigError, match="unknown sink URL scheme") as caught:
        open_sink("nosuch://x")
    known = caught.value.context["known"]
    assert known == sorted(known)
    assert set(OUR_SCHEMES) <= set(known)
    assert "nosuch" not in known
    assert "known=['file', 'kafka'," in str(caught.value)


@pytest.mark.parametrize(
    ("entry_point", "error"),
    [
        ("offsetkeeper_no_such_module:open_sink", "No module named 'offsetkeeper_no_such_module'"),
        ("offsetkeeper_memo_sink:open_memo_snik", "has no attribute 'open_memo_snik'"),
    ],
    ids=["module-missing", "function-missing"],
)
def test_an_entry_point_that_cannot_be_loaded_is_a_config_error_naming_it(
    plugin_site: Path, entry_point: str, error: str
) -> None:
    entry_point_dist_info(plugin_site, "broken_sink", {"broken": entry_point})
    with pytest.raises(ConfigError, match="sink plugin for this scheme cannot be loaded") as caught:
        open_sink("broken://somewhere")
    assert caught.value.context["scheme"] == "broken"
    assert caught.value.context["entry_point"] == entry_point
    assert error in caught.value.context["error"]
    assert entry_point in str(caught.value)


def test_a_plugin_sink_has_only_the_capabilities_it_implements(
    plugin_site: Path, tmp_path: Path
) -> None:
    entry_point_dist_info(
        plugin_site, "memo_sink", {"memo": "offsetkeeper_memo_sink:open_memo_sink"}
    )
    sink = open_sink(f"memo://{tmp_path}/memo")
    assert type(sink).__name__ == "MemoSink"
    assert sink.description == f"memo://{tmp_path}/memo"
    assert isinstance(sink, consumer.Sink)
    assert not isinstance(sink, consumer.CheckpointAdmin | consumer.JobStore)
    with pytest.raises(ConfigError, match="this sink does not support the checkpoint tools"):
        checkpoint_admin(sink)
    with pytest.raises(ConfigError, match="this sink cannot keep replay jobs"):
        job_store(sink)


# --- the memo sink keeps the contract (the integration test relies on it) -------------------


@pytest.fixture
def memo() -> ModuleType:
    return load_memo_module()


def _checkpoint(next_offset: int, epoch: int) -> Checkpoint:
    return Checkpoint(
        group="g",
        topic=ORDERS_3.topic,
        partition=ORDERS_3.partition,
        next_offset=next_offset,
        updated_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        epoch=epoch,
        state=b"\x00state",
        state_version=2,
    )


def _batch(sink: consumer.Sink, rows: list[dict[str, object]], cp: Checkpoint, epoch: int) -> None:
    sink.begin()
    sink.write_rows(EVENTS, rows)
    sink.save_checkpoints("g", [cp], {ORDERS_3: epoch})


def test_memo_rows_and_checkpoints_commit_together_or_not_at_all(
    memo: ModuleType, tmp_path: Path
) -> None:
    sink = memo.MemoSink(tmp_path)
    sink.open([EVENTS])
    epoch = sink.acquire("g", [ORDERS_3])[ORDERS_3]
    _batch(sink, [{"id": "a", "n": 1}, {"id": "b", "n": 1}], _checkpoint(2, epoch), epoch)
    sink.rollback()
    assert sink.committed_rows("events") == []
    assert sink.load_checkpoints("g") == {}
    _batch(sink, [{"id": "a", "n": 1}, {"id": "b", "n": 1}], _checkpoint(2, epoch), epoch)
    sink.commit()
    _batch(sink, [{"id": "a", "n": 2}], _checkpoint(3, epoch), epoch)
    sink.commit()
    sink.close()
    reopened = memo.MemoSink(tmp_path)
    assert sorted(reopened.committed_rows("events"), key=str) == [
        {"id": "a", "n": 2},
        {"id": "b", "n": 1},
    ]
    assert reopened.load_checkpoints("g", [ORDERS_3]) == {ORDERS_3: _checkpoint(3, epoch)}
    assert reopened.load_checkpoints("g", [TopicPartition("orders", 0)]) == {}


def test_memo_fences_an_earlier_owner(memo: ModuleType, tmp_path: Path) -> None:
    zombie, successor = memo.MemoSink(tmp_path), memo.MemoSink(tmp_path)
    zombie.open([EVENTS])
    successor.open([EVENTS])
    old = zombie.acquire("g", [ORDERS_3])[ORDERS_3]
    new = successor.acquire("g", [ORDERS_3])[ORDERS_3]
    assert new == old + 1
    with pytest.raises(FencedError) as caught:
        _batch(zombie, [{"id": "z", "n": 9}], _checkpoint(9, old), old)
    assert caught.value.partitions == {("orders", 3)}
    zombie.rollback()  # releases the lock the zombie's batch took
    _batch(successor, [{"id": "s", "n": 1}], _checkpoint(1, new), new)
    successor.commit()
    assert successor.committed_rows("events") == [{"id": "s", "n": 1}]
    assert successor.load_checkpoints("g")[ORDERS_3].next_offset == 1
