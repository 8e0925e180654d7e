"""Read the Kafka offsets of a Spark Structured Streaming checkpoint, to adopt them without replay.

A Spark streaming query keeps two write-ahead logs in its checkpoint directory, both written by
Spark's `HDFSMetadataLog`: one file per batch, named by the batch id in decimal with no
extension (`offsets/17`, `commits/17`), written to a hidden temp file and renamed into place, so
a batch file is never partial. Anything else in those folders (`.17.crc` checksums, hidden
`.17.<uuid>.tmp` files, a directory) is not a batch; Spark's `isBatchFile` skips every name that
does not parse as a number, and so does this reader.

The order of work for batch N (Spark's `CommitLog` docstring, followed by `MicroBatchExecution`):

1. write `offsets/N`: the offset each source will have reached when batch N is done;
2. run batch N into the sink;
3. write `commits/N`.

So the state that is safe to adopt is `offsets/N` for the highest N present in `commits/`. An
`offsets/N+1` without its commit is a batch that was planned but not committed (Spark re-runs it
on restart); it is ignored here.

`offsets/N` (`OffsetSeqLog`):

    v1                                            version header
    {"batchWatermarkMs":0,"batchTimestampMs":..,"conf":{..}}  OffsetSeqMetadata ("" allowed in v1)
    {"orders":{"0":23,"1":42}}                    source 0's offset JSON
    -                                             source 1 has no offset yet
    ...                                           one line per source, in the query plan's order

Version 2 (`OffsetMap`, opt-in via `spark.sql.streaming.offsetLog.formatVersion=2`, and forced
when source evolution is enabled) keys each line by source id instead of position, and requires
the metadata line (`OffsetSeqMetadataV2`, which adds `sourceMetadataInfo`):

    v2
    {"batchWatermarkMs":0,"batchTimestampMs":..,"conf":{..},"sourceMetadataInfo":{..}}
    0:{"orders":{"0":23,"1":42}}                  sourceId ":" offset JSON (ids "0", "1", ...
    1:-                                           or the names given with `.name()`)

`commits/N` (`CommitLog`): `v1` then `{"nextBatchWatermarkMs":0}` (Spark 2.2 wrote `{}`), or
`v2` then the same plus `stateUniqueIds`, written from Spark 4.0 when the state store
checkpoint format version 2 is on. Only the file's presence matters here, but it is read and
its version checked as Spark does on restart: a commit Spark itself would refuse is refused.

A Kafka source's offset JSON is `JsonUtils.partitionOffsets`: `{"topic":{"partition":offset}}`.
Each value is the NEXT offset to read, not the last one read: `KafkaMicroBatchStream` says its
offset is "1 + (available offset)", consistent with `KafkaConsumer.position()`, and a batch
reads the range [previous batch's offset, this batch's offset) (`KafkaOffsetRange` with an
exclusive `untilOffset`). That is exactly offsetkeeper's `next_offset`: no +1 is needed.

-1 (latest) and -2 (earliest) are only the user's `startingOffsets` placeholders. Spark resolves
them to concrete offsets (`fetchSpecificOffsets` lists the real earliest/latest offset) before it
writes the initial offsets or any batch's end offsets, so a checkpoint written by Spark's Kafka
source never holds them. Should one appear anyway (a hand-edited or foreign checkpoint), it is
refused, naming the topic and partition: it stands for no position that could be adopted.

Sources read (apache/spark): `sql/core/src/main/scala/org/apache/spark/sql/execution/streaming/`
`checkpointing/{OffsetSeqLog,OffsetSeq,CommitLog,HDFSMetadataLog,MetadataVersionUtil,`
`CheckpointFileManager}.scala` (and their pre-4.1 copies one folder up, `BatchCommitLog.scala`
of Spark 2.2), `connector/kafka-0-10-sql/src/main/scala/org/apache/spark/sql/kafka010/`
`{JsonUtils,KafkaSourceOffset,KafkaMicroBatchStream,KafkaOffsetReaderAdmin,`
`KafkaSourceInitialOffsetWriter}.scala`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from consumer.core.errors import ConfigError

__all__ = ["read_spark_kafka_offsets"]

log = structlog.get_logger("offsetkeeper.spark_checkpoint")

# Every `offsets/` version Spark has written: 1 since Spark 2.1 (Spark 2.0 used Java
# serialization, with no header), 2 (`OffsetMap`) since SPARK-54423. Spark's own reader accepts
# any version up to its MAX_VERSION, and so does this one: a higher one is refused by name.
OFFSET_LOG_VERSIONS = frozenset({1, 2})
# Every `commits/` version: 1 since Spark 2.2 (earlier checkpoints have no commits/ at all),
# 2 since Spark 4.0 (state store checkpoint format v2).
COMMIT_LOG_VERSIONS = frozenset({1, 2})
OFFSET_MAP_VERSION = 2  # offsets/ lines are "sourceId:offset" from this version on

_HEADER_LINES = 2  # the version line and the metadata line precede the sources

_VOID_OFFSET = "-"  # OffsetSeqLog.SERIALIZED_VOID_OFFSET: the source has no offset yet
_BATCH_FILE = re.compile(r"[0-9]+")
_VERSION_HEADER = re.compile(r"v([0-9]{1,9})")  # more digits: not a version Spark wrote
_PARTITION_KEY = re.compile(r"[0-9]+")
_LONG_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1  # Kafka partitions are Java ints
_PLACEHOLDERS = {-1: "latest", -2: "earliest"}
_EXAMPLE = '{"topic":{"0":23,"1":42}}'


@dataclass(frozen=True, slots=True)
class _SourceLine:
    """One source's entry in an `offsets/N` file."""

    label: str  # "source 0" (v1, by position) or "source id 'orders'" (v2, by id)
    key: str  # the position (v1) or the source id (v2), as text
    text: str  # the offset JSON, or "-"


