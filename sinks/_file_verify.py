"""Checking a file sink's committed data files against the checksums their checkpoint
document recorded (`_file_digests`): for `FileSink.verify_data_files` (`offsetkeeper
checkpoint verify`) and for the reader (`_file_reader`), which refuses a file that fails.

Each committed file (the reader protocol's: last offset below its partition's checkpoint) is
one `DataFileCheck`: ok; "no checksum recorded" (committed by a version before checksums:
not a problem by default); truncated or altered (its size or SHA-256 differs); missing (a
checksum is recorded, the file is gone); unreadable; or its checksum cannot be known because
the partition's checksum segments are damaged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from consumer import SinkError, TopicPartition
from sinks._file_digests import FileDigest, chain_digests, sha256_of
from sinks._file_documents import GroupDocument, read_group_document
from sinks._file_layout import DataFile, FileLayout, parse_data_file

OK = "ok"
UNRECORDED = "no checksum recorded"
TRUNCATED = "truncated"
ALTERED = "altered"
MISSING = "missing"
UNREADABLE = "unreadable"
CHECKSUMS_DAMAGED = "checksums damaged"
NOT_PROBLEMS = frozenset({OK, UNRECORDED})


class CorruptDataFileError(SinkError):
    """A committed data file is not what its checkpoint recorded (truncated or altered), so it
    is never read as good. Its context names the file, table, group, topic, partition,
    offsets, and the expected and actual SHA-256 and size."""


@dataclass(frozen=True, slots=True)
class DataFileCheck:
    """What checking one committed data file found (`status`, one of the constants above);
    `problem` is whether it counts against the sink. Sizes are in bytes; a digest or size that
    was not recorded, or could not be taken, is None."""

    status: str
    path: str
    table: str
    group: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    expected_bytes: int | None = None
    actual_bytes: int | None = None
    detail: str | None = None

    @property
    def problem(self) -> bool:
        return self.status not in NOT_PROBLEMS


def recorded_digests(
    layout: FileLayout, document: GroupDocument, partitions: Iterable[TopicPartition] | None = None
) -> dict[tuple[str, str], FileDigest]:
    """(table, file name) -> the digest the document (with its segments) records, for the
    chains of `partitions` (all by default). A damaged segment is a `SinkError`."""
    wanted = None if partitions is None else set(partitions)
    found = {}
    for tp, chain in document.digests.items():
        if wanted is None or tp in wanted:
            for digest in chain_digests(layout, document.group, chain):
                found[digest.table, digest.file] = digest
    return found


def with_recorded(data_file: DataFile, digest: FileDigest | None) -> DataFile:
    if digest is None:
        return data_file
    return replace(data_file, sha256=digest.sha256, size=digest.size)


def check_data_file(
    data_file: DataFile, table: str, group: str, content: bytes | None
) -> DataFileCheck:
    """Compare `content` (None: the file is gone) with what `data_file` records."""
    check = DataFileCheck(
        UNRECORDED if data_file.sha256 is None else OK,
        str(data_file.path),
        table,
        group,
        data_file.topic,
        data_file.partition,
        data_file.first_offset,
        data_file.last_offset,
        expected_sha256=data_file.sha256,
        expected_bytes=data_file.size,
    )
    if content is None:
        return replace(check, status=MISSING)
    check = replace(check, actual_sha256=sha256_of(content), actual_bytes=len(content))
    if data_file.sha256 is None or check.actual_sha256 == data_file.sha256:
        return check
    shorter = data_file.size is not None and len(content) < data_file.size
    return replace(check, status=TRUNCATED if shorter else ALTERED)


def refuse_if_corrupt(check: DataFileCheck) -> None:
    """Raise `CorruptDataFileError` unless `check` found the file good (or unrecorded)."""
    if not check.problem:
        return
    raise CorruptDataFileError(
        f"a committed data file is {check.status}: its content is not what its checkpoint "
        "recorded, so it is not read (restore it, or move the checkpoint back before it and "
        "consume the range again)",
        path=check.path,
        table=check.table,
        group=check.group,
        topic=check.topic,
        partition=check.partition,
        offsets=(check.first_offset, check.last_offset),
        expected_sha256=check.expected_sha256,
        actual_sha256=check.actual_sha256,
        expected_bytes=check.expected_bytes,
        actual_bytes=check.actual_bytes,
    )


def verify_group(layout: FileLayout, group: str) -> list[DataFileCheck]:
    """Check every data file of every table that `group` committed (read-only, lock-free: the
    reader protocol, so a live consumer's commits meanwhile are not seen, and not disturbed).
    Sorted by table, partition and offsets."""
    document = read_group_document(layout.checkpoint_path(group))
    if document is None:
        return []
    checks: list[DataFileCheck] = []
    recorded: dict[tuple[str, str], FileDigest] = {}
    damaged: dict[TopicPartition, str] = {}
    for tp in document.digests:
        try:
            recorded |= recorded_digests(layout, document, [tp])
        except SinkError as exc:
            damaged[tp] = str(exc)
            recorded |= {(d.table, d.file): d for d in document.digests[tp].recent}
    for table_dir in layout.data_dirs(group):
        table = table_dir.parent.name
        for data_file in committed_in(table_dir, document):
            digest = recorded.pop((table, data_file.path.name), None)
            checks.append(_checked(with_recorded(data_file, digest), table, group, damaged))
    for (table, name), digest in recorded.items():  # recorded, but not found: gone
        gone = parse_data_file(layout.data_dir(table, group) / name)
        if gone is not None:
            checks.append(check_data_file(with_recorded(gone, digest), table, group, None))
    return sorted(checks, key=lambda c: (c.table, c.topic, c.partition, c.first_offset))


def committed_in(directory: Path, document: GroupDocument) -> list[DataFile]:
    """The data files in `directory` that `document` commits (the reader protocol: the last
    offset below the partition's checkpoint), per partition in offset order; none if the
    directory does not exist."""
    next_offsets = {tp: cp.next_offset for tp, cp in document.checkpoints.items()}
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        parsed = parse_data_file(entry)
        if parsed is not None and parsed.last_offset < next_offsets.get(parsed.topic_partition, 0):
            found.append(parsed)
    return sorted(found, key=lambda f: (f.topic, f.partition, f.first_offset))


def _checked(
    data_file: DataFile, table: str, group: str, damaged: dict[TopicPartition, str]
) -> DataFileCheck:
    try:
        content = data_file.path.read_bytes()
    except FileNotFoundError:
        content = None
    except OSError as exc:
        check = check_data_file(data_file, table, group, b"")
        return replace(
            check, status=UNREADABLE, actual_sha256=None, actual_bytes=None, detail=str(exc)
        )
    check = check_data_file(data_file, table, group, content)
    if check.status == UNRECORDED and data_file.topic_partition in damaged:
        return replace(check, status=CHECKSUMS_DAMAGED, detail=damaged[data_file.topic_partition])
    return check
