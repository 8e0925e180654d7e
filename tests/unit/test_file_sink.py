"""sinks._file*: data files renamed into place, the checkpoint after them, fencing, the reader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointFormatError,
    ConfigError,
    FencedError,
    RowsOrigin,
    RowsRefusedError,
    Sink,
    SinkError,
    StateChange,
    StateEntry,
    StateStore,
    Table,
    TopicPartition,
)
from sinks import FileSink, committed_files, read_committed_rows
from sinks import _file_io as file_io
from sinks._file_layout import data_file_name, safe_name
from tests.apps.chaos import EVENTS
from tests.fixtures.file_sink import CommittedFileWatcher
from tests.fixtures.processes import OFFSETKEEPER, REPO

GROUP = "g"
TP0 = TopicPartition("orders", 0)
TP1 = TopicPartition("orders", 1)
WHEN = datetime(2024, 6, 1, 8, 30, 0, 250000, tzinfo=UTC)

PROFILES = Table(
    name="profiles",
    columns={
        "id": "text",
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


def _rows(*ids: str) -> list[dict[str, Any]]:
    return [{"id": i, "visits": n, "score": 0.5, "active": True} for n, i in enumerate(ids)]


def _batch(
    sink: FileSink,
    epochs: dict[TopicPartition, int],
    ranges: dict[TopicPartition, tuple[int, int]],
    rows: dict[TopicPartition, list[dict[str, Any]]],
    *,
    group: str = GROUP,
) -> None:
    """One batch the way consumer/_commit.py drives a per-partition sink, committed."""
    sink.begin()
    try:
        for tp, (first, next_offset) in ranges.items():
            sink.write_rows(PROFILES, rows[tp], RowsOrigin(group, tp, first, next_offset))
        sink.save_checkpoints(
            group,
            [_checkpoint(tp, next_offset, group) for tp, (_first, next_offset) in ranges.items()],
            {tp: epochs[tp] for tp in ranges},
        )
        sink.commit()
    except BaseException:
        sink.rollback()
        raise


def _visible_names(root: Path) -> list[str]:
    """Every non-hidden file under `root` (what a naive `ls -R` reader would pick up)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and "_offsetkeeper" not in p.parts
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def sink(root: Path) -> Iterator[FileSink]:
    opened = FileSink(root, lock_timeout_s=1.0)
    opened.open([PROFILES])
    yield opened
    opened.close()


def test_the_file_sink_satisfies_the_sink_protocol(root: Path) -> None:
    typed: Sink = FileSink(root)  # mypy checks the protocol; here: the flag the engine reads
    assert typed.writes_per_partition is True
    assert typed.description == f"file://{root}"


def test_open_lays_out_the_directory_and_a_second_open_keeps_the_data(root: Path) -> None:
    first = FileSink(root)
    first.open([PROFILES])
    epochs = first.acquire(GROUP, [TP0])
    _batch(first, epochs, {TP0: (0, 2)}, {TP0: _rows("a", "b")})
    first.close()
    assert {p.name for p in (root / "_offsetkeeper").iterdir()} == {
        "checkpoints",
        "leases",
        "jobs",
        "lock",
    }
    again = FileSink(root)
    again.open([PROFILES])
    assert again.load_checkpoints(GROUP)[TP0].next_offset == 2
    assert [r["id"] for r in read_committed_rows(root, "profiles", GROUP)] == ["a", "b"]
    again.close()


def test_a_sink_that_is_not_open_or_read_only_refuses_work(root: Path) -> None:
    closed = FileSink(root)
    with pytest.raises(SinkError, match="not open"):
        closed.acquire(GROUP, [TP0])
    closed.open_existing()
    assert closed.load_checkpoints(GROUP) == {}  # nothing there yet: reads answer nothing
    assert closed.checkpoint_groups() == []
    assert closed.load_job("j") is None
    with pytest.raises(SinkError, match="read-only"):
        closed.acquire(GROUP, [TP0])
    assert not root.exists(), "a read-only open created the directory"


def test_commit_makes_data_files_and_checkpoints_visible_together(
    sink: FileSink, root: Path
) -> None:
    epochs = sink.acquire(GROUP, [TP0, TP1])
    sink.begin()
    sink.write_rows(PROFILES, _rows("a", "b"), RowsOrigin(GROUP, TP0, 0, 5))
    sink.write_rows(PROFILES, _rows("c"), RowsOrigin(GROUP, TP1, 10, 12))
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 5), _checkpoint(TP1, 12)], epochs)
    # Before COMMIT: only hidden temp files exist, and the reader sees nothing.
    assert _visible_names(root) == []
    assert len(list((root / "profiles" / GROUP).glob(".*.tmp"))) == 2
    assert committed_files(root, PROFILES, GROUP) == []
    sink.commit()

    files = committed_files(root, PROFILES, GROUP)
    assert [(f.topic, f.partition, f.first_offset, f.last_offset) for f in files] == [
        ("orders", 0, 0, 4),
        ("orders", 1, 10, 11),
    ]
    assert [f.path.name for f in files] == [
        f"orders+0+{0:020d}+{4:020d}.jsonl",
        f"orders+1+{10:020d}+{11:020d}.jsonl",
    ]
    assert list(read_committed_rows(root, PROFILES, GROUP)) == [
        {"id": "a", "visits": 0, "score": 0.5, "active": True, "avatar": None, "attrs": None},
        {"id": "b", "visits": 1, "score": 0.5, "active": True, "avatar": None, "attrs": None},
        {"id": "c", "visits": 0, "score": 0.5, "active": True, "avatar": None, "attrs": None},
    ]
    assert not list(root.rglob(".*.tmp")), "a temp file outlived the commit"
    stored = sink.load_checkpoints(GROUP)
    assert {tp: cp.next_offset for tp, cp in stored.items()} == {TP0: 5, TP1: 12}
    assert stored[TP0].epoch == 0  # as given; the engine passes the acquired epoch
    assert stored[TP0].read_from_format == CURRENT_FORMAT_VERSION
    assert sink.load_checkpoints(GROUP, [TP1]).keys() == {TP1}


