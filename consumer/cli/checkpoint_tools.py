"""What the `offsetkeeper checkpoint` commands do, apart from argument parsing: export and
import documents, adoption sources, moving a group's checkpoints, and the integrity audit."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer.checkpoints.model import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    decode_checkpoint,
    encode_checkpoint,
    writer_version,
)
from consumer.core.errors import CheckpointError, ConfigError
from consumer.core.records import TopicPartition
from consumer.engine.client import PartitionReader
from consumer.engine.data_loss import lost_records
from consumer.engine.sink import Sink, StateChange, StateStore

EXPORT_KIND = "offsetkeeper-checkpoints"
# 2 (0.2.0) adds "state_entries"; a version-1 document (no entries) is read as well.
EXPORT_VERSION = 2
_READ_EXPORT_VERSIONS = (1, 2)


def export_document(
    checkpoints: list[Checkpoint], *, source: str, state_entries: list[Any] | None = None
) -> dict[str, Any]:
    """A JSON-ready document of checkpoints in the current format (a format-2 blob as
    base64) and the keyed state's entries (`consumer.cli.state_tools.export_entries`)."""
    records = []
    for checkpoint in checkpoints:
        record = encode_checkpoint(checkpoint)
        record["updated_at"] = int(checkpoint.updated_at.timestamp() * 1000)
        record["state"] = (
            None if checkpoint.state is None else base64.b64encode(checkpoint.state).decode()
        )
        records.append(record)
    return {
        "kind": EXPORT_KIND,
        "export_version": EXPORT_VERSION,
        "exported_at": datetime.now(tz=UTC).isoformat(),
        "source": source,
        "format_version": CURRENT_FORMAT_VERSION,
        "checkpoints": records,
        "state_entries": state_entries or [],
    }


def read_json_file(path: Path, what: str) -> Any:
    """The JSON value in the file at `path`. Anything wrong with the file (missing, a directory
    or a device, unreadable, not UTF-8, not JSON, nested past what the parser can follow) is a
    `ConfigError` that names the file and says what is wrong; `what` names the file's role."""
    shown = str(path)
    try:
        if path.is_dir():
            raise ConfigError(f"the {what} is a directory, not a file", path=shown)
        if path.exists() and not path.is_file():
            raise ConfigError(f"the {what} is not a regular file", path=shown)
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read the {what}: {reason}", path=shown) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"the {what} is not UTF-8 text (byte {exc.start} is not valid)", path=shown
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"the {what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            path=shown,
        ) from None
    except RecursionError:
        raise ConfigError(f"the {what} nests JSON too deeply to read", path=shown) from None
    except ValueError as exc:  # e.g. an integer literal past Python's 4300-digit limit
        raise ConfigError(f"the {what} is not usable JSON: {str(exc)[:120]}", path=shown) from None


def read_export(path: Path) -> list[Checkpoint]:
    """Checkpoints from the export document at `path` (see `parse_export`)."""
    return parse_export(read_json_file(path, "export file"), path=str(path))


def parse_export(document: Any, *, path: str) -> list[Checkpoint]:
    """Checkpoints from an export document; records of any released format are upgraded.
    Every entry is checked (types, ranges, topic names, one entry per partition); anything
    wrong is a `ConfigError` naming the file and the entry."""
    if not isinstance(document, dict) or document.get("kind") != EXPORT_KIND:
        raise ConfigError("not an offsetkeeper checkpoint export", path=path)
    if document.get("export_version") not in _READ_EXPORT_VERSIONS:
        raise ConfigError(
            "unknown export document version",
            path=path,
            version=_shown(document.get("export_version")),
        )
    records = document.get("checkpoints", [])
    if not isinstance(records, list):
        raise ConfigError("the export's checkpoints must be a list", path=path)
    checkpoints: dict[TopicPartition, Checkpoint] = {}
    for index, record in enumerate(records):
        checkpoint = _export_entry(record, path=path, index=index)
        if checkpoint.topic_partition in checkpoints:
            raise ConfigError(
                "the export has two entries for one partition",
                path=path,
                index=index,
                topic=checkpoint.topic,
                partition=checkpoint.partition,
            )
        checkpoints[checkpoint.topic_partition] = checkpoint
    return list(checkpoints.values())


def _export_entry(record: Any, *, path: str, index: int) -> Checkpoint:
    if not isinstance(record, dict):
        raise ConfigError("checkpoint entry is not an object", path=path, index=index)
    state = record.get("state")
    if state is not None:
        if not isinstance(state, str):
            raise ConfigError("checkpoint state must be base64 text", path=path, index=index)
        try:
            state = base64.b64decode(state, validate=True)
        except ValueError:  # binascii.Error
            raise ConfigError(
                "checkpoint state is not valid base64", path=path, index=index
            ) from None
    try:
        checkpoint = decode_checkpoint({**record, "state": state})
    except CheckpointError as exc:
        raise ConfigError(
            f"invalid checkpoint entry: {exc.message}", path=path, index=index, **exc.context
        ) from None
    _check_topic(checkpoint.topic, path=path, index=index)
    return checkpoint