def read_spark_kafka_offsets(
    checkpoint_dir: Path, *, source_index: int | None = None
) -> dict[str, dict[int, int]]:
    """Return {topic: {partition: next_offset}} of the latest committed batch of a Kafka source.

    `checkpoint_dir` is the query's `checkpointLocation`. `source_index` picks the source when the
    query reads several: its position in the plan (v1 offset logs) or its source id `"0"`, `"1"`,
    ... (v2). When it is None, the one source whose offset is a Kafka offset map is taken, and
    a query with none or several such sources is refused, saying how many sources it has.

    The offsets are next offsets to read (Spark's exclusive `untilOffset`), ready to be stored as
    offsetkeeper checkpoints. Raises `ConfigError`, naming the file, for anything this cannot
    adopt: a missing or empty log, no committed batch, a version newer than v2, malformed JSON,
    a chosen source that is not Kafka, or an offset that is not a concrete position. Files that
    cannot be read (permissions, a directory where a file belongs, not UTF-8, JSON nested too
    deeply) are a `ConfigError` naming the file too, never a traceback.
    """
    root = Path(checkpoint_dir)
    try:
        return _read_checkpoint(root, source_index)
    except OSError as exc:  # a stat or a listing that failed, wherever in the tree
        where = exc.filename if isinstance(exc.filename, str) else str(root)
        raise ConfigError(
            f"cannot read the Spark checkpoint: {exc.strerror or type(exc).__name__}",
            path=where,
        ) from None


def _read_checkpoint(root: Path, source_index: int | None) -> dict[str, dict[int, int]]:
    if not root.is_dir():
        what = "path is not a directory" if root.exists() else "directory does not exist"
        raise ConfigError(f"Spark checkpoint {what}", path=str(root))
    commits_dir = root / "commits"
    if not commits_dir.is_dir():
        raise ConfigError(
            "not a Spark streaming checkpoint with a commit log: it has no commits/ directory "
            "(Spark writes one from 2.2 on)",
            path=str(commits_dir),
        )
    committed = _batch_ids(commits_dir)
    if not committed:
        raise ConfigError(
            "the Spark query has no committed batch: commits/ holds no batch file",
            path=str(commits_dir),
        )
    batch = max(committed)
    commit_file = commits_dir / str(batch)
    _check_commit_file(commit_file)

    offsets_file = root / "offsets" / str(batch)
    if not offsets_file.is_file():
        raise ConfigError(
            "the latest committed batch has no offsets file",
            path=str(offsets_file),
            batch=batch,
        )
    version, sources = _read_offsets_file(offsets_file)
    chosen = _choose_source(offsets_file, sources, source_index)
    offsets = _kafka_offsets(offsets_file, chosen)
    log.info(
        "spark_checkpoint_read",
        path=str(offsets_file),
        batch=batch,
        version=version,
        source=chosen.key,
        partitions=sum(len(parts) for parts in offsets.values()),
    )
    return offsets