def test_rollback_leaves_nothing_visible_and_releases_the_lock(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    sink.begin()
    sink.write_rows(PROFILES, _rows("a"), RowsOrigin(GROUP, TP0, 0, 1))
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)
    sink.rollback()
    assert list((root / "profiles" / GROUP).iterdir()) == []
    assert sink.load_checkpoints(GROUP) == {}
    other = FileSink(root, lock_timeout_s=0.2)
    other.open([])
    assert other.acquire(GROUP, [TP0]) == {TP0: 2}  # the lock was free
    other.close()


def test_a_checkpoint_without_rows_moves_on_and_writes_no_file(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _batch(sink, epochs, {TP0: (0, 3)}, {TP0: []})
    assert sink.load_checkpoints(GROUP)[TP0].next_offset == 3
    assert _visible_names(root) == []


def test_column_types_round_trip_and_bytes_are_base64(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    row = {
        "id": "x",
        "visits": 2**62,
        "score": -1.25,
        "active": False,
        "avatar": b"\x00\xffpng",
        "attrs": {"tags": ["a", "é"], "n": None, "deep": {"k": 1.5}},
    }
    odd = {"id": "sparse", "score": -0.0, "attrs": [1, "two"]}
    _batch(sink, epochs, {TP0: (0, 2)}, {TP0: [row, odd]})
    (data_file,) = committed_files(root, PROFILES, GROUP)
    lines = data_file.path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["avatar"] == "AP9wbmc="  # base64 of the bytes
    assert list(json.loads(lines[0])) == list(PROFILES.columns)  # declared column order
    typed = list(read_committed_rows(root, PROFILES, GROUP))
    assert typed[0] == row
    assert typed[1] == {
        "id": "sparse",
        "visits": None,
        "score": -0.0,
        "active": None,
        "avatar": None,
        "attrs": [1, "two"],
    }
    raw = list(read_committed_rows(root, "profiles", GROUP))
    assert raw[0]["avatar"] == "AP9wbmc="  # without the Table, bytes stay base64


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("attrs", {"when": WHEN}),  # not JSON at all
        ("attrs", {1, 2}),
        ("score", math.nan),  # strict JSON has no NaN: never silently written as null
        ("score", -math.inf),
        ("attrs", [math.inf]),
        ("id", "lone \ud800 surrogate"),  # not UTF-8
        ("attrs", {"k": "\udfff"}),
        ("avatar", "text, not bytes"),
    ],
)
def test_a_value_json_cannot_hold_is_refused_naming_table_and_column(
    sink: FileSink, root: Path, column: str, value: Any
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    assert sink.value_limits.nan is False
    assert sink.value_limits.infinity is False
    sink.begin()
    with pytest.raises(RowsRefusedError, match="cannot be written as JSON") as caught:
        sink.write_rows(
            PROFILES, [*_rows("a"), {"id": "x", column: value}], RowsOrigin(GROUP, TP0, 0, 2)
        )
    assert caught.value.context["table"] == "profiles"
    assert caught.value.context["field"] == column
    sink.rollback()
    assert _visible_names(root) == []
    # Not a sticky failure: the next batch of the partition commits.
    _batch(sink, epochs, {TP0: (0, 1)}, {TP0: _rows("a")})
    assert [row["id"] for row in read_committed_rows(root, PROFILES, GROUP)] == ["a"]


def test_rows_need_an_origin_and_an_acquired_partition(sink: FileSink) -> None:
    sink.begin()
    with pytest.raises(SinkError, match="needs an origin"):
        sink.write_rows(PROFILES, _rows("a"))
    with pytest.raises(SinkError, match="never acquired"):
        sink.write_rows(PROFILES, _rows("a"), RowsOrigin(GROUP, TP0, 0, 1))
    sink.rollback()


def test_acquire_bumps_epochs_per_group_and_partition(sink: FileSink, root: Path) -> None:
    assert sink.acquire(GROUP, [TP0, TP1]) == {TP0: 1, TP1: 1}
    assert sink.acquire(GROUP, [TP0]) == {TP0: 2}
    assert sink.acquire("other", [TP0]) == {TP0: 1}
    leases = json.loads((root / "_offsetkeeper" / "leases" / "g.json").read_text())
    assert leases["epochs"] == [
        {"topic": "orders", "partition": 0, "epoch": 2},
        {"topic": "orders", "partition": 1, "epoch": 1},
    ]


def test_a_stale_epoch_is_fenced_and_nothing_of_the_batch_is_visible(root: Path) -> None:
    zombie = FileSink(root, lock_timeout_s=1.0)
    zombie.open([PROFILES])
    old = zombie.acquire(GROUP, [TP0, TP1])
    successor = FileSink(root, lock_timeout_s=1.0)
    successor.open([PROFILES])
    new = successor.acquire(GROUP, [TP0])  # TP1 stays the zombie's
    with pytest.raises(FencedError) as caught:
        _batch(zombie, old, {TP0: (0, 2), TP1: (0, 2)}, {TP0: _rows("z0"), TP1: _rows("z1")})
    assert caught.value.partitions == frozenset({("orders", 0)})
    assert caught.value.context["group"] == GROUP
    assert zombie.load_checkpoints(GROUP) == {}
    assert _visible_names(root) == []
    assert not list(root.rglob(".*.tmp"))
    # The successor commits normally; the zombie's unfenced partition still works alone.
    _batch(successor, new, {TP0: (0, 2)}, {TP0: _rows("s0")})
    _batch(zombie, old, {TP1: (0, 2)}, {TP1: _rows("z1")})
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["s0", "z1"]
    zombie.close()
    successor.close()


def test_a_partition_never_acquired_is_fenced(sink: FileSink) -> None:
    sink.begin()
    with pytest.raises(FencedError):
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], {TP0: 1})
    sink.rollback()


