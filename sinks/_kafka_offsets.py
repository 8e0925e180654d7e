"""Checkpoints <-> a group's committed offsets, as the Kafka sink stores them.

Checkpoints live in the group's committed offsets; the offset's metadata string carries the rest of
the checkpoint as compact JSON (`encode_checkpoint_metadata`). Offsets without it (committed by a
plain Kafka consumer) read as format-1 checkpoints holding only the offset.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import confluent_kafka

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    SinkError,
    decode_checkpoint,
)

# The broker's default offset.metadata.max.bytes: a longer metadata string fails the commit.
OFFSET_METADATA_MAX_BYTES = 4096
# Marks an offset's metadata as an offsetkeeper checkpoint; the value is the format version.
_METADATA_MARK = "offsetkeeper"


def encode_checkpoint_metadata(checkpoint: Checkpoint, *, sink_topic: str) -> str:
    """The committed offset's metadata string: everything of the checkpoint but its offset.

    Raises SinkError naming the partition when it exceeds the broker's 4096-byte limit (a large
    state belongs in an output table, not in the checkpoint)."""
    document = {
        _METADATA_MARK: CURRENT_FORMAT_VERSION,
        "sink": sink_topic,
        "epoch": checkpoint.epoch,
        "leader_epoch": checkpoint.leader_epoch,
        "writer": checkpoint.writer_version,
        "updated_ms": int(checkpoint.updated_at.timestamp() * 1000),
        "state": None
        if checkpoint.state is None
        else base64.b64encode(checkpoint.state).decode("ascii"),
        "state_version": checkpoint.state_version,
    }
    text = json.dumps(document, separators=(",", ":"))
    size = len(text.encode())
    if size > OFFSET_METADATA_MAX_BYTES:
        raise SinkError(
            "checkpoint too large for Kafka offset metadata; keep the partition state small",
            topic=checkpoint.topic,
            partition=checkpoint.partition,
            metadata_bytes=size,
            state_bytes=len(checkpoint.state or b""),
            limit_bytes=OFFSET_METADATA_MAX_BYTES,
        )
    return text


def own_metadata(metadata: str | None) -> dict[str, Any] | None:
    """The offsetkeeper checkpoint an offset's metadata holds; None when it holds none (or
    anything else: metadata is free text any client may commit, up to 4 KB of "[" included)."""
    if not metadata:
        return None
    try:
        document = json.loads(metadata)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get(_METADATA_MARK), int):
        return document
    return None


def decode_committed_offset(
    group: str, topic: str, partition: int, offset: int, metadata: str | None
) -> Checkpoint:
    """The checkpoint a committed offset stands for (format 1 when it has no offsetkeeper
    metadata: a plain Kafka consumer's offset, adopted as it is)."""
    document = own_metadata(metadata)
    if document is None:
        # A plain commit says nothing of when it was made: the epoch start says "unknown".
        return decode_checkpoint(
            {
                "format_version": 1,
                "group": group,
                "topic": topic,
                "partition": partition,
                "next_offset": offset,
                "updated_at": 0,
            }
        )
    state = document.get("state")
    if state is not None:
        try:
            state = base64.b64decode(state, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise CheckpointError(
                "checkpoint state in the offset metadata is not base64",
                group=group,
                topic=topic,
                partition=partition,
                offset=offset,
            ) from None
    return decode_checkpoint(
        {
            "format_version": document[_METADATA_MARK],
            "group": group,
            "topic": topic,
            "partition": partition,
            "next_offset": offset,
            "updated_at": document.get("updated_ms", 0),
            "epoch": document.get("epoch", 0),
            "leader_epoch": document.get("leader_epoch"),
            "writer_version": document.get("writer", "unknown"),
            "state": state,
            "state_version": document.get("state_version"),
        }
    )


def committed_offset(checkpoint: Checkpoint, *, sink_topic: str) -> Any:
    """The confluent TopicPartition that commits `checkpoint` (the leader epoch only when known:
    the client takes no None for it)."""
    extra: dict[str, Any] = {}
    if checkpoint.leader_epoch is not None:
        extra["leader_epoch"] = checkpoint.leader_epoch
    return confluent_kafka.TopicPartition(
        checkpoint.topic,
        checkpoint.partition,
        checkpoint.next_offset,
        metadata=encode_checkpoint_metadata(checkpoint, sink_topic=sink_topic),
        **extra,
    )
