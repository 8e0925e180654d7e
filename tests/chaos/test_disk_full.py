"""Chaos: the disk under the sink fills up (issue 19, item 3), for the file sink and SQLite.

Each sink writes to a small tmpfs of its own. A filler file takes all of it but a little, and
the consumer fills the rest mid-run: every commit then meets ENOSPC (SQLite: SQLITE_FULL).

The policy (README, *Sinks*): a full disk is a transient sink failure, `SinkFullError`, logged
as "disk full" with the sink's path (never a row's values). The batch is rolled back and
retried with backoff, and the failure shows on /status.json and /metrics. Once space returns
the run continues. If it does not return within --sink-retry-deadline, the consumer exits 1
with one line that names it; a restart after space is freed continues. Readers see only whole
committed batches throughout. The sink ends with every record exactly once: the app
(tests/apps/chaos.py) is not idempotent, since each process writes rows of its own.

Short form: one fill/free cycle per sink, a few thousand records. Long form (ops/chaos): several
cycles, longer outages, more records. The figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from consumer.engine.crash import CRASH_POINT_ENV
from sinks import FileSink, read_committed_rows
from tests.apps.chaos import EVENTS, LATEST
from tests.chaos.conftest import long_form, scaled
from tests.fixtures.chaos import chaos_event, verify_chaos_sink
from tests.fixtures.file_sink import CommittedFileWatcher, committed_as_sqlite, last_row_per_key
from tests.fixtures.kafka_tools import create_topic, end_offsets, produce, unique_name
from tests.fixtures.ops_http import OPS_ARGS, ops_endpoint
from tests.fixtures.processes import (
    ConsumerProcess,
    run_args,
    run_cli,
    wait_until,
)
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.chaos]

PARTITIONS = 3
APP = "tests.apps.chaos:app"
MOUNT_BYTES = int(scaled(24 << 20, 64 << 20))  # holds every record of the run
WARM_UP_RECORDS = 2_000  # committed before the first fill: readers have rows to see in it
CYCLES = int(scaled(1, 3))
RECORDS_PER_CYCLE = int(scaled(8_000, 40_000))
OUTAGE_S = scaled(4.0, 20.0)
SHORT_DEADLINE_S = 3.0
# What the filler leaves free: the consumer fills it with a few batches of its own.
HEADROOM_BYTES = 256 << 10
BATCH_ARGS = ("--batch-max-records", "500")
EVENT_KEY = re.compile(r"k-\d+")  # a row value of the chaos events: never in a log line


# -- the small disk -------------------------------------------------------------------------------


@dataclass
class SmallDisk:
    """A tmpfs mounted for one test, and a filler file that takes its space."""

    root: Path

    @property
    def filler(self) -> Path:
        return self.root / "filler"

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int) -> None:
        """Grow the filler until only `leave` bytes are free (or the disk is full)."""
        chunk = bytes(1 << 20)
        with self.filler.open("ab") as handle:
            try:
                while (missing := self.free_bytes() - leave) > 0:
                    handle.write(chunk[:missing])
                    handle.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:  # the consumer took the rest meanwhile
                    raise

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A tmpfs of MOUNT_BYTES, unmounted at teardown even on failure (after `consumers`,
    which depends on it, has stopped every process that could hold it busy)."""
    root = tmp_path / "small-disk"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={MOUNT_BYTES},mode=0755", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root): {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        if subprocess.run(["umount", str(root)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=True)


@pytest.fixture
def consumers(small_disk: SmallDisk) -> Iterator[list[ConsumerProcess]]:
    """Every consumer process a test starts. The conftest's `consumers`, made to depend on
    the disk: its processes are stopped before the disk is unmounted (a process still writing
    there would keep the mount busy)."""
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.stop_if_running()


# -- the two sinks, as their readers see them ---------------------------------------------------


