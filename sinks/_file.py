"""File sink: JSON Lines data files renamed into place, then a checkpoint file replaced after them.

Layout of `file:///DIR` (group and job names are percent-encoded to be file-system safe):

    DIR/<table>/<group>/<topic>+<partition>+<first offset:020d>+<last offset:020d>.jsonl
    DIR/_offsetkeeper/lock                   flock'ed by every mutation (the kernel drops it
                                             when the holder dies)
    DIR/_offsetkeeper/checkpoints/<group>.json   the group's checkpoints, one JSON document
    DIR/_offsetkeeper/leases/<group>.json        the group's fencing epochs
    DIR/_offsetkeeper/jobs/<job>.json            replay job documents

One batch, per the `Sink` contract:

    write_rows       one hidden temp file per (table, partition) in the data file's directory,
                     written, flushed and fsynced (outside the lock: the slow part)
    save_checkpoints take the lock; refuse stale epochs (FencedError) and batches that start
                     below the stored checkpoint (they would duplicate committed output); merge
                     the new checkpoints into the group's document
    commit           rename every temp file into place, fsync the directories, then replace
                     the checkpoint document (temp, fsync, rename, fsync); release the lock

The checkpoint rename is the commit point. A crash before it leaves data files whose last
offset is at or beyond the checkpoint: readers ignore them, and `acquire` (which every new owner
calls, under the lock) deletes them with any stale temp files, so the batch is rewritten once.
A committed file (last offset below the checkpoint) is never removed or changed afterwards,
unless an operator moves a checkpoint backwards (`offsetkeeper checkpoint reset`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    ConfigError,
    CrashInjector,
    RowsOrigin,
    SinkError,
    Table,
    TopicPartition,
    check_epochs,
    decode_checkpoint,
    encode_checkpoint,
)

log = structlog.get_logger("offsetkeeper.sink.file")

OWN_DIR = "_offsetkeeper"
DATA_SUFFIX = ".jsonl"
CHECKPOINT_KIND = "offsetkeeper-file-checkpoints"
LEASE_KIND = "offsetkeeper-file-leases"
DOCUMENT_VERSION = 1  # of the checkpoint/lease documents; each checkpoint has its own format
# Kills the process inside commit() after the data files are renamed and before the checkpoint
# is replaced (tests only; see consumer/_commit.py CRASH_POINTS).
CRASH_AFTER_DATA = "file-after-data"

# Kafka topic names are [A-Za-z0-9._-], so "+" separates the fields unambiguously.
_DATA_NAME = re.compile(
    r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+(?P<last>\d{20})"
    + re.escape(DATA_SUFFIX)
    + "$"
)
# ".<final name>.<pid>.<random>.tmp": hidden, and names the data file it would become.
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.\d+\.[0-9a-f]+\.tmp$")


def safe_name(name: str) -> str:
    """`name` as one file name: percent-encoded, and never hidden or a `.`/`..` entry."""
    if not name:
        raise ConfigError("an empty name cannot name a file")
    encoded = quote(name, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def data_file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    return f"{topic}+{partition}+{first_offset:020d}+{last_offset:020d}{DATA_SUFFIX}"


@dataclass(frozen=True, slots=True)
class DataFile:
    """One committed (or, before the checkpoint moves past it, pending) data file."""

    path: Path
    topic: str
    partition: int
    first_offset: int
    last_offset: int

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def _parse_data_file(path: Path) -> DataFile | None:
    match = _DATA_NAME.match(path.name)
    if match is None:
        return None
    return DataFile(
        path=path,
        topic=match["topic"],
        partition=int(match["partition"]),
        first_offset=int(match["first"]),
        last_offset=int(match["last"]),
    )


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(directory: Path) -> None:
    """Create `directory` (and parents) so that the new entries survive a power loss too."""
    if directory.is_dir():
        return
    _make_directory(directory.parent)
    with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
        directory.mkdir()
    _fsync_directory(directory.parent)


def _write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync the directory."""
    temp = _temp_path(path)
    try:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:  # written atomically, so only by hand
        raise SinkError("file sink document is not valid JSON", path=str(path)) from exc