def _batch_ids(log_dir: Path) -> list[int]:
    # HDFSMetadataLog.isBatchFile: the name parses as a number, and it must be a file.
    try:
        return [
            int(entry.name)
            for entry in log_dir.iterdir()
            if _BATCH_FILE.fullmatch(entry.name) and entry.is_file()
        ]
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot list Spark log directory: {reason}", path=str(log_dir)) from exc


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read Spark log file: {reason}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("Spark log file is not UTF-8 text", path=str(path)) from exc
    # Like scala.io.Source.getLines: split on \n (dropping a \r before it), no final empty line.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _version(path: Path, header: str, known: frozenset[int], log_name: str) -> int:
    # MetadataVersionUtil.validateVersion: "v" + a positive integer, at most the known maximum.
    match = _VERSION_HEADER.fullmatch(header.strip())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"malformed Spark {log_name} file: the first line must be a version header "
            f"like 'v1', got {header[:40]!r}",
            path=str(path),
        )
    version = int(match.group(1))
    if version not in known:
        raise ConfigError(
            f"Spark {log_name} file has version v{version}, newer than this reader knows "
            f"({', '.join(f'v{v}' for v in sorted(known))}); it was written by a newer Spark",
            path=str(path),
            version=f"v{version}",
        )
    return version


def _check_commit_file(path: Path) -> None:
    lines = _read_lines(path)
    if not lines:
        raise ConfigError("Spark commit log file is empty", path=str(path))
    _version(path, lines[0], COMMIT_LOG_VERSIONS, "commit log")
    if len(lines) > 1 and not isinstance(_parse_json(path, lines[1], "commit metadata"), dict):
        raise ConfigError(
            "malformed Spark commit log file: its metadata line is not a JSON object",
            path=str(path),
        )


def _read_offsets_file(path: Path) -> tuple[int, list[_SourceLine]]:
    lines = _read_lines(path)
    if not lines:
        raise ConfigError("Spark offset log file is empty", path=str(path))
    version = _version(path, lines[0], OFFSET_LOG_VERSIONS, "offset log")
    if len(lines) < _HEADER_LINES:
        raise ConfigError(
            "malformed Spark offset log file: the metadata line after the version is missing",
            path=str(path),
        )
    metadata = lines[1].strip()
    if metadata or version == OFFSET_MAP_VERSION:  # OffsetMap requires its metadata
        if not metadata:
            raise ConfigError(
                "malformed Spark offset log file: a v2 file must have a metadata line",
                path=str(path),
            )
        if not isinstance(_parse_json(path, metadata, "batch metadata"), dict):
            raise ConfigError(
                "malformed Spark offset log file: its metadata line is not a JSON object",
                path=str(path),
            )
    body = lines[2:]
    if not body:
        raise ConfigError("Spark offset log file lists no source", path=str(path))
    if version != OFFSET_MAP_VERSION:
        return version, [
            _SourceLine(label=f"source {i}", key=str(i), text=line) for i, line in enumerate(body)
        ]
    sources = []
    for line in body:
        # OffsetSeqLog (v2): the source id ends at the first ':'; the offset JSON follows.
        source_id, colon, text = line.partition(":")
        if not colon or not source_id:
            raise ConfigError(
                "malformed Spark v2 offset log file: a source line is not 'sourceId:offset', "
                f"got {line[:80]!r}",
                path=str(path),
            )
        sources.append(_SourceLine(label=f"source id {source_id!r}", key=source_id, text=text))
    return version, sources