class SinkSide(Protocol):
    kind: str
    url: str
    code: tuple[str, str]  # how /status.json names a full disk: (label, code)

    def checkpoints(self, group: str) -> dict[int, int]: ...

    def reader_view(self, group: str) -> tuple[dict[int, int], dict[int, list[int]]]:
        """What a reader sees at one instant: each partition's checkpoint, and the source
        offsets of the chaos_events rows it can read."""
        ...

    def exactly_once(self, bootstrap: str, topic: str, group: str) -> dict[str, int]: ...

    def temp_files(self) -> list[Path]: ...


@dataclass
class FileSide:
    root: Path
    kind: str = "file"
    code: tuple[str, str] = ("errno", "ENOSPC")

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def checkpoints(self, group: str) -> dict[int, int]:
        reader = FileSink(self.root)
        reader.open_existing()
        try:
            stored = reader.load_checkpoints(group)
        finally:
            reader.close()
        return {tp.partition: cp.next_offset for tp, cp in stored.items()}

    def reader_view(self, group: str) -> tuple[dict[int, int], dict[int, list[int]]]:
        # The reader protocol: the checkpoint document first, then the files below it
        # (checked against their recorded checksums).
        checkpoints = self.checkpoints(group)
        offsets: dict[int, list[int]] = {}
        for row in read_committed_rows(self.root, EVENTS, group):
            offsets.setdefault(int(row["source_partition"]), []).append(int(row["source_offset"]))
        return checkpoints, offsets

    def exactly_once(self, bootstrap: str, topic: str, group: str) -> dict[str, int]:
        db = committed_as_sqlite(self.root, group, (EVENTS, LATEST))
        last_row_per_key(db, LATEST)
        return verify_chaos_sink(
            bootstrap, topic, PARTITIONS, lambda sql: db.execute(sql).fetchall()
        )

    def temp_files(self) -> list[Path]:
        return sorted(self.root.rglob(".*.tmp"))


@dataclass
class SqliteSide:
    db: Path
    kind: str = "sqlite"
    code: tuple[str, str] = ("code", "SQLITE_FULL")

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def _read(self, *queries: str) -> list[list[tuple[Any, ...]]]:
        """`queries` in one read transaction: one snapshot of the database."""
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            connection.execute("BEGIN")
            return [connection.execute(sql).fetchall() for sql in queries]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return [[] for _ in queries]
            raise
        finally:
            connection.close()

    def checkpoints(self, group: str) -> dict[int, int]:
        if not self.db.exists():
            return {}
        [rows] = self._read(_checkpoints_sql(group))
        return {int(partition): int(offset) for partition, offset in rows}

    def reader_view(self, group: str) -> tuple[dict[int, int], dict[int, list[int]]]:
        stored, rows = self._read(
            _checkpoints_sql(group), "SELECT source_partition, source_offset FROM chaos_events"
        )
        offsets: dict[int, list[int]] = {}
        for partition, offset in rows:
            offsets.setdefault(int(partition), []).append(int(offset))
        return {int(p): int(o) for p, o in stored}, offsets

    def exactly_once(self, bootstrap: str, topic: str, group: str) -> dict[str, int]:
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return verify_chaos_sink(
                bootstrap, topic, PARTITIONS, lambda sql: connection.execute(sql).fetchall()
            )
        finally:
            connection.close()

    def temp_files(self) -> list[Path]:
        return []  # SQLite keeps no temp files of its own beside its -wal and -shm


def _checkpoints_sql(group: str) -> str:
    return f"SELECT partition, next_offset FROM offsetkeeper_checkpoints WHERE group_id = '{group}'"


@pytest.fixture(params=["file", "sqlite"])
def side(request: pytest.FixtureRequest, small_disk: SmallDisk) -> SinkSide:
    if request.param == "file":
        return FileSide(small_disk.root / "out")
    return SqliteSide(small_disk.root / "sink.db")


# -- checks -------------------------------------------------------------------------------------


