"""The checkpoint model and its versioned codec.

A checkpoint says, for one (group, topic, partition), the next offset to read. Sinks store it
as a record of the *current* format (see `schemas/checkpoint/vN.avsc`) and read back records of
*any released* format: `decode_checkpoint` runs the adapter chain to upgrade older formats in
memory and refuses formats newer than this code knows, naming both versions.

Adding format vN+1: ship `schemas/checkpoint/vN+1.avsc`, add one pure function
`_vN_to_vN+1` to `_UPGRADES`, bump `CURRENT_FORMAT_VERSION`, extend `Checkpoint` and
`encode_checkpoint`. Released formats: v1 (0.1.0), v2 (0.2.0).
"""

from __future__ import annotations

import importlib.metadata
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import avro.io
import avro.schema

from consumer.checkpoints.versioning import upgrade_chain
from consumer.core.errors import CheckpointError, CheckpointFormatError
from consumer.core.records import TopicPartition
from schemas import checkpoint_schema_text

CURRENT_FORMAT_VERSION = 2

CheckpointRecord = dict[str, Any]
_Upgrade = Callable[[CheckpointRecord], CheckpointRecord]


def _v1_to_v2(record: CheckpointRecord) -> CheckpointRecord:
    # v1 knew no epoch, leader epoch, writer version or state: say so rather than invent them.
    return {
        **record,
        "format_version": 2,
        "epoch": 0,
        "leader_epoch": None,
        "writer_version": "unknown",
        "state": None,
        "state_version": None,
    }


# _UPGRADES[n] turns a format-n record into a format-(n+1) record. Pure functions, no I/O.
_UPGRADES: dict[int, _Upgrade] = {1: _v1_to_v2}


@cache
def writer_version() -> str:
    """This offsetkeeper's version, recorded in every checkpoint it writes."""
    try:
        return importlib.metadata.version("offsetkeeper")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    group: str
    topic: str
    partition: int
    next_offset: int
    updated_at: datetime
    epoch: int = 0
    leader_epoch: int | None = None
    writer_version: str = "unknown"
    state: bytes | None = None
    state_version: int | None = None
    # The format it was stored in, when it was read from a sink (not part of the record).
    read_from_format: int | None = field(default=None, compare=False)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def encode_checkpoint(checkpoint: Checkpoint) -> CheckpointRecord:
    """The record of the current format for `checkpoint` (field names as in the Avro schema)."""
    return {
        "format_version": CURRENT_FORMAT_VERSION,
        "group": checkpoint.group,
        "topic": checkpoint.topic,
        "partition": checkpoint.partition,
        "next_offset": checkpoint.next_offset,
        "updated_at": checkpoint.updated_at,
        "epoch": checkpoint.epoch,
        "leader_epoch": checkpoint.leader_epoch,
        "writer_version": checkpoint.writer_version,
        "state": checkpoint.state,
        "state_version": checkpoint.state_version,
    }


def upgrade_record(record: Mapping[str, Any]) -> CheckpointRecord:
    """Upgrade a checkpoint record of any released format to the current format."""
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointFormatError(
            "checkpoint has no valid format_version", format_version=version
        )
    upgraded = upgrade_chain(
        dict(record),
        from_version=version,
        to_version=CURRENT_FORMAT_VERSION,
        steps=_UPGRADES,
        what="checkpoint format",
        topic=record.get("topic"),
        partition=record.get("partition"),
    )
    upgraded["format_version"] = CURRENT_FORMAT_VERSION
    return upgraded


def decode_checkpoint(record: Mapping[str, Any]) -> Checkpoint:
    """A `Checkpoint` from a stored record of any released format."""
    current = upgrade_record(record)
    stored_format = record.get("format_version")
    try:
        updated_at = current["updated_at"]
        if isinstance(updated_at, int):
            updated_at = datetime.fromtimestamp(updated_at / 1000, tz=UTC)
        return Checkpoint(
            group=str(current["group"]),
            topic=str(current["topic"]),
            partition=int(current["partition"]),
            next_offset=int(current["next_offset"]),
            updated_at=updated_at,
            epoch=int(current["epoch"]),
            leader_epoch=_optional_int(current["leader_epoch"]),
            writer_version=str(current["writer_version"]),
            state=None if current["state"] is None else bytes(current["state"]),
            state_version=_optional_int(current["state_version"]),
            read_from_format=stored_format if isinstance(stored_format, int) else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            "checkpoint record is missing a field or has a wrong type",
            format_version=record.get("format_version"),
            detail=str(exc),
        ) from exc


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@cache
def _parsed_schema(format_version: int) -> avro.schema.Schema:
    try:
        text = checkpoint_schema_text(format_version)
    except FileNotFoundError:
        raise CheckpointFormatError(
            "no schema ships for checkpoint format", format_version=format_version
        ) from None
    return avro.schema.parse(text)


def to_avro(checkpoint: Checkpoint) -> bytes:
    """Avro binary encoding of `checkpoint` in the current format (for export and fixtures)."""
    buffer = io.BytesIO()
    writer = avro.io.DatumWriter(_parsed_schema(CURRENT_FORMAT_VERSION))
    writer.write(encode_checkpoint(checkpoint), avro.io.BinaryEncoder(buffer))
    return buffer.getvalue()


def from_avro(data: bytes, *, format_version: int) -> Checkpoint:
    """Decode Avro binary written with format `format_version`'s schema, upgrading as needed."""
    if format_version > CURRENT_FORMAT_VERSION:
        raise CheckpointFormatError(
            f"checkpoint format v{format_version} is newer than this offsetkeeper knows "
            f"(it reads up to v{CURRENT_FORMAT_VERSION})",
            format_version=format_version,
            supported_version=CURRENT_FORMAT_VERSION,
        )
    reader = avro.io.DatumReader(_parsed_schema(format_version))
    record = reader.read(avro.io.BinaryDecoder(io.BytesIO(data)))
    if not isinstance(record, dict):
        raise CheckpointError(
            "checkpoint Avro datum is not a record", format_version=format_version
        )
    return decode_checkpoint(record)