def test_a_batch_that_starts_below_the_checkpoint_is_refused(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _batch(sink, epochs, {TP0: (0, 10)}, {TP0: _rows("a")})
    with pytest.raises(SinkError, match="below the stored checkpoint") as caught:
        _batch(sink, epochs, {TP0: (5, 15)}, {TP0: _rows("dup")})
    assert caught.value.context["checkpoint"] == 10
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["a"]
    _batch(sink, epochs, {TP0: (10, 15)}, {TP0: _rows("b")})
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["a", "b"]


def test_acquire_removes_files_at_or_beyond_the_checkpoint_and_stale_temps(
    sink: FileSink, root: Path
) -> None:
    epochs = sink.acquire(GROUP, [TP0, TP1])
    _batch(sink, epochs, {TP0: (0, 10)}, {TP0: _rows("a")})
    group_dir = root / "profiles" / GROUP
    committed = group_dir / data_file_name("orders", 0, 0, 9)
    beyond = group_dir / data_file_name("orders", 0, 10, 19)  # renamed, never checkpointed
    no_checkpoint = group_dir / data_file_name("orders", 1, 0, 4)
    temp = group_dir / f".{data_file_name('orders', 0, 20, 29)}.4242.abcdef.tmp"
    other_group = root / "profiles" / "other" / data_file_name("orders", 0, 10, 19)
    other_group.parent.mkdir()
    for path in (beyond, no_checkpoint, temp, other_group):
        path.write_text('{"id": "left over"}\n')
    assert [f.path for f in committed_files(root, PROFILES, GROUP)] == [committed]

    successor = FileSink(root, lock_timeout_s=1.0)
    successor.open([])  # a checkpoint tool knows no tables: every table directory is cleaned
    successor.acquire(GROUP, [TP0, TP1])
    successor.close()
    assert sorted(group_dir.iterdir()) == [committed]
    assert other_group.exists(), "another group's files are not ours to clean"


def test_a_kill_after_the_data_rename_leaves_an_invisible_file_that_acquire_removes(
    root: Path,
) -> None:
    """A real SIGKILL at the "file-after-data" point, in a child process, holding the lock."""
    script = textwrap.dedent(
        f"""
        from consumer import TopicPartition
        from consumer import RowsOrigin
        from sinks import FileSink
        from tests.unit.test_file_sink import PROFILES, _batch, _rows
        sink = FileSink({str(root)!r})
        sink.open([PROFILES])
        tp = TopicPartition("orders", 0)
        epochs = sink.acquire("g", [tp])
        _batch(sink, epochs, {{tp: (0, 3)}}, {{tp: _rows("a")}})
        _batch(sink, epochs, {{tp: (3, 7)}}, {{tp: _rows("lost")}})
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OFFSETKEEPER_TEST_CRASH_POINT": "file-after-data",
        "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "2",
    }
    child = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=False)
    assert child.returncode == -9
    group_dir = root / "profiles" / GROUP
    assert sorted(p.name for p in group_dir.iterdir()) == [
        data_file_name("orders", 0, 0, 2),
        data_file_name("orders", 0, 3, 6),  # renamed into place, but beyond the checkpoint
    ]
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["a"]

    successor = FileSink(root, lock_timeout_s=1.0)  # the dead child's lock is gone
    successor.open([PROFILES])
    epochs = successor.acquire(GROUP, [TP0])
    assert [p.name for p in group_dir.iterdir()] == [data_file_name("orders", 0, 0, 2)]
    _batch(successor, epochs, {TP0: (3, 5)}, {TP0: _rows("b")})  # a different batching
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["a", "b"]
    successor.close()


def test_a_held_lock_times_out_with_a_sink_error(root: Path) -> None:
    holder = FileSink(root, lock_timeout_s=1.0)
    holder.open([PROFILES])
    waiter = FileSink(root, lock_timeout_s=0.1)
    waiter.open([PROFILES])
    epochs = holder.acquire(GROUP, [TP0])
    holder.begin()
    holder.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)  # takes the lock until commit
    with pytest.raises(SinkError, match="lock is held by another writer"):
        waiter.acquire(GROUP, [TP1])
    holder.commit()
    assert waiter.acquire(GROUP, [TP1]) == {TP1: 1}
    holder.close()
    waiter.close()


def test_replay_jobs_are_created_once(sink: FileSink, root: Path) -> None:
    assert sink.load_job("replay/1:x") is None
    assert sink.create_job("replay/1:x", '{"from": 1}') == '{"from": 1}'
    assert sink.create_job("replay/1:x", '{"from": 2}') == '{"from": 1}'
    assert sink.load_job("replay/1:x") == '{"from": 1}'
    assert [p.name for p in (root / "_offsetkeeper" / "jobs").iterdir()] == ["replay%2F1%3Ax.json"]


def test_group_names_are_made_file_system_safe(sink: FileSink, root: Path) -> None:
    assert safe_name("replay:job-1") == "replay%3Ajob-1"
    assert safe_name("..") == "%2E."
    assert safe_name("a/b") == "a%2Fb"
    with pytest.raises(ConfigError):
        safe_name("")
    group = "replay:job/1"
    epochs = sink.acquire(group, [TP0])
    _batch(sink, epochs, {TP0: (0, 1)}, {TP0: _rows("r")}, group=group)
    assert (root / "profiles" / "replay%3Ajob%2F1").is_dir()
    assert sink.checkpoint_groups() == [group]
    assert [r["id"] for r in read_committed_rows(root, PROFILES, group)] == ["r"]
    assert list(read_committed_rows(root, PROFILES, GROUP)) == []


def test_a_table_named_like_the_sink_directory_is_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        FileSink(root).open([Table(name="_offsetkeeper", columns={"a": "text"}, key=("a",))])


def _write_checkpoint_document(root: Path, group: str, records: list[dict[str, Any]]) -> Path:
    path = root / "_offsetkeeper" / "checkpoints" / f"{group}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "kind": "offsetkeeper-file-checkpoints",
                "document_version": 1,
                "group": group,
                "checkpoints": records,
            }
        )
    )
    return path


V1_RECORD = {
    "format_version": 1,
    "group": "old",
    "topic": "orders",
    "partition": 3,
    "next_offset": 77,
    "updated_at": 1741964966535,
}


@pytest.mark.parametrize("state", ["not base64!", "QUJ", 12, ["AAAA"]])
def test_a_checkpoint_state_that_is_not_base64_is_a_checkpoint_error_naming_the_partition(
    sink: FileSink, root: Path, state: Any
) -> None:
    record = {**V1_RECORD, "group": GROUP, "format_version": 2, "state": state}
    _write_checkpoint_document(root, GROUP, [record])
    with pytest.raises(CheckpointError, match="not base64") as caught:
        sink.load_checkpoints(GROUP)
    assert caught.value.context["topic"] == "orders"
    assert caught.value.context["partition"] == 3
    assert caught.value.__cause__ is None  # no binascii traceback


@pytest.mark.parametrize(
    "document",
    [
        b"[" * 100_000,  # deeper than the decoder can go
        b"\xff\xfe not UTF-8",
        json.dumps({"kind": "offsetkeeper-file-checkpoints", "document_version": 1}).encode(),
        json.dumps(
            {
                "kind": "offsetkeeper-file-checkpoints",
                "document_version": 1,
                "group": "g",
                "checkpoints": {"a": 1},
            }
        ).encode(),
    ],
)
def test_a_hostile_checkpoint_document_is_a_sink_error(
    sink: FileSink, root: Path, document: bytes
) -> None:
    path = _write_checkpoint_document(root, GROUP, [])
    path.write_bytes(document)
    with pytest.raises(SinkError, match=r"not valid JSON|no group"):
        sink.load_checkpoints(GROUP)


@pytest.mark.parametrize(
    "epochs",
    [
        [{"topic": "orders", "partition": "0", "epoch": 1}],
        [{"topic": "orders", "epoch": 1}],
        [["orders", 0, 1]],
        {"orders": 1},
    ],
)
def test_a_hostile_lease_document_is_a_sink_error(sink: FileSink, root: Path, epochs: Any) -> None:
    path = root / "_offsetkeeper" / "leases" / f"{GROUP}.json"
    path.write_text(
        json.dumps(
            {
                "kind": "offsetkeeper-file-leases",
                "document_version": 1,
                "group": GROUP,
                "epochs": epochs,
            }
        )
    )
    with pytest.raises(SinkError, match="lease document has an entry"):
        sink.acquire(GROUP, [TP0])


def test_a_checkpoint_of_a_newer_format_is_refused_on_load(sink: FileSink, root: Path) -> None:
    _write_checkpoint_document(
        root, GROUP, [{**V1_RECORD, "group": GROUP, "format_version": CURRENT_FORMAT_VERSION + 1}]
    )
    with pytest.raises(CheckpointFormatError, match="newer than this code knows"):
        sink.load_checkpoints(GROUP)
    with pytest.raises(CheckpointFormatError):
        committed_files(root, PROFILES, GROUP)  # the reader refuses it too


def test_an_older_format_is_upgraded_on_load_and_rewritten_by_migrate(
    sink: FileSink, root: Path
) -> None:
    path = _write_checkpoint_document(root, "old", [V1_RECORD])
    loaded = sink.load_checkpoints("old")[TopicPartition("orders", 3)]
    assert (loaded.next_offset, loaded.epoch, loaded.read_from_format) == (77, 0, 1)
    assert loaded.updated_at == datetime(2025, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)

    assert sink.migrate_checkpoints(dry_run=True) == [loaded]
    assert json.loads(path.read_text())["checkpoints"][0]["format_version"] == 1
    assert sink.migrate_checkpoints() == [loaded]
    record = json.loads(path.read_text())["checkpoints"][0]
    assert record["format_version"] == CURRENT_FORMAT_VERSION
    assert record["next_offset"] == 77
    assert record["writer_version"] == "unknown"
    assert sink.migrate_checkpoints() == []


def _offsetkeeper(*args: str) -> str:
    """Run the real `offsetkeeper` command (its logging set-up stays in its own process)."""
    done = subprocess.run(
        [OFFSETKEEPER, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_checkpoint_export_and_migrate_commands_work_on_a_file_sink(
    sink: FileSink, root: Path, tmp_path: Path
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _batch(sink, epochs, {TP0: (0, 4)}, {TP0: _rows("a")})
    _write_checkpoint_document(root, "old", [V1_RECORD])
    url = f"file://{root}"

    exported = json.loads(_offsetkeeper("checkpoint", "export", "--sink", url, "--group", GROUP))
    assert [(c["topic"], c["partition"], c["next_offset"]) for c in exported["checkpoints"]] == [
        ("orders", 0, 4)
    ]
    assert exported["source"] == url

    dry = _offsetkeeper("checkpoint", "migrate", "--sink", url, "--dry-run")
    assert "1 checkpoint(s) would be rewritten" in dry
    backup = tmp_path / "backup.json"
    done = _offsetkeeper("checkpoint", "migrate", "--sink", url, "--backup", str(backup))
    assert "migrated 1 checkpoint(s)" in done
    assert len(json.loads(backup.read_text())["checkpoints"]) == 2
    reopened = FileSink(root)
    reopened.open_existing()
    migrated = reopened.load_checkpoints("old")[TopicPartition("orders", 3)]
    assert migrated.read_from_format == CURRENT_FORMAT_VERSION


def test_the_crash_tests_reader_reports_duplicates_and_changed_files(root: Path) -> None:
    """tests/fixtures/file_sink.CommittedFileWatcher is the crash test's eye: it must see."""
    sink = FileSink(root)
    sink.open([EVENTS])
    epochs = sink.acquire(GROUP, [TP0])

    def event(offset: int) -> dict[str, Any]:
        return {"source_partition": 0, "source_offset": offset, "writer": "w", "event_key": "k"}

    def commit(first: int, next_offset: int, offsets: list[int]) -> None:
        sink.begin()
        sink.write_rows(
            EVENTS, [event(o) for o in offsets], RowsOrigin(GROUP, TP0, first, next_offset)
        )
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, next_offset)], epochs)
        sink.commit()

    watcher = CommittedFileWatcher(root, EVENTS, GROUP)
    commit(0, 2, [0, 1])
    watcher.poll()
    assert watcher.violations == []
    assert set(watcher.seen_records) == {(0, 0), (0, 1)}
    commit(2, 4, [1, 3])  # offset 1 again, and outside this file's range
    watcher.poll()
    assert len(watcher.violations) == 2, watcher.violations
    assert "outside the range" in watcher.violations[0]
    assert "in both" in watcher.violations[1]
    (first_file,) = [f for f in committed_files(root, EVENTS, GROUP) if f.first_offset == 0]
    first_file.path.write_text(first_file.path.read_text()[:-5])  # a torn, shorter file
    watcher.poll()  # the reader refuses it (its recorded size) before the watcher compares
    assert len(watcher.violations) == 3, watcher.violations
    assert "refused by the reader: a committed data file is truncated" in watcher.violations[2]
    # A file of a version before checksums: only the watcher's own size check sees it.
    document = root / "_offsetkeeper" / "checkpoints" / f"{GROUP}.json"
    document.write_text(json.dumps({**json.loads(document.read_text()), "digests": []}))
    watcher.poll()
    sink.close()
    assert len(watcher.violations) == 4, watcher.violations
    assert "changed size" in watcher.violations[3]