def _choose_source(
    path: Path, sources: Sequence[_SourceLine], source_index: int | None
) -> _SourceLine:
    if source_index is not None:
        for source in sources:
            if source.key == str(source_index):
                return source
        known = ", ".join(source.key for source in sources)
        raise ConfigError(
            f"source_index {source_index} is not a source of this query: "
            f"it has {len(sources)} source(s) ({known})",
            path=str(path),
        )
    kafka = [
        s for s in sources if s.text != _VOID_OFFSET and _is_kafka_map(_parse_json_of(path, s))
    ]
    if len(kafka) == 1:
        return kafka[0]
    if len(sources) == 1:  # the only source, but not a Kafka offset: say why
        return sources[0]
    kinds = ", ".join(f"{s.key}: {_describe(path, s)}" for s in sources)
    raise ConfigError(
        f"the Spark query has {len(sources)} sources and {len(kafka)} of them are Kafka "
        f"offset maps; pass source_index to pick one ({kinds})",
        path=str(path),
        sources=len(sources),
    )


def _describe(path: Path, source: _SourceLine) -> str:
    if source.text == _VOID_OFFSET:
        return "no offset"
    return "Kafka" if _is_kafka_map(_parse_json_of(path, source)) else "not Kafka"


def _kafka_offsets(path: Path, source: _SourceLine) -> dict[str, dict[int, int]]:
    if source.text == _VOID_OFFSET:
        raise ConfigError(
            f"{source.label} has no offset in the latest committed batch ('-'): "
            "it has not read anything yet",
            path=str(path),
        )
    value = _parse_json_of(path, source)
    if not _is_kafka_map(value):
        raise ConfigError(
            f"{source.label} is not a Kafka source: its offset is not a Kafka offset map "
            f"like {_EXAMPLE}, got {source.text[:80]!r}",
            path=str(path),
        )
    offsets: dict[str, dict[int, int]] = {}
    for topic in sorted(value):
        partitions = value[topic]
        _check_partition_keys(path, source, topic, partitions)
        for key in sorted(partitions, key=int):
            offset = partitions[key]
            if offset < 0:
                meaning = _PLACEHOLDERS.get(offset)
                reason = (
                    f"the placeholder {offset} ({meaning}), not a concrete offset"
                    if meaning
                    else f"the negative offset {offset}"
                )
                raise ConfigError(
                    f"{source.label} holds {reason}; it cannot be adopted as a next offset",
                    path=str(path),
                    topic=topic,
                    partition=int(key),
                    offset=offset,
                )
            offsets.setdefault(topic, {})[int(key)] = offset
    return offsets


def _check_partition_keys(path: Path, source: _SourceLine, topic: str, partitions: Any) -> None:
    for key in partitions:
        if len(key) > len(str(_INT_MAX)) or int(key) > _INT_MAX:
            raise ConfigError(
                f"{source.label} names a partition of {topic!r} beyond the largest Kafka "
                f"partition number ({_INT_MAX}): {key[:40]!r}",
                path=str(path),
                topic=topic,
            )


def _parse_json_of(path: Path, source: _SourceLine) -> Any:
    return _parse_json(path, source.text, f"{source.label}'s offset")


def _parse_json(path: Path, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError, or an integer too long to convert
        raise ConfigError(
            f"malformed JSON in Spark log file: {what} does not parse "
            f"({str(exc)[:120]}): {text[:80]!r}",
            path=str(path),
        ) from exc
    except RecursionError:
        raise ConfigError(
            f"malformed JSON in Spark log file: {what} nests too deeply to read: {text[:40]!r}",
            path=str(path),
        ) from None


def _is_kafka_map(value: Any) -> bool:
    """True for JsonUtils.partitionOffsets' shape: {topic: {"<partition>": <long>}}, non-empty.

    Other sources' offsets differ in shape: a file source's `{"logOffset":3}`, a rate source's
    `{"0":{"value":5,"runTimeMs":..}}`, a memory source's bare number. A connector that copies
    Kafka's shape (e.g. Event Hubs) cannot be told apart; pass `source_index` for those queries.
    """
    if not isinstance(value, dict) or not value:
        return False
    for topic, partitions in value.items():
        if not isinstance(topic, str) or not isinstance(partitions, dict) or not partitions:
            return False
        for key, offset in partitions.items():
            if not _PARTITION_KEY.fullmatch(key):
                return False
            if isinstance(offset, bool) or not isinstance(offset, int):
                return False
            if not -_LONG_MAX - 1 <= offset <= _LONG_MAX:
                return False
    return True