def assert_only_whole_batches(side: SinkSide, group: str) -> int:
    """A reader sees, per partition, exactly the records below its checkpoint, each once:
    nothing of a batch that did not commit, no record twice. Returns the rows seen."""
    checkpoints, offsets = side.reader_view(group)
    for partition in set(checkpoints) | set(offsets):
        seen = sorted(offsets.get(partition, []))
        expected = list(range(checkpoints.get(partition, 0)))
        assert seen == expected, (
            f"{side.kind}: partition {partition} shows {len(seen)} rows"
            f" (offsets {seen[:1]}..{seen[-1:]}), checkpoint {checkpoints.get(partition)}"
        )
    return sum(len(v) for v in offsets.values())


def full_disk_retries(process: ConsumerProcess) -> list[dict[str, Any]]:
    return [
        e
        for e in process.events()
        if e.get("event") == "sink_retry" and e.get("error_type") == "SinkFullError"
    ]


def assert_clear_disk_full_event(event: dict[str, Any], side: SinkSide, disk: SmallDisk) -> None:
    error = str(event["error"])
    assert error.startswith("disk full: "), error
    assert str(disk.root) in error, f"the error does not name the sink's path: {error}"
    assert "=" + repr(side.code[1]) in error.replace(" ", ""), error
    assert not EVENT_KEY.search(error), f"a row value in the log: {error}"


def assert_health_reports_a_full_disk(process: ConsumerProcess, side: SinkSide) -> float:
    """/status.json names the failure by class and code; /metrics counts the retries.
    Returns the sink retries counted by the metric."""
    endpoint = ops_endpoint(process)
    status, body = endpoint.get("/status.json")
    assert status == 200, body
    failure = body["sink"]["failure"]
    assert failure is not None, body["sink"]
    assert failure["error"] == "SinkFullError", failure
    assert list(side.code) in [list(code) for code in failure["codes"]], failure
    assert body["sink"]["failing_for_s"] > 0
    scrape = endpoint.scrape()
    retries = sum(
        value
        for (name, _labels), value in scrape.samples.items()
        if name == "offsetkeeper_sink_retries_total"
    )
    assert retries >= 1
    failing = scrape.value("offsetkeeper_sink_failing_seconds")
    assert failing is not None
    assert failing > 0
    return retries


def checkpoint_verify(
    kafka: Service, side: SinkSide, group: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        kafka.address,
        "checkpoint",
        "verify",
        "--sink",
        side.url,
        "--group",
        group,
        "--log-format",
        "json",
    )


@dataclass
class Outage:
    """One fill/free cycle, as measured."""

    records_before: int  # committed when the disk filled
    held_s: float = 0.0  # from the first "disk full" to the filler's deletion
    retries: int = 0  # "disk full" retries logged
    recovery_s: float = 0.0  # from the deletion to the next commit
    rows_read: list[int] = field(default_factory=list)  # rows readers saw during the outage


@dataclass
class DiskFullRun:
    """One topic and group consumed into `side` on `disk`, and the consumers started for it."""

    kafka: Service
    disk: SmallDisk
    side: SinkSide
    consumers: list[ConsumerProcess]
    logs: Path
    topic: str = field(default_factory=lambda: unique_name("disk-full"))
    group: str = field(default_factory=lambda: unique_name("disk-full"))
    produced: int = 0

    def __post_init__(self) -> None:
        create_topic(self.kafka.address, self.topic, PARTITIONS)

    def produce(self, count: int) -> None:
        first, self.produced = self.produced, self.produced + count
        events = (chaos_event(i, 20_000) for i in range(first, self.produced))
        produce(self.kafka.address, self.topic, events)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> ConsumerProcess:
        args = run_args(
            APP, self.kafka.address, self.group, self.topic, self.side.url, *BATCH_ARGS, *extra
        )
        process = ConsumerProcess(
            [*args, *OPS_ARGS], self.logs / f"consumer-{len(self.consumers) + 1}.log", env=env
        )
        self.consumers.append(process)
        return process

    def committed(self) -> dict[int, int]:
        return self.side.checkpoints(self.group)

    def wait_caught_up(self, process: ConsumerProcess) -> dict[int, int]:
        ends = end_offsets(self.kafka.address, self.topic, PARTITIONS)
        wait_until(
            lambda: self.committed() == ends or not process.alive(),
            timeout=180,
            what="the checkpoints to reach the end offsets",
        )
        assert process.alive(), process.log_path.read_text()[-3000:]
        return ends

    def fill_mid_run(self, process: ConsumerProcess, records: int) -> tuple[float, dict[int, int]]:
        """Fill the disk but HEADROOM_BYTES, produce `records` and wait until the consumer has
        filled the rest: (when its first commit failed, the checkpoints then)."""
        retries_before = len(full_disk_retries(process))
        self.disk.fill(leave=HEADROOM_BYTES)
        self.produce(records)
        wait_until(
            lambda: len(full_disk_retries(process)) > retries_before or not process.alive(),
            timeout=120,
            what="the consumer to fill the disk",
        )
        full_at = time.monotonic()
        retries = full_disk_retries(process)
        assert len(retries) > retries_before, process.log_path.read_text()[-3000:]
        assert_clear_disk_full_event(retries[retries_before], self.side, self.disk)
        at_full = self.committed()
        assert 0 < sum(at_full.values()) < self.produced, "the disk did not fill mid-run"
        return full_at, at_full

    def verify_exactly_once(self, ends: dict[int, int]) -> None:
        counts = self.side.exactly_once(self.kafka.address, self.topic, self.group)
        assert counts["records"] == self.produced
        assert self.committed() == ends
        assert self.side.temp_files() == []