# -- keyed state (consumer.StateStore) ---------------------------------------------------------


def _change(tp: TopicPartition, key: str, value: Any, version: int = 1) -> StateChange:
    """A change to `key`: `value` as JSON, bytes as they are, `DELETE` for a tombstone."""
    if value is DELETE:
        return StateChange(tp, key, None, version)
    encoded = value if isinstance(value, bytes) else json.dumps(value).encode()
    return StateChange(tp, key, encoded, version)


DELETE: Any = object()


def _state_batch(
    sink: FileSink,
    epochs: dict[TopicPartition, int],
    changes: dict[TopicPartition, dict[str, Any]],
    next_offsets: dict[TopicPartition, int],
    *,
    commit: bool = True,
    blob: bytes | None = None,
) -> None:
    """One stateful batch: rows, then state, then checkpoints; committed (or rolled back)."""
    sink.begin()
    try:
        for tp, next_offset in next_offsets.items():
            sink.write_rows(
                PROFILES,
                _rows(f"r{next_offset}"),
                RowsOrigin(GROUP, tp, next_offset - 1, next_offset),
            )
        sink.write_state(
            GROUP, [_change(tp, k, v) for tp, kv in changes.items() for k, v in kv.items()]
        )
        checkpoints = [
            dataclasses.replace(
                _checkpoint(tp, n), state=blob, state_version=None if blob is None else 2
            )
            for tp, n in next_offsets.items()
        ]
        sink.save_checkpoints(GROUP, checkpoints, {tp: epochs[tp] for tp in next_offsets})
        if commit:
            sink.commit()
        else:
            sink.rollback()
    except BaseException:
        sink.rollback()
        raise