def read_offsets_file(path: Path) -> dict[TopicPartition, int]:
    """`{topic: {partition: next_offset}}` from a JSON file, every value checked."""
    shown = str(path)
    data = read_json_file(path, "offsets file")
    if not isinstance(data, dict):
        raise ConfigError("offsets file must map topic to {partition: offset}", path=shown)
    offsets: dict[TopicPartition, int] = {}
    for topic, partitions in data.items():
        _check_topic(topic, path=shown)
        if not isinstance(partitions, dict):
            raise ConfigError(
                "offsets of a topic must be a {partition: offset} object", path=shown, topic=topic
            )
        for partition, offset in partitions.items():
            number = _partition_number(partition)
            if number is None:
                raise ConfigError(
                    f"partition must be a number from 0 to {_INT32_MAX}",
                    path=shown,
                    topic=topic,
                    partition=_shown(partition),
                )
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ConfigError(
                    "offset must be a non-negative integer",
                    path=shown,
                    topic=topic,
                    partition=number,
                    offset=_shown(offset),
                )
            if offset > _INT64_MAX:
                raise ConfigError(
                    f"offset is beyond the largest Kafka offset ({_INT64_MAX})",
                    path=shown,
                    topic=topic,
                    partition=number,
                    offset=_shown(offset),
                )
            offsets[TopicPartition(topic, number)] = offset
    return offsets


# Kafka's rule for topic names (kafka.common.internals.Topic): 1 to 249 of these characters.
_TOPIC = re.compile(r"[A-Za-z0-9._\-]{1,249}")
_PARTITION = re.compile(r"[0-9]{1,10}")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_SHOWN_CHARS = 60


def _check_topic(topic: str, **context: Any) -> None:
    if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ConfigError(
            "not a Kafka topic name (1 to 249 of a-z, A-Z, 0-9, '.', '_', '-')",
            topic=_shown(topic),
            **context,
        )


def _partition_number(key: str) -> int | None:
    if not _PARTITION.fullmatch(key) or int(key) > _INT32_MAX:
        return None
    return int(key)


def _shown(value: Any) -> Any:
    """`value` as an error may quote it: short, whatever the file held."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64_MAX:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else type(value).__name__
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


def check_offsets_in_log(reader: PartitionReader, offsets: Mapping[TopicPartition, int]) -> None:
    """Refuse offsets for unknown topics or partitions, or outside each partition's log."""
    known: dict[str, list[int]] = {}
    for tp, offset in sorted(offsets.items()):
        if tp.topic not in known:
            known[tp.topic] = reader.partitions(tp.topic)
        if tp.partition not in known[tp.topic]:
            raise ConfigError("unknown partition", topic=tp.topic, partition=tp.partition)
        low, high = reader.watermarks(tp)
        if not low <= offset <= high:
            raise ConfigError(
                "offset is outside the partition's log",
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                log_start=low,
                log_end=high,
            )


def refuse_live_group(reader: PartitionReader, group: str, action: str) -> None:
    members = reader.group_members(group)
    if members:
        # The same rule as kafka-consumer-groups --reset-offsets: never move a live group.
        raise ConfigError(
            f"the group has active members; stop them before you {action}",
            group=group,
            members=members,
        )


def store_checkpoints(
    sink: Sink,
    group: str,
    checkpoints: list[Checkpoint],
    state_changes: Sequence[StateChange] = (),
) -> None:
    """Write checkpoints (and changes of the keyed state) for `group` in one transaction,
    under new fencing epochs (so a zombie of the group can no longer commit over them)."""
    tps = sorted({cp.topic_partition for cp in checkpoints})
    epochs = sink.acquire(group, tps)
    now = datetime.now(tz=UTC)
    rewritten = [
        replace(
            cp,
            group=group,
            updated_at=now,
            epoch=epochs[cp.topic_partition],
            writer_version=writer_version(),
        )
        for cp in checkpoints
    ]
    if state_changes and not isinstance(sink, StateStore):
        raise ConfigError("state entries for a sink that cannot store keyed state")
    sink.begin()
    try:
        if state_changes and isinstance(sink, StateStore):
            sink.write_state(group, state_changes)
        sink.save_checkpoints(group, rewritten, epochs)
        sink.commit()
    except BaseException:
        sink.rollback()
        raise


def offsets_to_checkpoints(group: str, offsets: Mapping[TopicPartition, int]) -> list[Checkpoint]:
    now = datetime.now(tz=UTC)
    return [
        Checkpoint(group, tp.topic, tp.partition, offset, now)
        for tp, offset in sorted(offsets.items())
    ]


@dataclass(frozen=True, slots=True)
class IntegrityProblem:
    partition: TopicPartition
    next_offset: int
    log_start: int
    log_end: int
    problem: str


def audit(
    reader: PartitionReader, checkpoints: Mapping[TopicPartition, Checkpoint]
) -> list[IntegrityProblem]:
    """Checkpoints that no longer fit their partition's log."""
    problems = []
    for tp, checkpoint in sorted(checkpoints.items()):
        try:
            known = reader.partitions(tp.topic)
        except ConfigError:
            problems.append(
                IntegrityProblem(tp, checkpoint.next_offset, -1, -1, "the topic no longer exists")
            )
            continue
        if tp.partition not in known:
            problems.append(
                IntegrityProblem(
                    tp, checkpoint.next_offset, -1, -1, "the partition no longer exists"
                )
            )
            continue
        low, high = reader.watermarks(tp)
        loss = lost_records(tp, checkpoint.next_offset, low, high)  # the engine's own rule
        if loss is None:
            continue
        problem = (
            "beyond the log end: the topic was probably deleted and recreated"
            if loss.lost is None
            else f"below the log start: {loss.lost} records were deleted by retention before "
            "they were consumed"
        )
        problems.append(IntegrityProblem(tp, checkpoint.next_offset, low, high, problem))
    return problems