# -- rows <-> JSON Lines ---------------------------------------------------------------------


def _encode_value(column_type: str, value: Any) -> Any:
    if value is None:
        return None
    if column_type == "bytes":
        return base64.b64encode(bytes(value)).decode("ascii")
    if column_type == "double" and not math.isfinite(value):
        return None  # JSON has no NaN or infinities
    return value


def encode_rows(table: Table, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """JSON Lines of `rows`: the table's columns in declared order, bytes as base64."""
    columns = tuple(table.columns.items())
    lines = []
    for row in rows:
        record = {name: _encode_value(kind, row.get(name)) for name, kind in columns}
        try:
            lines.append(
                json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            )
        except (TypeError, ValueError) as exc:
            raise SinkError(
                "a row cannot be written as JSON", table=table.name, reason=str(exc)
            ) from exc
    return ("\n".join(lines) + "\n").encode() if lines else b""


def decode_line(line: bytes | str, table: Table | None = None) -> dict[str, Any]:
    """One row from a data file line; with `table`, bytes columns are decoded from base64."""
    row: dict[str, Any] = json.loads(line)
    if table is not None:
        for name, kind in table.columns.items():
            if kind == "bytes" and row.get(name) is not None:
                row[name] = base64.b64decode(row[name])
    return row


# -- checkpoint and lease documents ----------------------------------------------------------


def _checkpoint_to_json(checkpoint: Checkpoint) -> dict[str, Any]:
    record = encode_checkpoint(checkpoint)
    record["updated_at"] = int(checkpoint.updated_at.timestamp() * 1000)
    if checkpoint.state is not None:
        record["state"] = base64.b64encode(checkpoint.state).decode("ascii")
    return record


def _checkpoint_from_json(record: Any, *, path: Path) -> Checkpoint:
    if not isinstance(record, dict):
        raise SinkError("checkpoint entry is not an object", path=str(path))
    state = record.get("state")
    return decode_checkpoint(
        {**record, "state": None if state is None else base64.b64decode(state)}
    )


def _checkpoint_document(group: str, checkpoints: Iterable[Checkpoint]) -> bytes:
    ordered = sorted(checkpoints, key=lambda cp: cp.topic_partition)
    document = {
        "kind": CHECKPOINT_KIND,
        "document_version": DOCUMENT_VERSION,
        "group": group,
        "checkpoints": [_checkpoint_to_json(cp) for cp in ordered],
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def read_checkpoint_document(path: Path) -> tuple[str, dict[TopicPartition, Checkpoint]] | None:
    """(group, checkpoints) from a checkpoint document; None if there is none. Older checkpoint
    formats are upgraded in memory; a newer one raises CheckpointFormatError."""
    document = _read_json(path)
    if document is None:
        return None
    if not isinstance(document, dict) or document.get("kind") != CHECKPOINT_KIND:
        raise SinkError("not an offsetkeeper checkpoint document", path=str(path))
    if document.get("document_version") != DOCUMENT_VERSION:
        raise SinkError(
            "unknown checkpoint document version",
            path=str(path),
            version=document.get("document_version"),
            supported_version=DOCUMENT_VERSION,
        )
    checkpoints = [
        _checkpoint_from_json(record, path=path) for record in document.get("checkpoints", [])
    ]
    return str(document["group"]), {cp.topic_partition: cp for cp in checkpoints}


def _read_epochs(path: Path) -> dict[TopicPartition, int]:
    document = _read_json(path)
    if document is None:
        return {}
    if not isinstance(document, dict) or document.get("kind") != LEASE_KIND:
        raise SinkError("not an offsetkeeper lease document", path=str(path))
    return {
        TopicPartition(str(entry["topic"]), int(entry["partition"])): int(entry["epoch"])
        for entry in document.get("epochs", [])
    }


def _epochs_document(group: str, epochs: Mapping[TopicPartition, int]) -> bytes:
    document = {
        "kind": LEASE_KIND,
        "document_version": DOCUMENT_VERSION,
        "group": group,
        "epochs": [
            {"topic": tp.topic, "partition": tp.partition, "epoch": epoch}
            for tp, epoch in sorted(epochs.items())
        ],
    }
    return (json.dumps(document, indent=1) + "\n").encode()


# -- the reader ------------------------------------------------------------------------------


def committed_files(directory: str | Path, table: str | Table, group: str) -> list[DataFile]:
    """The data files of `table` that `group` committed, per partition in offset order.

    The reader protocol: read the group's checkpoint document FIRST, then list the directory,
    and take only files whose last offset is below their partition's `next_offset`. Such a file
    is complete and is never removed; anything else (temp files, files a crash left beyond the
    checkpoint) is ignored.
    """
    root = Path(directory)
    name = table.name if isinstance(table, Table) else table
    stored = read_checkpoint_document(root / OWN_DIR / "checkpoints" / f"{safe_name(group)}.json")
    if stored is None:
        return []
    next_offsets = {tp: cp.next_offset for tp, cp in stored[1].items()}
    try:
        entries = list((root / name / safe_name(group)).iterdir())
    except FileNotFoundError:
        return []
    files = []
    for entry in entries:
        parsed = _parse_data_file(entry)
        if parsed is not None and parsed.last_offset < next_offsets.get(parsed.topic_partition, 0):
            files.append(parsed)
    return sorted(files, key=lambda f: (f.topic, f.partition, f.first_offset))


def read_committed_rows(
    directory: str | Path, table: str | Table, group: str
) -> Iterator[dict[str, Any]]:
    """Every committed row of `table` written by `group`, per partition in offset order (see
    `committed_files`). With a `Table`, bytes columns come back as bytes, else as base64."""
    decode_as = table if isinstance(table, Table) else None
    for data_file in committed_files(directory, table, group):
        try:
            content = data_file.path.read_bytes()
        except OSError as exc:
            raise SinkError(
                "a committed data file cannot be read (was a checkpoint moved back?)",
                path=str(data_file.path),
                reason=str(exc),
            ) from exc
        for line in content.splitlines():
            yield decode_line(line, decode_as)


# -- the lock --------------------------------------------------------------------------------


class _DirectoryLock:
    """An exclusive flock on DIR/_offsetkeeper/lock, waited for up to a timeout. The kernel
    releases it when the holding process dies, so a crash never leaves the directory locked."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        # A new open file description per acquisition: flock excludes other sinks in this
        # process too, not only other processes.
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SinkError(
                        "the file sink's lock is held by another writer",
                        lock=str(self._path),
                        waited_s=self._timeout_s,
                    ) from None
                time.sleep(0.005)
            else:
                self._fd = fd
                return

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock


@dataclass(slots=True)
class _PendingFile:
    temp: Path
    final: Path
    origin: RowsOrigin


class FileSink:
    """Writes each batch's rows as JSON Lines files and the checkpoints as a JSON document in
    one directory; readers see a batch's files only once its checkpoint moved past them."""

    writes_per_partition = True

    def __init__(self, directory: str | Path, *, lock_timeout_s: float = 30.0) -> None:

        self._root = Path(directory)
        self._own = self._root / OWN_DIR
        self._lock = _DirectoryLock(self._own / "lock", lock_timeout_s)
        self._crash = CrashInjector.from_environment()
        self._state: str = "closed"  # closed | read-only | open
        self._pending: dict[tuple[str, RowsOrigin], _PendingFile] = {}
        # The contract names the group only in save_checkpoints, after the rows: a partition's
        # rows go to the group that acquired it last through this sink.
        self._writers: dict[TopicPartition, str] = {}
        self._next_checkpoints: tuple[str, bytes] | None = None

    @property
    def description(self) -> str:
        return f"file://{self._root}" if self._root.is_absolute() else f"file:{self._root}"

    @property
    def directory(self) -> Path:
        return self._root

    # -- paths ---------------------------------------------------------------------------------

    def _checkpoint_path(self, group: str) -> Path:
        return self._own / "checkpoints" / f"{safe_name(group)}.json"

    def _lease_path(self, group: str) -> Path:
        return self._own / "leases" / f"{safe_name(group)}.json"

    def _job_path(self, job_id: str) -> Path:
        return self._own / "jobs" / f"{safe_name(job_id)}.json"

    def _data_dirs(self, group: str) -> list[Path]:
        """The group's directory in every table directory (tables of other apps included)."""
        try:
            tables = [p for p in self._root.iterdir() if p.is_dir() and p.name != OWN_DIR]
        except FileNotFoundError:
            return []
        return [table / safe_name(group) for table in tables if (table / safe_name(group)).is_dir()]

    def _require(self, *, write: bool) -> None:
        if self._state == "closed":
            raise SinkError("sink is not open", sink=self.description)
        if write and self._state != "open":
            raise SinkError("sink was opened read-only", sink=self.description)

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, tables: Sequence[Table]) -> None:
        for table in tables:
            if table.name == OWN_DIR:
                raise ConfigError("table name is reserved by the file sink", table=table.name)
        try:
            for sub in ("checkpoints", "leases", "jobs"):
                _make_directory(self._own / sub)
            for table in tables:
                _make_directory(self._root / table.name)
            self._lock.acquire()
            try:
                self._remove_stale_own_temps()
            finally:
                self._lock.release()
        except OSError as exc:
            raise SinkError(
                "cannot open file sink", sink=self.description, reason=str(exc)
            ) from exc
        self._state = "open"

    def open_existing(self) -> None:
        self._state = "read-only"  # reads of a directory that does not exist return nothing

    def _remove_stale_own_temps(self) -> None:
        # Every writer of these documents holds the lock, which we hold: any temp is a leftover.
        for sub in ("checkpoints", "leases", "jobs"):
            for temp in (self._own / sub).glob(".*.tmp"):
                temp.unlink(missing_ok=True)
                log.info("file_sink_removed_stale_temp", path=str(temp))

    def close(self) -> None:
        if self._state == "open":
            self.rollback()
        self._lock.release()
        self._state = "closed"

    # -- assignment ----------------------------------------------------------------------------

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        self._require(write=True)
        wanted = set(partitions)
        try:
            self._lock.acquire()
            try:
                epochs = _read_epochs(self._lease_path(group))
                for tp in wanted:
                    epochs[tp] = epochs.get(tp, 0) + 1
                _write_durably(self._lease_path(group), _epochs_document(group, epochs))
                stored = read_checkpoint_document(self._checkpoint_path(group))
                self._remove_uncommitted(group, wanted, {} if stored is None else stored[1])
            finally:
                self._lock.release()
        except OSError as exc:
            raise SinkError(
                "cannot acquire partition epochs", sink=self.description, reason=str(exc)
            ) from exc
        self._writers.update(dict.fromkeys(wanted, group))
        return {tp: epochs[tp] for tp in wanted}

    def _remove_uncommitted(
        self,
        group: str,
        partitions: set[TopicPartition],
        checkpoints: Mapping[TopicPartition, Checkpoint],
    ) -> None:
        """Delete the group's files of `partitions` that reach its checkpoint (left by a crash
        between renaming and checkpointing, or beyond a checkpoint moved back) and stale temps."""
        touched: set[Path] = set()
        for directory in self._data_dirs(group):
            for entry in directory.iterdir():
                temp = _TEMP_NAME.match(entry.name)
                parsed = _parse_data_file(entry.with_name(temp["final"]) if temp else entry)
                if parsed is None or parsed.topic_partition not in partitions:
                    continue
                checkpoint = checkpoints.get(parsed.topic_partition)
                if (
                    temp is None
                    and checkpoint is not None
                    and (parsed.last_offset < checkpoint.next_offset)
                ):
                    continue  # committed
                entry.unlink(missing_ok=True)
                touched.add(directory)
                log.warning(
                    "file_sink_removed_uncommitted",
                    path=str(entry),
                    topic=parsed.topic,
                    partition=parsed.partition,
                    offsets=(parsed.first_offset, parsed.last_offset),
                    checkpoint=None if checkpoint is None else checkpoint.next_offset,
                    temp=temp is not None,
                )
        for directory in touched:
            _fsync_directory(directory)

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        self._require(write=False)
        try:
            stored = read_checkpoint_document(self._checkpoint_path(group))
        except OSError as exc:
            raise SinkError(
                "cannot read checkpoints", sink=self.description, reason=str(exc)
            ) from exc
        if stored is None:
            return {}
        if partitions is None:
            return dict(stored[1])
        wanted = set(partitions)
        return {tp: cp for tp, cp in stored[1].items() if tp in wanted}

    # -- the batch -----------------------------------------------------------------------------

    def begin(self) -> None:
        self._require(write=True)
        if self._pending or self._next_checkpoints is not None:
            self.rollback()  # a batch the engine never finished: start clean

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        self._require(write=True)
        if origin is None:
            raise SinkError(
                "the file sink names files by partition and offsets; write_rows needs an origin",
                table=table.name,
            )
        if not rows:
            return
        data = encode_rows(table, rows)
        key = (table.name, origin)
        try:
            pending = self._pending.get(key)
            if pending is None:
                tp = origin.partition
                if tp not in self._writers:
                    raise SinkError(
                        "rows for a partition this sink never acquired",
                        topic=tp.topic,
                        partition=tp.partition,
                        group=origin.group,
                    )
                directory = self._root / table.name / safe_name(origin.group)
                _make_directory(directory)
                final = directory / data_file_name(
                    tp.topic, tp.partition, origin.first_offset, origin.next_offset - 1
                )
                pending = _PendingFile(_temp_path(final), final, origin)
                self._pending[key] = pending
            with pending.temp.open("ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise SinkError(
                "cannot write rows",
                sink=self.description,
                table=table.name,
                topic=origin.partition.topic,
                partition=origin.partition.partition,
                offsets=(origin.first_offset, origin.next_offset - 1),
                reason=str(exc),
            ) from exc

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        self._require(write=True)
        strangers = sorted(
            {p.origin.partition for p in self._pending.values()}
            - {cp.topic_partition for cp in checkpoints}
        )
        if strangers:
            raise SinkError(
                "rows of partitions whose checkpoints are not saved with them",
                partitions=[(tp.topic, tp.partition) for tp in strangers],
                group=group,
            )
        try:
            self._lock.acquire()  # held until commit() or rollback()
            current = _read_epochs(self._lease_path(group))
            check_epochs(group, {cp.topic_partition for cp in checkpoints}, current, epochs)
            stored = read_checkpoint_document(self._checkpoint_path(group))
            merged = {} if stored is None else dict(stored[1])
            for pending in self._pending.values():
                self._refuse_overlap(group, pending, merged.get(pending.origin.partition))
            merged.update({cp.topic_partition: cp for cp in checkpoints})
            self._next_checkpoints = (group, _checkpoint_document(group, merged.values()))
        except OSError as exc:
            raise SinkError(
                "cannot save checkpoints", sink=self.description, reason=str(exc)
            ) from exc

    def _refuse_overlap(self, group: str, pending: _PendingFile, stored: Checkpoint | None) -> None:
        # Output of offsets below the checkpoint is already committed: writing it again would
        # make a second copy that readers see (a writer that did not resume at its checkpoint).
        if pending.final.parent.name != safe_name(group):
            raise SinkError(
                "rows were written for another group than the checkpoints",
                rows_group_dir=pending.final.parent.name,
                group=group,
            )
        if stored is not None and pending.origin.first_offset < stored.next_offset:
            raise SinkError(
                "batch starts below the stored checkpoint; it would duplicate committed output",
                topic=pending.origin.partition.topic,
                partition=pending.origin.partition.partition,
                offset=pending.origin.first_offset,
                checkpoint=stored.next_offset,
                group=group,
            )

    def commit(self) -> None:
        self._require(write=True)
        checkpoint_replaced = False
        renamed: list[Path] = []
        try:
            self._lock.acquire()  # already held after save_checkpoints
            directories = {p.final.parent for p in self._pending.values()}
            for pending in self._pending.values():
                pending.temp.replace(pending.final)
                renamed.append(pending.final)
            for directory in directories:
                _fsync_directory(directory)
            if renamed:
                self._crash.at(CRASH_AFTER_DATA)
            if self._next_checkpoints is not None:
                group, document = self._next_checkpoints
                _write_durably(self._checkpoint_path(group), document)  # the commit point
            checkpoint_replaced = True
        except OSError as exc:
            if not checkpoint_replaced:
                # Not committed: take back what readers could not see yet anyway. (Once the
                # checkpoint is renamed it may be durable, so its files must stay; a retry
                # rewrites the same names with the same rows.)
                for path in renamed:
                    path.unlink(missing_ok=True)
            self._discard_batch()
            raise SinkError(
                "commit failed; batch rolled back"
                if not checkpoint_replaced
                else "commit's final fsync failed; the batch may or may not be durable",
                sink=self.description,
                reason=str(exc),
            ) from exc
        self._pending.clear()
        self._next_checkpoints = None
        self._lock.release()

    def rollback(self) -> None:
        self._discard_batch()

    def _discard_batch(self) -> None:
        for pending in self._pending.values():
            with contextlib.suppress(OSError):
                pending.temp.unlink(missing_ok=True)
        self._pending.clear()
        self._next_checkpoints = None
        self._lock.release()

    # -- checkpoint tools ----------------------------------------------------------------------

    def _checkpoint_documents(self) -> list[tuple[Path, str, dict[TopicPartition, Checkpoint]]]:
        try:
            paths = sorted((self._own / "checkpoints").glob("*.json"))
        except OSError as exc:
            raise SinkError(
                "cannot list checkpoints", sink=self.description, reason=str(exc)
            ) from exc
        documents = []
        for path in paths:
            stored = read_checkpoint_document(path)
            if stored is not None:
                documents.append((path, *stored))
        return documents

    def checkpoint_groups(self) -> list[str]:
        self._require(write=False)
        return sorted(
            group for _path, group, checkpoints in self._checkpoint_documents() if checkpoints
        )

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        self._require(write=not dry_run)
        older: list[Checkpoint] = []
        try:
            if not dry_run:
                self._lock.acquire()  # no consumer's commit interleaves
            for path, group, checkpoints in self._checkpoint_documents():
                stale = [
                    cp
                    for cp in checkpoints.values()
                    if (cp.read_from_format or CURRENT_FORMAT_VERSION) < CURRENT_FORMAT_VERSION
                ]
                if stale and not dry_run:
                    _write_durably(path, _checkpoint_document(group, checkpoints.values()))
                older.extend(stale)
        except OSError as exc:
            raise SinkError(
                "cannot migrate checkpoints", sink=self.description, reason=str(exc)
            ) from exc
        finally:
            if not dry_run:
                self._lock.release()
        return older

    # -- replay jobs ---------------------------------------------------------------------------

    def create_job(self, job_id: str, document: str) -> str:
        self._require(write=True)
        path = self._job_path(job_id)
        try:
            self._lock.acquire()  # two runs creating the same job: the first one's stays
            try:
                stored = self.load_job(job_id)
                if stored is not None:
                    return stored
                record = {"job_id": job_id, "created_at": datetime.now(tz=UTC).isoformat()}
                _write_durably(path, (json.dumps({**record, "document": document}) + "\n").encode())
            finally:
                self._lock.release()
        except OSError as exc:
            raise SinkError(
                "cannot store replay job", sink=self.description, job=job_id, reason=str(exc)
            ) from exc
        return document

    def load_job(self, job_id: str) -> str | None:
        self._require(write=False)
        path = self._job_path(job_id)
        try:
            stored = _read_json(path)
        except OSError as exc:
            raise SinkError(
                "cannot read replay job", sink=self.description, job=job_id, reason=str(exc)
            ) from exc
        if stored is None:
            return None
        if not isinstance(stored, dict) or not isinstance(stored.get("document"), str):
            raise SinkError("replay job file has no document", path=str(path), job=job_id)
        return str(stored["document"])