def outage_cycle(run: DiskFullRun, process: ConsumerProcess) -> Outage:
    """Fill the disk mid-run, hold the outage for OUTAGE_S while readers and health are
    checked, free the space and measure the recovery."""
    retries_before = len(full_disk_retries(process))
    full_at, at_full = run.fill_mid_run(process, RECORDS_PER_CYCLE)
    outage = Outage(sum(at_full.values()))
    assert_health_reports_a_full_disk(process, run.side)
    verify = checkpoint_verify(run.kafka, run.side, run.group)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    while not outage.rows_read or time.monotonic() - full_at < OUTAGE_S:
        outage.rows_read.append(assert_only_whole_batches(run.side, run.group))
        time.sleep(0.5)
    assert run.committed() == at_full, "a commit succeeded on a full disk"
    assert process.alive(), process.log_path.read_text()[-3000:]

    run.disk.release()
    freed_at = time.monotonic()
    outage.held_s = freed_at - full_at
    wait_until(
        lambda: run.committed() != at_full or not process.alive(),
        timeout=60,
        interval=0.05,
        what="the first commit after space returned",
    )
    outage.recovery_s = time.monotonic() - freed_at
    outage.retries = len(full_disk_retries(process)) - retries_before
    run.wait_caught_up(process)
    assert_only_whole_batches(run.side, run.group)
    return outage


def form() -> str:
    return "long" if long_form() else "short"


# -- the tests --------------------------------------------------------------------------------


