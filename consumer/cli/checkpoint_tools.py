"""What the `offsetkeeper checkpoint` commands do, apart from argument parsing: export and
import documents, adoption sources, moving a group's checkpoints, and the integrity audit."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
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
from consumer.core.errors import ConfigError
from consumer.core.records import TopicPartition
from consumer.engine.client import PartitionReader
from consumer.engine.sink import Sink

EXPORT_KIND = "offsetkeeper-checkpoints"
EXPORT_VERSION = 1


def export_document(checkpoints: list[Checkpoint], *, source: str) -> dict[str, Any]:
    """A JSON-ready document of checkpoints in the current format (state as base64)."""
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
    }


def parse_export(document: Any, *, path: str) -> list[Checkpoint]:
    """Checkpoints from an export document; records of any released format are upgraded."""
    if not isinstance(document, dict) or document.get("kind") != EXPORT_KIND:
        raise ConfigError("not an offsetkeeper checkpoint export", path=path)
    if document.get("export_version") != EXPORT_VERSION:
        raise ConfigError(
            "unknown export document version", path=path, version=document.get("export_version")
        )
    checkpoints = []
    for index, record in enumerate(document.get("checkpoints", [])):
        if not isinstance(record, dict):
            raise ConfigError("checkpoint entry is not an object", path=path, index=index)
        state = record.get("state")
        decoded = {**record, "state": None if state is None else base64.b64decode(state)}
        checkpoints.append(decode_checkpoint(decoded))
    return checkpoints


def read_offsets_file(path: Path) -> dict[TopicPartition, int]:
    """`{topic: {partition: next_offset}}` from a JSON file, every value checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("cannot read offsets file", path=str(path), reason=str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "offsets file is not valid JSON", path=str(path), reason=str(exc)
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("offsets file must map topic to {partition: offset}", path=str(path))
    offsets: dict[TopicPartition, int] = {}
    for topic, partitions in data.items():
        if not isinstance(partitions, dict):
            raise ConfigError(
                "offsets of a topic must be a {partition: offset} object",
                path=str(path),
                topic=topic,
            )
        for partition, offset in partitions.items():
            if not str(partition).isdigit():
                raise ConfigError(
                    "partition must be a number", path=str(path), topic=topic, partition=partition
                )
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ConfigError(
                    "offset must be a non-negative integer",
                    path=str(path),
                    topic=topic,
                    partition=int(partition),
                    offset=offset,
                )
            offsets[TopicPartition(topic, int(partition))] = offset
    return offsets


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


def store_checkpoints(sink: Sink, group: str, checkpoints: list[Checkpoint]) -> None:
    """Write checkpoints for `group` in one transaction, under new fencing epochs (so a zombie
    of the group can no longer commit over them)."""
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
    sink.begin()
    try:
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
        if checkpoint.next_offset < low:
            problems.append(
                IntegrityProblem(
                    tp,
                    checkpoint.next_offset,
                    low,
                    high,
                    f"below the log start: {low - checkpoint.next_offset} records were deleted by "
                    "retention before they were consumed",
                )
            )
        elif checkpoint.next_offset > high:
            problems.append(
                IntegrityProblem(
                    tp,
                    checkpoint.next_offset,
                    low,
                    high,
                    "beyond the log end: the topic was probably deleted and recreated",
                )
            )
    return problems
