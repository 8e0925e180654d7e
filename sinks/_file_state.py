"""The file sink's keyed state (`consumer.StateStore`): delta files committed with the
checkpoint document, compacted into a base snapshot, and an in-memory index per partition.

One batch, alongside the data files (`sinks._file`):

    write_state      per partition, the batch's changes as a hidden temp file (a delta, or a
                     base holding every entry when the partition is due for compaction),
                     written and fsynced outside the lock
    save_checkpoints under the lock: the stored manifests must be the ones the index was read
                     from; the new document lists the new file in its partition's manifest
    commit           rename the temp files into place, fsync their directory, then replace the
                     checkpoint document (the commit point); then apply the changes to the
                     indexes and delete the files a compaction superseded

A file is committed exactly when the document listing it is. A crash before the commit point
leaves a file no manifest lists (never read; `acquire` deletes it, with stray temps); a crash
after it leaves superseded files no manifest lists either (deleted the same way). Sequence
numbers are never reused, so a new file never replaces a committed one.

Compaction: a batch writes a base instead of a delta when the partition would otherwise list
more than `max_deltas` deltas, or when its deltas would hold more bytes than its live values
(and at least `min_compact_bytes`). So a partition's files hold O(live state) bytes and a
restore reads at most one base and `max_deltas` deltas.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from consumer import ConfigError, FencedError, SinkError, StateChange, StateEntry, TopicPartition
from sinks._file_documents import GroupDocument, read_group_document
from sinks._file_io import file_system_error, fsync_directory, make_directory
from sinks._file_layout import TEMP_NAME, FileLayout, temp_path
from sinks._file_state_files import (
    BASE,
    DELTA,
    StateLine,
    StateManifest,
    encode_state_file,
    parse_state_file_name,
    read_state_file,
    state_file_name,
)

log = structlog.get_logger("offsetkeeper.sink.file")

Slot = tuple[str, TopicPartition]  # (group, partition)
Stored = tuple[bytes, int]  # an entry's JSON value and version

DEFAULT_MAX_DELTAS = 32
DEFAULT_MIN_COMPACT_BYTES = 1024 * 1024
_LOAD_ATTEMPTS = 5  # a reader racing compactions of another process: read the manifest again


@dataclass(slots=True)
class _Index:
    """A partition's committed entries, as of its manifest."""

    manifest: StateManifest
    entries: dict[str, Stored]
    delta_bytes: int  # of the manifest's delta files (what compaction bounds)

    @property
    def value_bytes(self) -> int:
        return self.manifest.value_bytes


@dataclass(slots=True)
class _PendingState:
    """One partition's state file of the open batch."""

    changes: dict[str, StateChange]
    temp: Path
    final: Path
    manifest: StateManifest  # once committed
    delta_bytes: int  # of the manifest's delta files once committed
    superseded: tuple[str, ...]  # files a compaction replaces, deleted after the commit


@contextlib.contextmanager
def state_errors(sink: str, message: str) -> Iterator[None]:
    """File system errors of a state call as `SinkError`s, a full disk as `SinkFullError`
    (the engine retries both)."""
    try:
        yield
    except OSError as exc:
        raise file_system_error(message, exc, sink=sink) from exc


def _changed_sizes(index: _Index, changes: Iterable[StateChange]) -> tuple[int, int]:
    """(entries, value bytes) of the partition once `changes` apply."""
    count, size = len(index.entries), index.value_bytes
    for change in changes:
        old = index.entries.get(change.key)
        if old is not None:
            count, size = count - 1, size - len(old[0])
        if change.value is not None:
            count, size = count + 1, size + len(change.value)
    return count, size


def _apply(entries: dict[str, Stored], changes: Iterable[StateChange]) -> None:
    for change in changes:
        if change.value is None:
            entries.pop(change.key, None)
        else:
            entries[change.key] = (change.value, change.version)