def _state(sink: StateStore, tp: TopicPartition, group: str = GROUP) -> dict[str, Any]:
    """The partition's entries as {key: (decoded value, version)}, read by a full scan."""
    return {e.key: (json.loads(e.value), e.version) for e in sink.scan_state(group, tp)}


def _state_files(root: Path, group: str = GROUP) -> list[str]:
    directory = root / "_offsetkeeper" / "state" / safe_name(group)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _reader(root: Path) -> FileSink:
    reader = FileSink(root)
    reader.open_existing()
    return reader


def test_the_file_sink_is_a_state_store(sink: FileSink) -> None:
    assert isinstance(sink, StateStore)
    store: StateStore = sink  # mypy checks the signatures
    assert store.state_sizes(GROUP) == {}
    assert store.read_state(GROUP, TP0, ["a"]) == {}
    assert list(store.scan_state(GROUP, TP0)) == []


def test_state_is_written_with_the_batch_and_read_in_key_order(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0, TP1])
    _state_batch(
        sink,
        epochs,
        {TP0: {"b": {"n": 2}, "a": [1, "é"]}, TP1: {"z": None}},
        {TP0: 3, TP1: 8},
    )
    assert sink.read_state(GROUP, TP0, ["a", "missing"]) == {
        "a": StateEntry("a", b'[1, "\\u00e9"]', 1)
    }
    assert [e.key for e in sink.scan_state(GROUP, TP0)] == ["a", "b"]
    assert _state(sink, TP1) == {"z": (None, 1)}
    assert sink.state_sizes(GROUP) == {TP0: (2, 21), TP1: (1, 4)}
    assert sink.state_sizes(GROUP, [TP1]) == {TP1: (1, 4)}
    assert _state_files(root) == [
        f"orders+0+{1:020d}.delta.jsonl",
        f"orders+1+{1:020d}.delta.jsonl",
    ]
    document = json.loads((root / "_offsetkeeper" / "checkpoints" / "g.json").read_text())
    assert document["state"][0] == {
        "topic": "orders",
        "partition": 0,
        "seq": 1,
        "files": [f"orders+0+{1:020d}.delta.jsonl"],
        "entries": 2,
        "value_bytes": 21,
    }
    reader = _reader(root)  # another process, reading the committed files
    assert _state(reader, TP0) == {"a": ([1, "é"], 1), "b": ({"n": 2}, 1)}
    assert reader.state_sizes(GROUP) == sink.state_sizes(GROUP)
    assert not list(root.rglob(".*.tmp"))