def test_a_full_disk_is_waited_out_and_the_run_continues_exactly_once(
    kafka: Service,
    small_disk: SmallDisk,
    side: SinkSide,
    consumers: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    run = DiskFullRun(kafka, small_disk, side, consumers, tmp_path)
    run.produce(WARM_UP_RECORDS)
    process = run.start()
    watcher = (
        CommittedFileWatcher(side.root, EVENTS, run.group, interval_s=0.05).start()
        if isinstance(side, FileSide)
        else None
    )
    run.wait_caught_up(process)
    outages = [outage_cycle(run, process) for _cycle in range(CYCLES)]

    ends = run.wait_caught_up(process)
    assert process.terminate() == 0, process.log_path.read_text()[-3000:]
    if watcher is not None:
        watcher.stop()
        assert not watcher.violations, watcher.violations[:5]
    run.verify_exactly_once(ends)
    print(
        f"\ndisk full ({side.kind}, {form()} form): {run.produced} records exactly once,"
        f" {len(outages)} outage(s), {time.monotonic() - began:.1f} s in all"
        + (f", the file reader polled {watcher.polls} times" if watcher is not None else "")
    )
    for number, outage in enumerate(outages, 1):
        print(
            f"  outage {number}: full at {outage.records_before} committed records,"
            f" held {outage.held_s:.1f} s, {outage.retries} disk-full retries,"
            f" recovery {outage.recovery_s:.2f} s after the filler was deleted,"
            f" readers saw {min(outage.rows_read)}..{max(outage.rows_read)} rows"
            f" in {len(outage.rows_read)} reads, all whole batches"
        )


def test_a_disk_full_past_the_retry_deadline_exits_1_and_restarts_end_exactly_once(
    kafka: Service,
    small_disk: SmallDisk,
    side: SinkSide,
    consumers: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    run = DiskFullRun(kafka, small_disk, side, consumers, tmp_path)
    run.produce(WARM_UP_RECORDS)
    failing = run.start("--sink-retry-deadline", str(SHORT_DEADLINE_S))
    run.wait_caught_up(failing)
    full_at, at_full = run.fill_mid_run(failing, RECORDS_PER_CYCLE)

    code = failing.wait(timeout=SHORT_DEADLINE_S + 60)
    exited_after = time.monotonic() - full_at
    output = failing.log_path.read_text()
    assert code == 1, output[-3000:]
    # It waited the deadline out (measured from the first failure the test saw, up to a poll
    # late), with a last try at the deadline.
    assert exited_after >= SHORT_DEADLINE_S - 0.5, exited_after
    plain = [line for line in output.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, plain
    assert plain[0].startswith("offsetkeeper: error: disk full: "), plain[0]
    assert str(small_disk.root) in plain[0], plain[0]
    events = failing.events()
    [gave_up] = [e for e in events if e.get("event") == "sink_gave_up"]
    [failed] = [e for e in events if e.get("event") == "offsetkeeper_failed"]
    assert gave_up["error_type"] == failed["error_type"] == "SinkFullError"
    assert_clear_disk_full_event(failed, side, small_disk)
    retries = len(full_disk_retries(failing))
    # Nothing of the rolled-back batch is visible, nothing half-written is left behind.
    assert run.committed() == at_full
    rows_seen = assert_only_whole_batches(side, run.group)
    assert side.temp_files() == []

    small_disk.release()
    left_behind = crash_mid_batch(run)
    restarted_at = time.monotonic()
    restart = run.start()
    ends = run.wait_caught_up(restart)
    caught_up_s = time.monotonic() - restarted_at
    assert restart.terminate() == 0, restart.log_path.read_text()[-3000:]
    removed = [
        e
        for e in restart.events()
        if e.get("event") == "file_sink_removed_uncommitted" and e.get("temp")
    ]
    assert len(removed) == len(left_behind), (removed, left_behind)
    run.verify_exactly_once(ends)
    print(
        f"\ndisk full past --sink-retry-deadline {SHORT_DEADLINE_S:g} ({side.kind}, {form()}"
        f" form): full at {sum(at_full.values())} committed records, exit 1 after"
        f" {exited_after:.1f} s and {retries} disk-full retries; readers saw {rows_seen} rows,"
        f" whole batches; space freed, a restart killed mid-batch left"
        + (
            f" {len(left_behind)} temp file(s), which the next start removed;"
            if isinstance(side, FileSide)
            else " an open transaction, which readers never saw;"
        )
        + f" it caught up in {caught_up_s:.1f} s: {run.produced} records exactly once"
    )


def crash_mid_batch(run: DiskFullRun) -> list[Path]:
    """A consumer killed (SIGKILL) in the middle of its first batch, its rows written and
    nothing committed; returns the temp files it left (the file sink's rows, not renamed)."""
    before = run.committed()
    crashing = run.start(env={CRASH_POINT_ENV: "after-rows"})
    assert crashing.wait(timeout=120) == -9, crashing.log_path.read_text()[-3000:]
    left_behind = run.side.temp_files()
    if isinstance(run.side, FileSide):
        assert left_behind, "the killed batch left no temp file"
    assert run.committed() == before
    assert_only_whole_batches(run.side, run.group)
    return left_behind
