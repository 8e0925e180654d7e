"""A full disk is a transient sink failure: `SinkFullError` ("disk full"), the batch rolled
back with nothing of it visible, and the same batch commits once space returns. Other errors
keep their classes and messages."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumer import (
    Checkpoint,
    RowsOrigin,
    SinkError,
    SinkFullError,
    Table,
    TopicPartition,
)
from consumer.engine.observer import NullObserver
from consumer.engine.retry import Retrier, RetryPolicy
from consumer.runtime.health import SinkFailure
from sinks import FileSink, SqliteSink, committed_files, read_committed_rows
from sinks._file_io import file_system_error
from sinks._postgres import PostgresSink
from tests.fixtures.fake_backend import FakeClock
from tests.fixtures.sqlite_db import checkpoints, query

GROUP = "g"
TP = TopicPartition("orders", 0)
ROWS = Table(name="rows", columns={"id": "text", "payload": "text"}, key=("id",))
# 15 digests stay inline in the checkpoint document; the 16th file's batch seals a segment.
BATCHES_BEFORE = 15
BATCH = 10


def _checkpoint(next_offset: int) -> Checkpoint:
    return Checkpoint(
        group=GROUP,
        topic=TP.topic,
        partition=TP.partition,
        next_offset=next_offset,
        updated_at=datetime.now(tz=UTC),
    )


def _rows(first: int, count: int, payload: str = "p") -> list[dict[str, Any]]:
    return [{"id": f"r{offset}", "payload": payload} for offset in range(first, first + count)]


def _commit(
    sink: FileSink | SqliteSink, epochs: dict[TopicPartition, int], first: int, count: int
) -> None:
    """One batch of `count` records from offset `first`, one row each, driven the way the
    engine drives a sink (rolled back on any failure)."""
    sink.begin()
    try:
        sink.write_rows(ROWS, _rows(first, count), RowsOrigin(GROUP, TP, first, first + count))
        sink.save_checkpoints(GROUP, [_checkpoint(first + count)], epochs)
        sink.commit()
    except BaseException:
        sink.rollback()
        raise


# -- the classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_left_is_a_sink_full_error_naming_the_sink_and_the_errno(code: int) -> None:
    cause = OSError(code, os.strerror(code), "/data/out/.x.tmp")

    error = file_system_error("cannot write rows", cause, sink="file:///data/out", table="t")

    assert isinstance(error, SinkFullError)
    assert isinstance(error, SinkError)  # retried like every sink failure
    assert error.message == "disk full: cannot write rows"
    assert error.context == {
        "sink": "file:///data/out",
        "table": "t",
        "errno": errno.errorcode[code],
        "path": "/data/out/.x.tmp",
        "reason": str(cause),
    }


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.EROFS])
def test_other_file_system_errors_stay_plain_sink_errors_as_before(code: int) -> None:
    cause = OSError(code, os.strerror(code))

    error = file_system_error("cannot write rows", cause, sink="file:///data/out", table="t")

    assert type(error) is SinkError
    assert str(error) == (
        f"cannot write rows (sink='file:///data/out', table='t', reason={str(cause)!r})"
    )


def test_sqlite_full_is_a_sink_full_error_and_a_locked_database_is_not(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "db.sqlite", busy_timeout_s=0.05)
    full = sqlite3.connect(":memory:")
    try:
        full.execute("CREATE TABLE t (x)")
        full.execute("PRAGMA max_page_count = 2")
        with pytest.raises(sqlite3.OperationalError) as caught:
            full.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 100)
        with pytest.raises(SinkFullError) as mapped, sink._mapped("commit failed", rollback=False):
            raise caught.value
        assert mapped.value.message == "disk full: commit failed"
        assert mapped.value.context["code"] == "SQLITE_FULL"
        assert mapped.value.context["sink"] == sink.description
    finally:
        full.close()

    sink.open([ROWS])
    blocker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SinkError) as locked:
            sink.begin()
        assert not isinstance(locked.value, SinkFullError)
        assert "disk full" not in str(locked.value)
        assert locked.value.context["code"] == "SQLITE_BUSY"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        sink.close()


def test_postgresql_disk_full_is_a_sink_full_error_and_other_errors_are_not() -> None:
    sink = PostgresSink("postgresql://app:secret@127.0.0.1:1/db")

    with pytest.raises(SinkFullError) as full, sink._mapped("commit failed", rollback=False):
        raise psycopg.errors.DiskFull("could not extend file: No space left on device")
    with pytest.raises(SinkError) as other, sink._mapped("commit failed", rollback=False):
        raise psycopg.errors.SerializationFailure("could not serialize access")

    assert full.value.message == "disk full: commit failed"
    assert full.value.context["sqlstate"] == "53100"
    assert type(other.value) is SinkError
    assert other.value.message == "commit failed"


def test_health_names_a_full_disk_by_its_class_and_code_never_its_message() -> None:
    cause = OSError(errno.ENOSPC, "No space left on device", "/secret/row-value")
    try:
        raise file_system_error("cannot write rows", cause, sink="file:///data/out") from cause
    except SinkError as raised:
        failure = SinkFailure.of("commit", raised)

    assert failure.describe() == "commit failed with SinkFullError (OSError, errno ENOSPC)"
    assert "secret" not in repr(failure)


# -- the file sink: ENOSPC at each point of a commit ------------------------------------------


def _open_fds_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def file_sink(root: Path) -> Iterator[FileSink]:
    sink = FileSink(root, lock_timeout_s=1.0)
    sink.open([ROWS])
    yield sink
    sink.close()


def _fail_fsync_of(monkeypatch: pytest.MonkeyPatch, where: Callable[[str], bool]) -> list[str]:
    """ENOSPC from fsync of every temp file whose path `where` matches (the page cache took the
    bytes, the file system has no blocks for them); returns the paths it failed."""
    real_fsync = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        path = _open_fds_path(fd)
        if path.endswith(".tmp") and where(path):
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


COMMIT_POINTS = {
    "write_rows": lambda path: f"/{ROWS.name}/" in path,
    "save_checkpoints": lambda path: "/_offsetkeeper/digests/" in path,
    "commit": lambda path: "/_offsetkeeper/checkpoints/" in path,
}


@pytest.mark.parametrize("point", list(COMMIT_POINTS))
def test_a_full_disk_at_each_point_of_a_file_commit_leaves_nothing_and_retries_once(
    point: str, file_sink: FileSink, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = file_sink.acquire(GROUP, [TP])
    for batch in range(BATCHES_BEFORE):
        _commit(file_sink, epochs, batch * BATCH, BATCH)
    committed = BATCHES_BEFORE * BATCH
    before = [f.path.name for f in committed_files(root, ROWS, GROUP, verify=True)]
    failed = _fail_fsync_of(monkeypatch, COMMIT_POINTS[point])

    with pytest.raises(SinkFullError) as caught:
        _commit(file_sink, epochs, committed, BATCH)

    assert failed, f"no write was failed at {point}"
    assert caught.value.message.startswith("disk full: ")
    assert caught.value.context["sink"] == file_sink.description
    assert caught.value.context["errno"] == "ENOSPC"
    # Nothing of the batch is visible, nothing half-written is left behind.
    assert [f.path.name for f in committed_files(root, ROWS, GROUP, verify=True)] == before
    assert file_sink.load_checkpoints(GROUP)[TP].next_offset == committed
    assert _temp_files(root) == []
    data = sorted(p.name for p in (root / ROWS.name / GROUP).iterdir())
    assert data == before, "a data file beyond the checkpoint was left"

    monkeypatch.undo()  # space returns: the engine retries the same batch
    _commit(file_sink, epochs, committed, BATCH)

    ids = [row["id"] for row in read_committed_rows(root, ROWS, GROUP)]
    assert ids == [f"r{offset}" for offset in range(committed + BATCH)]
    assert file_sink.load_checkpoints(GROUP)[TP].next_offset == committed + BATCH


def test_a_full_disk_at_acquire_keeps_the_epochs(
    file_sink: FileSink, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = file_sink.acquire(GROUP, [TP])
    _fail_fsync_of(monkeypatch, lambda path: "/_offsetkeeper/leases/" in path)

    with pytest.raises(SinkFullError, match="disk full: cannot acquire partition epochs"):
        file_sink.acquire(GROUP, [TP])

    monkeypatch.undo()
    assert _temp_files(root) == []
    _commit(file_sink, epochs, 0, BATCH)  # still the owner: the epoch did not move
    assert file_sink.acquire(GROUP, [TP]) == {TP: epochs[TP] + 1}


# -- SQLite: a real SQLITE_FULL (the database may not grow) ------------------------------------


def test_a_full_sqlite_database_rolls_back_and_the_same_batch_commits_once_space_returns(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite"
    sink = SqliteSink(db)
    sink.open([ROWS])
    try:
        epochs = sink.acquire(GROUP, [TP])
        _commit(sink, epochs, 0, BATCH)
        pages = sink._db.execute("PRAGMA page_count").fetchone()[0]
        sink._db.execute(f"PRAGMA max_page_count = {pages}")  # as if the disk were full

        with pytest.raises(SinkFullError) as caught:
            _commit(sink, epochs, BATCH, 2000)

        assert caught.value.message.startswith("disk full: ")
        assert caught.value.context["code"] == "SQLITE_FULL"
        assert caught.value.context["sink"] == f"sqlite:///{db}"
        # Another reader sees the first batch only.
        assert query(db, "SELECT count(*) FROM rows") == [(BATCH,)]
        assert checkpoints(db, GROUP) == {(TP.topic, TP.partition): BATCH}

        sink._db.execute("PRAGMA max_page_count = 1073741823")
        _commit(sink, epochs, BATCH, 2000)
    finally:
        sink.close()
    assert query(db, "SELECT count(*), count(DISTINCT id) FROM rows") == [(2010, 2010)]
    assert checkpoints(db, GROUP) == {(TP.topic, TP.partition): 2010}


# -- the retries: space that returns before the deadline is used --------------------------------


def _full_until(clock: FakeClock, returns_at: float) -> Callable[[], str]:
    def commit() -> str:
        if clock.now() < returns_at:
            raise SinkFullError("disk full: commit failed", sink="file:///data/out")
        return "committed"

    return commit


def test_space_freed_just_before_the_deadline_is_used_by_a_last_try_at_the_deadline() -> None:
    clock = FakeClock()
    retrier = Retrier(
        RetryPolicy(deadline_s=3.0), clock=clock.now, sleep=clock.sleep, observer=NullObserver()
    )
    started = clock.now()

    assert retrier.sink("commit", _full_until(clock, started + 2.9)) == "committed"

    # 0.1 s doubling: tries at 0, 0.1, 0.3, 0.7, 1.5; the next wait is cut to the deadline.
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.5])
    assert clock.now() - started == pytest.approx(3.0)


def test_a_disk_still_full_at_the_deadline_is_given_up_on_there() -> None:
    clock = FakeClock()
    retrier = Retrier(
        RetryPolicy(deadline_s=3.0), clock=clock.now, sleep=clock.sleep, observer=NullObserver()
    )
    started = clock.now()

    with pytest.raises(SinkFullError):
        retrier.sink("commit", _full_until(clock, started + 3.5))

    assert clock.now() - started == pytest.approx(3.0)
    assert len(clock.sleeps) == 5
