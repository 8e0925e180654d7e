"""File sink: JSON Lines data files renamed into place, then a checkpoint file replaced after them.

The directory's layout is in `_file_layout`; its documents in `_file_documents`; durable file
operations in `_file_io`; the lock in `_file_lock`; the reader protocol in `_file_reader`; keyed
state (delta files listed by the checkpoint document) in `_file_state`; the data files'
checksums (recorded by the checkpoint document) in `_file_digests`, checked by `_file_verify`;
replay jobs in `_file_jobs`.

One batch, per the `Sink` contract:

    write_rows       one hidden temp file per (table, partition) in the data file's directory,
                     written, flushed and fsynced (outside the lock: the slow part); its
                     SHA-256 and size are taken from the bytes as they are written
    write_state      one hidden temp state file per partition, the same way (`_file_state`)
    save_checkpoints take the lock; refuse stale epochs (FencedError) and batches that start
                     below the stored checkpoint (they would duplicate committed output); merge
                     the new checkpoints (state manifests, checksums) into the group's document
    commit           rename every temp file into place, fsync the directories, then replace
                     the checkpoint document (temp, fsync, rename, fsync); release the lock

The checkpoint rename is the commit point. A crash before it leaves data files whose last
offset is at or beyond the checkpoint: readers ignore them, and `acquire` (which every new owner
calls, under the lock) deletes them with any stale temp files, so the batch is rewritten once.
A committed file (last offset below the checkpoint) is never removed or changed afterwards,
unless an operator moves a checkpoint backwards (`offsetkeeper checkpoint reset`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    ConfigError,
    CrashInjector,
    FencedError,
    RowsOrigin,
    SinkError,
    StateChange,
    StateEntry,
    Table,
    TopicPartition,
    ValueLimits,
    check_epochs,
)
from sinks._file_digests import FileDigest, remove_unreachable_segments, stage_chains
from sinks._file_documents import (
    GroupDocument,
    checkpoint_document,
    encode_rows,
    epochs_document,
    read_epochs,
    read_group_document,
)
from sinks._file_io import file_system_error, fsync_directory, make_directory, write_durably
from sinks._file_jobs import create_job, load_job
from sinks._file_layout import (
    OWN_DIR,
    OWN_SUBDIRS,
    TEMP_NAME,
    FileLayout,
    data_file_name,
    parse_data_file,
    safe_name,
    temp_path,
)
from sinks._file_lock import DirectoryLock
from sinks._file_state import (
    DEFAULT_MAX_DELTAS,
    DEFAULT_MIN_COMPACT_BYTES,
    FileStateStore,
    state_errors,
)
from sinks._file_verify import DataFileCheck, verify_group
from sinks._json_rows import JSON_VALUE_LIMITS

log = structlog.get_logger("offsetkeeper.sink.file")

# Kills the process inside commit() after the data files are renamed and before the checkpoint
# is replaced (tests only; see CRASH_POINTS in consumer/engine/crash.py).
CRASH_AFTER_DATA = "file-after-data"


@dataclass(slots=True)
class _PendingFile:
    temp: Path
    final: Path
    origin: RowsOrigin
    table: str
    sha256: Any = field(default_factory=hashlib.sha256)  # of the bytes written so far
    size: int = 0

    def digest(self) -> FileDigest:
        return FileDigest(self.table, self.final.name, self.sha256.hexdigest(), self.size)


class FileSink:
    """Writes each batch's rows as JSON Lines files and the checkpoints as a JSON document in
    one directory; readers see a batch's files only once its checkpoint moved past them.

    Capabilities: `consumer.Sink` (with `writes_per_partition`: files are named by partition
    and offsets), `consumer.LimitedSink`, `consumer.CheckpointAdmin`, `consumer.JobStore`,
    `consumer.StateStore`; `verify_data_files` checks the committed files' checksums.
    Fencing: an epoch per (group, partition) in the group's lease document; `save_checkpoints`
    takes the directory lock (held until `commit` or `rollback`) and checks the epochs with
    `consumer.check_epochs`, so no newer owner's `acquire` (which takes the lock too) can
    interleave.

    Values: rows are strict JSON (`sinks._json_rows`), so `value_limits` refuses NaN and
    infinities; a value `write_rows` still cannot write as JSON is a `consumer.RowsRefusedError`
    naming the table and column. File system errors are `SinkError`s, no space left (ENOSPC,
    EDQUOT) a `SinkFullError` (both retried); a failed batch leaves no temp file behind.

    Keyed state: each batch's changes of a partition are a delta file listed by the checkpoint
    document that commits it; `state_max_deltas` deltas (or more delta bytes than the live
    values, at least `state_min_compact_bytes`) make the batch write a base snapshot instead.
    Memory: this sink holds the whole state of every partition it acquired in memory (an index
    read from the files at first use, kept in step with each commit, read again after each
    `acquire`); partitions it does not own are read from the files at each call.
    """

    writes_per_partition = True

    def __init__(
        self,
        directory: str | Path,
        *,
        lock_timeout_s: float = 30.0,
        state_max_deltas: int = DEFAULT_MAX_DELTAS,
        state_min_compact_bytes: int = DEFAULT_MIN_COMPACT_BYTES,
    ) -> None:
        self._root = Path(directory)
        self._layout = FileLayout(self._root)
        self._own = self._layout.own
        self._lock = DirectoryLock(self._layout.lock, lock_timeout_s)
        self._crash = CrashInjector.from_environment()
        self._state: str = "closed"  # closed | read-only | open
        self._pending: dict[tuple[str, RowsOrigin], _PendingFile] = {}
        # The contract names the group only in save_checkpoints, after the rows: a partition's
        # rows go to the group that acquired it last through this sink.
        self._writers: dict[TopicPartition, str] = {}
        self._next_checkpoints: tuple[str, bytes] | None = None
        self._states = FileStateStore(
            self._layout, max_deltas=state_max_deltas, min_compact_bytes=state_min_compact_bytes
        )

    @property
    def description(self) -> str:
        return f"file://{self._root}" if self._root.is_absolute() else f"file:{self._root}"

    @property
    def directory(self) -> Path:
        return self._root

    @property
    def value_limits(self) -> ValueLimits:
        return JSON_VALUE_LIMITS

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
            for sub in OWN_SUBDIRS:
                make_directory(self._own / sub)
            for table in tables:
                make_directory(self._root / table.name)
            self._lock.acquire()
            try:
                self._remove_stale_own_temps()
            finally:
                self._lock.release()
        except OSError as exc:
            raise file_system_error("cannot open file sink", exc, sink=self.description) from exc
        self._state = "open"

    def open_existing(self) -> None:
        self._state = "read-only"  # reads of a directory that does not exist return nothing

    def _remove_stale_own_temps(self) -> None:
        # Every writer of these documents holds the lock, which we hold: any temp is a leftover.
        for sub in OWN_SUBDIRS:
            for temp in (self._own / sub).glob(".*.tmp"):
                temp.unlink(missing_ok=True)
                log.info("file_sink_removed_stale_temp", path=str(temp))

    def close(self) -> None:
        if self._state == "open":
            self.rollback()
        self._lock.release()
        self._states.forget()
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
                epochs = read_epochs(self._layout.lease_path(group))
                for tp in wanted:
                    epochs[tp] = epochs.get(tp, 0) + 1
                write_durably(self._layout.lease_path(group), epochs_document(group, epochs))
                stored = read_group_document(self._layout.checkpoint_path(group))
                _remove_uncommitted(
                    self._layout, group, wanted, {} if stored is None else stored.checkpoints
                )
                remove_unreachable_segments(self._layout, group, wanted, stored)
                self._states.acquired(group, wanted, stored)
            finally:
                self._lock.release()
        except OSError as exc:
            raise file_system_error(
                "cannot acquire partition epochs", exc, sink=self.description
            ) from exc
        self._writers.update(dict.fromkeys(wanted, group))
        return {tp: epochs[tp] for tp in wanted}

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        self._require(write=False)
        try:
            stored = read_group_document(self._layout.checkpoint_path(group))
        except OSError as exc:
            raise file_system_error("cannot read checkpoints", exc, sink=self.description) from exc
        if stored is None:
            return {}
        if partitions is None:
            return dict(stored.checkpoints)
        wanted = set(partitions)
        return {tp: cp for tp, cp in stored.checkpoints.items() if tp in wanted}

    # -- the batch -----------------------------------------------------------------------------

    def begin(self) -> None:
        self._require(write=True)
        if self._pending or self._next_checkpoints is not None or self._states.pending_partitions:
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
                directory = self._layout.data_dir(table.name, origin.group)
                make_directory(directory)
                final = directory / data_file_name(
                    tp.topic, tp.partition, origin.first_offset, origin.next_offset - 1
                )
                pending = _PendingFile(temp_path(final), final, origin, table.name)
                self._pending[key] = pending
            with pending.temp.open("ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            pending.sha256.update(data)
            pending.size += len(data)
        except OSError as exc:
            raise file_system_error(
                "cannot write rows",
                exc,
                sink=self.description,
                table=table.name,
                topic=origin.partition.topic,
                partition=origin.partition.partition,
                offsets=(origin.first_offset, origin.next_offset - 1),
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
            current = read_epochs(self._layout.lease_path(group))
            saved = {cp.topic_partition for cp in checkpoints}
            try:
                check_epochs(group, saved, current, epochs)
            except FencedError as exc:  # a newer owner changes its state: read it again if owned
                self._states.forget((group, TopicPartition(*tp)) for tp in exc.partitions)
                raise
            stored = read_group_document(self._layout.checkpoint_path(group))
            merged = {} if stored is None else dict(stored.checkpoints)
            for pending in self._pending.values():
                _refuse_overlap(group, pending, merged.get(pending.origin.partition))
            merged.update({cp.topic_partition: cp for cp in checkpoints})
            manifests = self._states.stage(group, stored, saved)
            digests = [pending.digest() for pending in self._pending.values()]
            next_offsets = {cp.topic_partition: cp.next_offset for cp in checkpoints}
            chains = stage_chains(self._layout, group, stored, digests, next_offsets)
            document = checkpoint_document(group, merged.values(), manifests, chains)
            self._next_checkpoints = (group, document)
        except OSError as exc:
            raise file_system_error("cannot save checkpoints", exc, sink=self.description) from exc

    def commit(self) -> None:
        self._require(write=True)
        replaced: list[bool] = []  # the checkpoint document was renamed: the commit point
        renamed: list[Path] = []
        try:
            self._lock.acquire()  # already held after save_checkpoints
            directories = {p.final.parent for p in self._pending.values()}
            for pending in self._pending.values():
                pending.temp.replace(pending.final)
                renamed.append(pending.final)
            for directory in directories:
                fsync_directory(directory)
            self._states.rename(renamed)
            if renamed:
                self._crash.at(CRASH_AFTER_DATA)
            if self._next_checkpoints is None:
                self._states.discard_uncertain()  # no document lists the state files
            else:
                group, document = self._next_checkpoints
                path = self._layout.checkpoint_path(group)
                write_durably(path, document, renamed=lambda: replaced.append(True))
                self._states.committed()
        except OSError as exc:
            if not replaced:
                # Not committed: take back what readers could not see yet anyway. (Once the
                # checkpoint is renamed it may be durable, so its files must stay; a retry
                # rewrites the same names with the same rows.)
                for path in renamed:
                    path.unlink(missing_ok=True)
            else:
                self._states.discard_uncertain()
            self._discard_batch()
            raise file_system_error(
                "commit's final fsync failed; the batch may or may not be durable"
                if replaced
                else "commit failed; batch rolled back",
                exc,
                sink=self.description,
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
        self._states.discard()
        self._next_checkpoints = None
        self._lock.release()

    # -- checkpoint tools ----------------------------------------------------------------------

    def _checkpoint_documents(self) -> list[tuple[Path, GroupDocument]]:
        try:
            paths = sorted((self._own / "checkpoints").glob("*.json"))
        except OSError as exc:
            raise file_system_error("cannot list checkpoints", exc, sink=self.description) from exc
        documents = []
        for path in paths:
            stored = read_group_document(path)
            if stored is not None:
                documents.append((path, stored))
        return documents

    def checkpoint_groups(self) -> list[str]:
        self._require(write=False)
        return sorted(doc.group for _path, doc in self._checkpoint_documents() if doc.checkpoints)

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        self._require(write=not dry_run)
        older: list[Checkpoint] = []
        try:
            if not dry_run:
                self._lock.acquire()  # no consumer's commit interleaves
            for path, doc in self._checkpoint_documents():
                stale = [
                    cp
                    for cp in doc.checkpoints.values()
                    if (cp.read_from_format or CURRENT_FORMAT_VERSION) < CURRENT_FORMAT_VERSION
                ]
                if stale and not dry_run:  # the state manifests (and any v2 blob) are kept
                    document = checkpoint_document(
                        doc.group,
                        doc.checkpoints.values(),
                        doc.state.values(),
                        doc.digests.values(),
                    )
                    write_durably(path, document)
                older.extend(stale)
        except OSError as exc:
            raise file_system_error(
                "cannot migrate checkpoints", exc, sink=self.description
            ) from exc
        finally:
            if not dry_run:
                self._lock.release()
        return older

    def verify_data_files(self, group: str) -> list[DataFileCheck]:
        """Check every data file `group` committed against the checksum its checkpoint
        document recorded (see `sinks._file_verify.verify_group`); read-only, lock-free."""
        self._require(write=False)
        with state_errors(self.description, "cannot verify data files"):  # OSError: SinkError
            return verify_group(self._layout, group)

    # -- keyed state (consumer.StateStore; see sinks._file_state) -----------------------------

    def read_state(
        self, group: str, partition: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]:
        self._require(write=False)
        with state_errors(self.description, "cannot read state"):
            return self._states.read(group, partition, keys)

    def state_sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, tuple[int, int]]:
        self._require(write=False)
        with state_errors(self.description, "cannot read state sizes"):
            return self._states.sizes(group, partitions)

    def scan_state(self, group: str, partition: TopicPartition) -> Iterator[StateEntry]:
        self._require(write=False)
        with state_errors(self.description, "cannot read state"):
            yield from self._states.scan(group, partition)

    def write_state(self, group: str, changes: Sequence[StateChange]) -> None:
        self._require(write=True)
        with state_errors(self.description, "cannot write state"):
            self._states.write(group, changes)

    # -- replay jobs (sinks._file_jobs) ------------------------------------------------------

    def create_job(self, job_id: str, document: str) -> str:
        self._require(write=True)
        return create_job(self._layout, self._lock, job_id, document, sink=self.description)

    def load_job(self, job_id: str) -> str | None:
        self._require(write=False)
        return load_job(self._layout, job_id, sink=self.description)


def _refuse_overlap(group: str, pending: _PendingFile, stored: Checkpoint | None) -> None:
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


def _remove_uncommitted(
    layout: FileLayout,
    group: str,
    partitions: set[TopicPartition],
    checkpoints: Mapping[TopicPartition, Checkpoint],
) -> None:
    """Delete the group's files of `partitions` that reach its checkpoint (left by a crash
    between renaming and checkpointing, or beyond a checkpoint moved back) and stale temps."""
    touched: set[Path] = set()
    for directory in layout.data_dirs(group):
        for entry in directory.iterdir():
            temp = TEMP_NAME.match(entry.name)
            parsed = parse_data_file(entry.with_name(temp["final"]) if temp else entry)
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
        fsync_directory(directory)