def test_a_rolled_back_or_fenced_batch_leaves_no_state(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1}}, {TP0: 1})
    _state_batch(sink, epochs, {TP0: {"a": 2, "b": 2}}, {TP0: 2}, commit=False)
    assert _state(sink, TP0) == {"a": (1, 1)}
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]  # the temp is gone

    successor = FileSink(root, lock_timeout_s=1.0)
    successor.open([PROFILES])
    successor.acquire(GROUP, [TP0])
    with pytest.raises(FencedError):
        _state_batch(sink, epochs, {TP0: {"a": 3}}, {TP0: 3})
    assert _state(_reader(root), TP0) == {"a": (1, 1)}
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]
    assert _state(successor, TP0) == {"a": (1, 1)}
    successor.close()


def test_deleted_entries_are_gone_and_a_partition_without_entries_has_no_size(
    sink: FileSink, root: Path
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1, "b": 2}}, {TP0: 1})
    _state_batch(sink, epochs, {TP0: {"a": DELETE, "never": DELETE}}, {TP0: 2})
    assert _state(sink, TP0) == {"b": (2, 1)}
    assert sink.read_state(GROUP, TP0, ["a", "b"]).keys() == {"b"}
    _state_batch(sink, epochs, {TP0: {"b": DELETE}}, {TP0: 3})
    assert sink.state_sizes(GROUP) == {}
    assert _state(_reader(root), TP0) == {}
    assert _reader(root).state_sizes(GROUP) == {}


def test_state_is_restored_by_a_fresh_sink_and_reread_on_each_acquire(root: Path) -> None:
    first = FileSink(root, lock_timeout_s=1.0)
    first.open([PROFILES])
    first_epochs = first.acquire(GROUP, [TP0])
    _state_batch(first, first_epochs, {TP0: {"a": 1, "b": 1}}, {TP0: 1})
    assert _state(first, TP0) == {"a": (1, 1), "b": (1, 1)}  # first's index is loaded

    second = FileSink(root, lock_timeout_s=1.0)  # a new owner: a restart, or a rebalance
    second.open([PROFILES])
    second_epochs = second.acquire(GROUP, [TP0])
    assert _state(second, TP0) == {"a": (1, 1), "b": (1, 1)}
    _state_batch(second, second_epochs, {TP0: {"a": 2, "c": 2}}, {TP0: 2})
    second.close()

    first_epochs = first.acquire(GROUP, [TP0])  # back to first: it must not reuse its old copy
    assert _state(first, TP0) == {"a": (2, 1), "b": (1, 1), "c": (2, 1)}
    _state_batch(first, first_epochs, {TP0: {"b": DELETE}}, {TP0: 3})
    assert _state(_reader(root), TP0) == {"a": (2, 1), "c": (2, 1)}
    first.close()


def test_values_keys_and_versions_round_trip_exactly(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    odd = {
        "plain": b'{"k":1}',
        "spaces": b" [ 1 ,\n 2 ] ",
        "\u00e9\U0001f600 key": '"\u00e9\U0001f600"'.encode(),
        "lone \ud800": b"1",
        "not utf-8": b"\xff\xfe\x00",
        "": b"null",
    }
    sink.begin()
    sink.write_state(GROUP, [StateChange(TP0, k, v, 7) for k, v in odd.items()])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)
    sink.commit()
    for store in (sink, _reader(root)):
        entries = {e.key: e for e in store.scan_state(GROUP, TP0)}
        assert {k: e.value for k, e in entries.items()} == odd
        assert {e.version for e in entries.values()} == {7}
        assert list(entries) == sorted(odd)


def test_compaction_keeps_the_exact_contents_and_bounds_the_files(root: Path) -> None:
    rng = random.Random(15)
    sink = FileSink(root, state_max_deltas=3, state_min_compact_bytes=200)
    sink.open([PROFILES])
    epochs = sink.acquire(GROUP, [TP0, TP1])
    truth: dict[TopicPartition, dict[str, tuple[bytes, int]]] = {TP0: {}, TP1: {}}
    bases = 0
    for batch in range(1, 60):
        changes = []
        for tp in (TP0, TP1):
            for _ in range(rng.randint(0, 6)):
                key = f"k{rng.randint(0, 15)}"
                if rng.random() < 0.25:
                    changes.append(StateChange(tp, key, None, 1))
                    truth[tp].pop(key, None)
                else:
                    value = json.dumps(
                        {"n": rng.randint(0, 10**6), "pad": "x" * rng.randint(0, 40)}
                    )
                    version = rng.randint(1, 3)
                    changes.append(StateChange(tp, key, value.encode(), version))
                    truth[tp][key] = (value.encode(), version)
        changes = list({(c.partition, c.key): c for c in changes}.values())
        sink.begin()
        sink.write_state(GROUP, changes)
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, batch), _checkpoint(TP1, batch)], epochs)
        sink.commit()
        names = _state_files(root)
        bases += sum(name.endswith(".base.jsonl") for name in names)
        for tp in (TP0, TP1):
            files = [n for n in names if n.startswith(f"orders+{tp.partition}+")]
            assert sum(n.endswith(".delta.jsonl") for n in files) <= 3
            assert sum(n.endswith(".base.jsonl") for n in files) <= 1
        fresh = _reader(root)
        for tp in (TP0, TP1):
            expected = {k: StateEntry(k, v, ver) for k, (v, ver) in sorted(truth[tp].items())}
            assert {e.key: e for e in sink.scan_state(GROUP, tp)} == expected
            assert {e.key: e for e in fresh.scan_state(GROUP, tp)} == expected
            assert list(fresh.scan_state(GROUP, tp)) == list(expected.values())
            size = (len(expected), sum(len(e.value) for e in expected.values()))
            assert fresh.state_sizes(GROUP).get(tp, (0, 0)) == size
    assert bases > 10, "compaction never ran"
    sink.close()