class FileStateStore:
    """The keyed state of one file sink: the indexes of the partitions it acquired (loaded on
    first use, dropped on each new acquisition), the open batch's state files, and reads of
    other partitions from the committed files. Driven by `FileSink`, which holds the lock
    where the docstring above says so."""

    def __init__(self, layout: FileLayout, *, max_deltas: int, min_compact_bytes: int) -> None:
        if max_deltas < 1:
            raise ConfigError("the file sink keeps at least one delta", max_deltas=max_deltas)
        self._layout = layout
        self._max_deltas = max_deltas
        self._min_compact_bytes = min_compact_bytes
        self._owned: set[Slot] = set()
        self._indexes: dict[Slot, _Index] = {}
        self._pending: dict[Slot, _PendingState] = {}

    # -- reads -----------------------------------------------------------------------------------

    def read(self, group: str, tp: TopicPartition, keys: Collection[str]) -> dict[str, StateEntry]:
        entries = self._index(group, tp).entries
        found = {}
        for key in keys:
            stored = entries.get(key)
            if stored is not None:
                found[key] = StateEntry(key, *stored)
        return found

    def sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None
    ) -> dict[TopicPartition, tuple[int, int]]:
        wanted = None if partitions is None else set(partitions)
        if wanted is None or any((group, tp) not in self._indexes for tp in wanted):
            document = read_group_document(self._layout.checkpoint_path(group))
            stored = {} if document is None else document.state
        else:
            stored = {}
        sizes = {tp: (m.entries, m.value_bytes) for tp, m in stored.items()}
        for (index_group, tp), index in self._indexes.items():
            if index_group == group:
                sizes[tp] = (len(index.entries), index.value_bytes)
        return {
            tp: size for tp, size in sizes.items() if size[0] and (wanted is None or tp in wanted)
        }

    def scan(self, group: str, tp: TopicPartition) -> Iterator[StateEntry]:
        entries = self._index(group, tp).entries
        for key in sorted(entries):  # a snapshot of the keys: a commit meanwhile changes none
            stored = entries.get(key)
            if stored is not None:
                yield StateEntry(key, *stored)

    def _index(self, group: str, tp: TopicPartition) -> _Index:
        """The partition's committed entries: kept in memory for an acquired partition, read
        from the committed files for any other."""
        index = self._indexes.get((group, tp))
        if index is None:
            index = self._load(group, tp)
            if (group, tp) in self._owned:
                self._indexes[group, tp] = index
        return index

    def _load(self, group: str, tp: TopicPartition) -> _Index:
        path = self._layout.checkpoint_path(group)
        for _attempt in range(_LOAD_ATTEMPTS):
            document = read_group_document(path)
            manifest = StateManifest(tp) if document is None else document.manifest(tp)
            try:
                return self._read_files(group, manifest)
            except FileNotFoundError:
                continue  # compacted away since the manifest was read: read it again
        raise SinkError(
            "a committed state file is missing",
            path=str(path),
            topic=tp.topic,
            partition=tp.partition,
        )

    def _read_files(self, group: str, manifest: StateManifest) -> _Index:
        tp = manifest.topic_partition
        directory = self._layout.state_dir(group)
        index = _Index(manifest, {}, 0)
        for name in manifest.files:
            parsed = parse_state_file_name(name)
            if parsed is None:  # checked when the manifest was read
                raise SinkError("not a state file name", name=name)
            path = directory / name
            if parsed.kind == DELTA:
                index.delta_bytes += path.stat().st_size
            for key, value, version in read_state_file(path, group, tp, parsed.seq):
                if value is None:
                    index.entries.pop(key, None)
                else:
                    index.entries[key] = (value, version)
        value_bytes = sum(len(value) for value, _version in index.entries.values())
        if (len(index.entries), value_bytes) != (manifest.entries, manifest.value_bytes):
            raise SinkError(
                "the committed state files do not add up to their manifest",
                topic=tp.topic,
                partition=tp.partition,
                entries=(len(index.entries), manifest.entries),
                value_bytes=(value_bytes, manifest.value_bytes),
            )
        return index

    # -- assignment ------------------------------------------------------------------------------

    def acquired(
        self, group: str, partitions: Collection[TopicPartition], stored: GroupDocument | None
    ) -> None:
        """A new ownership (under the lock): drop the partitions' indexes, and delete their
        state files that no committed manifest lists (and stray temps)."""
        self._owned.update((group, tp) for tp in partitions)
        for tp in partitions:
            self._indexes.pop((group, tp), None)
        directory = self._layout.state_dir(group)
        try:
            names = [entry.name for entry in directory.iterdir()]
        except FileNotFoundError:
            return
        removed = False
        for name in names:
            temp = TEMP_NAME.match(name)
            parsed = parse_state_file_name(temp["final"] if temp else name)
            if parsed is None or parsed.topic_partition not in partitions:
                continue
            committed = stored is not None and name in stored.manifest(parsed.topic_partition).files
            if temp is None and committed:
                continue
            (directory / name).unlink(missing_ok=True)
            removed = True
            log.warning("file_sink_removed_uncommitted_state", path=str(directory / name))
        if removed:
            fsync_directory(directory)

    def forget(self, slots: Iterable[Slot] | None = None) -> None:
        """Drop indexes (all with None): they are read again from the committed files."""
        for slot in list(self._indexes) if slots is None else slots:
            self._indexes.pop(slot, None)

    # -- the batch -------------------------------------------------------------------------------

    @property
    def pending_partitions(self) -> set[TopicPartition]:
        return {tp for _group, tp in self._pending}

    def write(self, group: str, changes: Sequence[StateChange]) -> None:
        by_partition: dict[TopicPartition, list[StateChange]] = {}
        for change in changes:
            by_partition.setdefault(change.partition, []).append(change)
        for tp, partition_changes in by_partition.items():
            slot = (group, tp)
            if slot not in self._owned:
                raise SinkError(
                    "state for a partition this sink never acquired",
                    topic=tp.topic,
                    partition=tp.partition,
                    group=group,
                )
            index = self._index(group, tp)
            previous = self._pending.pop(slot, None)  # a second call in one batch: merge
            merged = {} if previous is None else dict(previous.changes)
            if previous is not None:
                previous.temp.unlink(missing_ok=True)
            merged.update((change.key, change) for change in partition_changes)
            self._pending[slot] = self._write_file(group, index, merged)

    def _write_file(
        self, group: str, index: _Index, changes: dict[str, StateChange]
    ) -> _PendingState:
        """The batch's file of one partition, as a temp file: a delta, or a base when the
        partition is due for compaction."""
        tp, seq = index.manifest.topic_partition, index.manifest.seq + 1
        count, value_bytes = _changed_sizes(index, changes.values())
        ordered = sorted(changes.values(), key=lambda change: change.key)
        lines: Iterable[StateLine] = ((c.key, c.value, c.version) for c in ordered)
        data = encode_state_file(group, tp, seq, DELTA, lines)
        kind, files, delta_bytes = DELTA, index.manifest.files, index.delta_bytes + len(data)
        if self._compacts(index.manifest.deltas + 1, delta_bytes, value_bytes):
            entries = dict(index.entries)
            _apply(entries, ordered)
            lines = ((key, *entries[key]) for key in sorted(entries))
            data = encode_state_file(group, tp, seq, BASE, lines)
            kind, files, delta_bytes = BASE, (), 0
        final = self._layout.state_dir(group) / state_file_name(tp, seq, kind)
        manifest = StateManifest(tp, seq, (*files, final.name), count, value_bytes)
        superseded = index.manifest.files if kind == BASE else ()
        pending = _PendingState(changes, temp_path(final), final, manifest, delta_bytes, superseded)
        make_directory(final.parent)
        try:
            with pending.temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            pending.temp.unlink(missing_ok=True)
            raise
        return pending

    def _compacts(self, deltas: int, delta_bytes: int, value_bytes: int) -> bool:
        return deltas > self._max_deltas or delta_bytes > max(value_bytes, self._min_compact_bytes)

    def stage(
        self,
        group: str,
        stored: GroupDocument | None,
        checkpointed: Collection[TopicPartition],
    ) -> list[StateManifest]:
        """Under the lock, after the epochs are checked: the manifests the new checkpoint
        document carries (the stored ones, with this batch's files)."""
        manifests = {} if stored is None else dict(stored.state)
        for (pending_group, tp), pending in self._pending.items():
            context = {"topic": tp.topic, "partition": tp.partition, "group": group}
            if pending_group != group or tp not in checkpointed:
                raise SinkError(
                    "state of a partition whose checkpoint is not saved with it", **context
                )
            index = self._indexes.get((group, tp))
            if index is None or index.manifest != manifests.get(tp, StateManifest(tp)):
                # Another writer changed it, so the batch's values may come from stale reads:
                # the engine lets the partition go (an epoch bump would have said the same).
                self.forget([(group, tp)])
                raise FencedError(
                    "the partition's state was changed by another writer; batch rolled back",
                    partitions=[(tp.topic, tp.partition)],
                    group=group,
                )
            manifests[tp] = pending.manifest
        return list(manifests.values())

    def rename(self, renamed: list[Path]) -> None:
        """Rename the batch's state files into place, appending each to `renamed` (they are
        not committed until the document is)."""
        directories = set()
        for pending in self._pending.values():
            pending.temp.replace(pending.final)
            renamed.append(pending.final)
            directories.add(pending.final.parent)
        for directory in directories:
            fsync_directory(directory)

    def committed(self) -> None:
        """After the document was replaced: apply the batch to the indexes, and delete the
        files its compactions superseded (a failure there leaves files `acquire` removes)."""
        for slot, pending in self._pending.items():
            index = self._indexes.get(slot)
            if index is not None:
                _apply(index.entries, pending.changes.values())
                index.manifest, index.delta_bytes = pending.manifest, pending.delta_bytes
            for name in pending.superseded:
                path = pending.final.parent / name
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("file_sink_state_cleanup_failed", path=str(path), reason=str(exc))
        self._pending.clear()

    def discard(self) -> None:
        """The batch is not committed: remove its temp files (its renamed ones the caller)."""
        for pending in self._pending.values():
            with contextlib.suppress(OSError):
                pending.temp.unlink(missing_ok=True)
        self._pending.clear()

    def discard_uncertain(self) -> None:
        """The commit's outcome is unknown: read the batch's partitions again when next used."""
        self.forget(list(self._pending))
        self._pending.clear()
