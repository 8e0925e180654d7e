"""The checkpoint model and its versioned codec.

A checkpoint says, for one (group, topic, partition), the next offset to read. Sinks store it
as a record of the *current* format (see `schemas/checkpoint/vN.avsc`) and read back records of
*any released* format: `decode_checkpoint` runs the adapter chain to upgrade older formats in
memory and refuses formats newer than this code knows, naming both versions.

Adding format vN+1: ship `schemas/checkpoint/vN+1.avsc`, add one pure function
`_vN_to_vN+1` to `_UPGRADES`, bump `CURRENT_FORMAT_VERSION`, extend `Checkpoint` and
`encode_checkpoint`. Formats: v1 (the first), v2 (0.1.0: fencing epochs, the state as one
blob), v3 (0.2.0: keyed state in entries beside the checkpoint, `schemas/checkpoint/
v3-state-entry.avsc`; `state`/`state_version` only carry a v2 blob not yet split).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import avro.io
import avro.schema

from consumer._version import __version__
from consumer.checkpoints.versioning import upgrade_chain
from consumer.core.errors import CheckpointError, CheckpointFormatError
from consumer.core.records import TopicPartition
from schemas import checkpoint_schema_text

CURRENT_FORMAT_VERSION = 3

# Ranges of the record's integers (Kafka's partitions and leader epochs are Java ints, offsets
# Java longs), and how much of a bad value an error quotes.
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_SHOWN_CHARS = 60

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


def _v2_to_v3(record: CheckpointRecord) -> CheckpointRecord:
    # The fields are the same; what changed is where the state lives. A v2 blob stays in
    # `state` (with its `state_version`) until the engine or `checkpoint migrate` splits it
    # into entries, in the transaction that also clears it (consumer.engine.state).
    return {**record, "format_version": 3}


# _UPGRADES[n] turns a format-n record into a format-(n+1) record. Pure functions, no I/O.
_UPGRADES: dict[int, _Upgrade] = {1: _v1_to_v2, 2: _v2_to_v3}


def writer_version() -> str:
    """This offsetkeeper's version, recorded in every checkpoint it writes (from the code
    itself: an editable install's metadata keeps the version it was installed with)."""
    return __version__


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
    # A format-2 state blob not yet split into entries (keyed state lives in entries since v3).
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
            "checkpoint has no valid format_version", format_version=_shown(version)
        )
    if version > _INT32_MAX:  # no format will ever be numbered so; and str() of it may fail
        raise CheckpointFormatError(
            "checkpoint format_version is newer than this code knows (and than any release)",
            format_version=_shown(version),
            supported_version=CURRENT_FORMAT_VERSION,
        )
    upgraded = upgrade_chain(
        dict(record),
        from_version=version,
        to_version=CURRENT_FORMAT_VERSION,
        steps=_UPGRADES,
        what="checkpoint format",
        topic=_shown(record.get("topic")),
        partition=_shown(record.get("partition")),
    )
    upgraded["format_version"] = CURRENT_FORMAT_VERSION
    return upgraded


def decode_checkpoint(record: Mapping[str, Any]) -> Checkpoint:
    """A `Checkpoint` from a stored record of any released format.

    The record may come from outside (a file, Kafka offset metadata, a database row someone
    edited): every field is checked for its type and range, and anything else is a
    `CheckpointError` naming the field, never a `TypeError` or a silently coerced value."""
    if not isinstance(record, Mapping):
        raise CheckpointError("checkpoint record is not an object", got=type(record).__name__)
    current = upgrade_record(record)
    stored_format = record.get("format_version")
    try:
        return Checkpoint(
            group=_text(current, "group"),
            topic=_text(current, "topic"),
            partition=_integer(current, "partition", 0, _INT32_MAX),
            next_offset=_integer(current, "next_offset", 0, _INT64_MAX),
            updated_at=_timestamp(current, "updated_at"),
            epoch=_integer(current, "epoch", 0, _INT64_MAX),
            leader_epoch=_optional(current, "leader_epoch", -1, _INT32_MAX),
            writer_version=_text(current, "writer_version"),
            state=_state(current, "state"),
            state_version=_optional(current, "state_version", 0, _INT32_MAX),
            read_from_format=stored_format if isinstance(stored_format, int) else None,
        )
    except _BadFieldError as exc:
        raise CheckpointError(
            "checkpoint record is missing a field or has a wrong type",
            format_version=stored_format if isinstance(stored_format, int) else None,
            field=exc.field,
            detail=exc.detail,
            topic=_shown(record.get("topic")),
            partition=_shown(record.get("partition")),
        ) from None


# -- checking the fields of a record that may come from outside ---------------------------------


class _BadFieldError(Exception):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field, detail)
        self.field = field
        self.detail = detail


def _shown(value: Any) -> Any:
    """`value` as it may appear in an error: short, whatever it was."""
    if value is None or (isinstance(value, int) and abs(value) <= _INT64_MAX):
        return value
    if isinstance(value, int):  # repr() of a huge int is slow, and refused past 4300 digits
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return value
    if not isinstance(value, str | bytes):  # a container may be huge or nested past repr()
        return f"a {type(value).__name__}"
    text = value if isinstance(value, str) else repr(value[:_SHOWN_CHARS])
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


def _field(record: Mapping[str, Any], name: str) -> Any:
    if name not in record:
        raise _BadFieldError(name, f"{name!r} is missing")
    return record[name]


def _text(record: Mapping[str, Any], name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise _BadFieldError(name, f"{name!r} must be a string, got {_shown(value)}")
    return value


def _integer(record: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = _field(record, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadFieldError(name, f"{name!r} must be an integer, got {_shown(value)}")
    if not low <= value <= high:
        raise _BadFieldError(name, f"{name!r} must be in [{low}, {high}], got {_shown(value)}")
    return value


def _optional(record: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    return None if _field(record, name) is None else _integer(record, name, low, high)


def _state(record: Mapping[str, Any], name: str) -> bytes | None:
    value = _field(record, name)
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise _BadFieldError(name, f"{name!r} must be bytes or null, got {type(value).__name__}")


def _timestamp(record: Mapping[str, Any], name: str) -> datetime:
    value = _field(record, name)
    if isinstance(value, datetime):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadFieldError(name, f"{name!r} must be epoch milliseconds or a datetime")
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise _BadFieldError(name, f"{name!r} is out of range: {_shown(value)}") from None


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
    try:
        record = reader.read(avro.io.BinaryDecoder(io.BytesIO(data)))
    except Exception as exc:  # bytes from outside: any decoder failure is theirs
        # avro raises its own errors, struct.error, UnicodeDecodeError, ValueError, ... for
        # truncated or garbled bytes; none of them may escape as a traceback.
        raise CheckpointError(
            "checkpoint bytes are not a valid Avro record of their format",
            format_version=format_version,
            reason=f"{type(exc).__name__}: {str(exc)[:120]}",
        ) from None
    if not isinstance(record, dict):
        raise CheckpointError(
            "checkpoint Avro datum is not a record", format_version=format_version
        )
    return decode_checkpoint(record)