def test_compaction_when_the_deltas_outgrow_the_live_values(root: Path) -> None:
    sink = FileSink(root, state_min_compact_bytes=1)  # the byte rule only (32 deltas allowed)
    sink.open([PROFILES])
    epochs = sink.acquire(GROUP, [TP0])
    for batch in range(1, 6):
        _state_batch(sink, epochs, {TP0: {"only": batch}}, {TP0: batch})
        files = _state_files(root)
        assert len(files) == 1, files  # one small live value: each delta outgrows it
    assert files == [f"orders+0+{5:020d}.base.jsonl"]
    assert _state(_reader(root), TP0) == {"only": (5, 1)}
    sink.close()


def test_a_kill_before_the_checkpoint_leaves_a_state_file_that_is_ignored_then_removed(
    root: Path,
) -> None:
    """A real SIGKILL at "file-after-data": the state file is renamed, the document is not."""
    script = textwrap.dedent(
        f"""
        from consumer import StateChange, TopicPartition
        from sinks import FileSink
        from tests.unit.test_file_sink import PROFILES, _checkpoint
        sink = FileSink({str(root)!r})
        sink.open([PROFILES])
        tp = TopicPartition("orders", 0)
        epochs = sink.acquire("g", [tp])
        for n, value in ((1, b"1"), (2, b"2")):
            sink.begin()
            sink.write_state("g", [StateChange(tp, "a", value, 1), StateChange(tp, "b", value, 1)])
            sink.save_checkpoints("g", [_checkpoint(tp, n)], epochs)
            sink.commit()
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OFFSETKEEPER_TEST_CRASH_POINT": "file-after-data",
        "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "2",
    }
    child = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=False)
    assert child.returncode == -9
    uncommitted = f"orders+0+{2:020d}.delta.jsonl"
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl", uncommitted]
    reader = _reader(root)
    assert _state(reader, TP0) == {"a": (1, 1), "b": (1, 1)}  # the uncommitted delta is unread
    assert reader.load_checkpoints(GROUP)[TP0].next_offset == 1

    successor = FileSink(root, lock_timeout_s=1.0)  # the dead child's lock is gone
    successor.open([PROFILES])
    epochs = successor.acquire(GROUP, [TP0])
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]
    assert _state(successor, TP0) == {"a": (1, 1), "b": (1, 1)}
    successor.begin()
    successor.write_state(GROUP, [_change(TP0, "a", 5)])  # the same sequence number, new content
    successor.save_checkpoints(GROUP, [_checkpoint(TP0, 2)], epochs)
    successor.commit()
    assert _state(_reader(root), TP0) == {"a": (5, 1), "b": (1, 1)}
    successor.close()


def test_acquire_removes_superseded_and_stray_state_files_of_its_partitions_only(
    root: Path,
) -> None:
    sink = FileSink(root, state_max_deltas=1)
    sink.open([PROFILES])
    epochs = sink.acquire(GROUP, [TP0, TP1])
    _state_batch(sink, epochs, {TP0: {"a": 1}, TP1: {"z": 1}}, {TP0: 1, TP1: 1})
    _state_batch(sink, epochs, {TP0: {"a": 2}, TP1: {"z": 2}}, {TP0: 2, TP1: 2})  # compacts
    directory = root / "_offsetkeeper" / "state" / GROUP
    committed = _state_files(root)
    assert committed == [f"orders+0+{2:020d}.base.jsonl", f"orders+1+{2:020d}.base.jsonl"]
    # What a kill between the commit and the clean-up leaves, and stray temps.
    leftovers = [
        f"orders+0+{1:020d}.delta.jsonl",
        f"orders+1+{1:020d}.delta.jsonl",
        f".orders+0+{3:020d}.delta.jsonl.4242.abcdef.tmp",
    ]
    for name in leftovers:
        (directory / name).write_text("junk\n")
    assert _state(_reader(root), TP0) == {"a": (2, 1)}
    sink.acquire(GROUP, [TP0])
    assert _state_files(root) == sorted([*committed, f"orders+1+{1:020d}.delta.jsonl"])
    assert _state(sink, TP0) == {"a": (2, 1)}
    sink.close()


def test_state_needs_an_acquired_partition_whose_checkpoint_is_saved_with_it(
    sink: FileSink, root: Path
) -> None:
    sink.begin()
    with pytest.raises(SinkError, match="never acquired"):
        sink.write_state(GROUP, [_change(TP0, "a", 1)])
    sink.rollback()
    epochs = sink.acquire(GROUP, [TP0, TP1])
    sink.begin()
    sink.write_state(GROUP, [_change(TP1, "a", 1)])
    with pytest.raises(SinkError, match="checkpoint is not saved with it"):
        sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)
    sink.rollback()
    assert _state_files(root) == []
    assert not list(root.rglob(".*.tmp"))


def test_two_state_writes_in_one_batch_merge(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    sink.begin()
    sink.write_state(GROUP, [_change(TP0, "a", 1), _change(TP0, "b", 1)])
    sink.write_state(GROUP, [_change(TP0, "b", DELETE), _change(TP0, "c", 3)])
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 1)], epochs)
    sink.commit()
    assert _state(sink, TP0) == {"a": (1, 1), "c": (3, 1)}
    assert _state(_reader(root), TP0) == {"a": (1, 1), "c": (3, 1)}
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]


def test_the_checkpoint_keeps_a_legacy_blob_and_migrate_keeps_the_state(
    sink: FileSink, root: Path
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1}}, {TP0: 1}, blob=b'{"legacy": 1}')
    stored = sink.load_checkpoints(GROUP)[TP0]
    assert (stored.state, stored.state_version) == (b'{"legacy": 1}', 2)
    # An older checkpoint record in the same document: migrate rewrites it, keeping the rest.
    path = root / "_offsetkeeper" / "checkpoints" / "g.json"
    document = json.loads(path.read_text())
    document["checkpoints"].append({**V1_RECORD, "group": GROUP})
    path.write_text(json.dumps(document))
    assert len(sink.migrate_checkpoints()) == 1
    migrated = json.loads(path.read_text())
    assert migrated["state"] == document["state"]
    assert sink.load_checkpoints(GROUP)[TP0].state == b'{"legacy": 1}'
    assert _state(_reader(root), TP0) == {"a": (1, 1)}
    # A checkpoint tool's write (reset, import) keeps the state too.
    sink.begin()
    sink.save_checkpoints(GROUP, [_checkpoint(TP0, 0)], epochs)
    sink.commit()
    assert _state(_reader(root), TP0) == {"a": (1, 1)}


@pytest.mark.parametrize(
    "manifest",
    [
        {"topic": "orders", "partition": 0, "seq": 1, "files": "x", "entries": 0, "value_bytes": 0},
        {
            "topic": "orders",
            "partition": 0,
            "seq": 1,
            "files": ["../x"],
            "entries": 0,
            "value_bytes": 0,
        },
        {
            "topic": "orders",
            "partition": 0,
            "seq": 1,
            "files": [f"orders+1+{1:020d}.delta.jsonl"],
            "entries": 0,
            "value_bytes": 0,
        },
        {
            "topic": "orders",
            "partition": 0,
            "seq": 1,
            "files": [f"orders+0+{2:020d}.delta.jsonl"],
            "entries": 0,
            "value_bytes": 0,
        },
    ],
)
def test_a_hostile_state_manifest_is_a_sink_error(
    sink: FileSink, root: Path, manifest: dict[str, Any]
) -> None:
    path = _write_checkpoint_document(root, GROUP, [])
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "state": [manifest]}))
    with pytest.raises(SinkError, match="state manifest"):
        sink.state_sizes(GROUP)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda text: text.replace('"seq":1', '"seq":9'),  # another file's header
        lambda text: text.rsplit("\n", 2)[0] + "\n",  # a line short
        lambda text: text.replace('"value":"1"', '"value":1'),
        lambda text: text + '{"key": "extra", "value": "2", "version": 1}\n',
    ],
)
def test_a_tampered_state_file_is_a_sink_error(
    sink: FileSink, root: Path, tamper: Callable[[str], str]
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1, "b": 2}}, {TP0: 1})
    (name,) = _state_files(root)
    path = root / "_offsetkeeper" / "state" / GROUP / name
    path.write_text(tamper(path.read_text()))
    with pytest.raises(SinkError, match=r"state file|add up"):
        list(_reader(root).scan_state(GROUP, TP0))


def test_a_commit_that_fails_before_the_document_commits_no_state(
    sink: FileSink, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1}}, {TP0: 1})

    def full_disk(path: Path, data: bytes, **_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sinks._file.write_durably", full_disk)
    with pytest.raises(SinkError, match="batch rolled back"):
        _state_batch(sink, epochs, {TP0: {"a": 2}}, {TP0: 2})
    monkeypatch.undo()
    assert _state(sink, TP0) == {"a": (1, 1)}
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]
    _state_batch(sink, epochs, {TP0: {"a": 3}}, {TP0: 2})
    assert _state(sink, TP0) == _state(_reader(root), TP0) == {"a": (3, 1)}


def test_a_commit_whose_outcome_is_unknown_reads_the_state_again(
    sink: FileSink, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1}}, {TP0: 1})
    real_fsync = file_io.fsync_directory

    def failing_fsync(directory: Path) -> None:
        if directory.name == "checkpoints":
            raise OSError(5, "Input/output error")
        real_fsync(directory)

    monkeypatch.setattr(file_io, "fsync_directory", failing_fsync)
    with pytest.raises(SinkError, match="may or may not be durable"):
        _state_batch(sink, epochs, {TP0: {"a": 2, "b": 2}}, {TP0: 2})
    monkeypatch.undo()
    # Here the document was renamed: the batch is committed, and its files were kept.
    assert _state(sink, TP0) == _state(_reader(root), TP0) == {"a": (2, 1), "b": (2, 1)}
    assert [r["id"] for r in read_committed_rows(root, PROFILES, GROUP)] == ["r1", "r2"]


def test_state_changed_behind_the_owners_back_fences_the_batch(sink: FileSink, root: Path) -> None:
    epochs = sink.acquire(GROUP, [TP0])
    _state_batch(sink, epochs, {TP0: {"a": 1}}, {TP0: 1})
    assert _state(sink, TP0) == {"a": (1, 1)}  # the owner holds its index
    path = root / "_offsetkeeper" / "checkpoints" / "g.json"
    document = json.loads(path.read_text())
    document["state"][0]["seq"] = 7  # as if another writer had committed, without an epoch
    path.write_text(json.dumps(document))
    with pytest.raises(FencedError, match="changed by another writer") as caught:
        _state_batch(sink, epochs, {TP0: {"a": 2}}, {TP0: 2})
    assert caught.value.partitions == frozenset({("orders", 0)})
    assert json.loads(path.read_text()) == document  # nothing written
    assert _state_files(root) == [f"orders+0+{1:020d}.delta.jsonl"]
