"""The file sink's documents: rows as JSON Lines, checkpoints and epochs as JSON documents.

A group's checkpoint document also carries the manifest of each partition's keyed state
(`_file_state_files.StateManifest`) and the checksums of its data files
(`_file_digests.DigestChain`), so replacing the document commits them all together. Both are
optional keys of document version 1: a document without them (written before they existed)
reads as having no state files and no checksums.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer import (
    Checkpoint,
    CheckpointError,
    SinkError,
    Table,
    TopicPartition,
    decode_checkpoint,
    encode_checkpoint,
)
from sinks._file_digests import DigestChain, chain_from_json, chain_to_json
from sinks._file_io import read_json
from sinks._file_state_files import StateManifest, manifest_from_json, manifest_to_json
from sinks._json_rows import row_json

CHECKPOINT_KIND = "offsetkeeper-file-checkpoints"
LEASE_KIND = "offsetkeeper-file-leases"
DOCUMENT_VERSION = 1  # of the checkpoint/lease documents; each checkpoint has its own format


# -- rows <-> JSON Lines ---------------------------------------------------------------------


def encode_rows(table: Table, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """JSON Lines of `rows`: the table's columns in declared order, bytes as base64 (see
    `sinks._json_rows`: a value JSON cannot hold, NaN included, is a `RowsRefusedError`)."""
    columns = tuple(table.columns)
    return b"".join(row_json(table, row, columns) + b"\n" for row in rows)


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
    if state is not None:
        try:
            state = base64.b64decode(state, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise CheckpointError(
                "checkpoint state is not base64",
                path=str(path),
                group=_shown(record.get("group")),
                topic=_shown(record.get("topic")),
                partition=_shown(record.get("partition")),
            ) from None
    return decode_checkpoint({**record, "state": state})


_SHOWN_CHARS = 200


def _shown(value: Any) -> Any:
    """A value of a document from outside, as an error may show it: short."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None if value is None else f"a {type(value).__name__}"
    if isinstance(value, int):
        return value if abs(value) < 2**63 else f"an integer of {value.bit_length()} bits"
    return value if len(value) <= _SHOWN_CHARS else f"{value[: _SHOWN_CHARS - 3]}..."


def checkpoint_document(
    group: str,
    checkpoints: Iterable[Checkpoint],
    state: Iterable[StateManifest] = (),
    digests: Iterable[DigestChain] = (),
) -> bytes:
    """The group's document; `state` holds the manifests of the partitions with state files,
    `digests` the checksums of the data files (a writer passes on the stored ones it does not
    change)."""
    ordered = sorted(checkpoints, key=lambda cp: cp.topic_partition)
    document: dict[str, Any] = {
        "kind": CHECKPOINT_KIND,
        "document_version": DOCUMENT_VERSION,
        "group": group,
        "checkpoints": [_checkpoint_to_json(cp) for cp in ordered],
    }
    manifests = sorted((m for m in state if m.files or m.seq), key=lambda m: m.topic_partition)
    if manifests:
        document["state"] = [manifest_to_json(m) for m in manifests]
    chains = sorted((c for c in digests if c.recent or c.sealed), key=lambda c: c.topic_partition)
    if chains:
        document["digests"] = [chain_to_json(c) for c in chains]
    return (json.dumps(document, indent=1) + "\n").encode()


@dataclass(frozen=True, slots=True)
class GroupDocument:
    """A group's checkpoint document as read: its checkpoints, state manifests and the
    checksums of its data files."""

    group: str
    checkpoints: dict[TopicPartition, Checkpoint]
    state: dict[TopicPartition, StateManifest] = field(default_factory=dict)
    digests: dict[TopicPartition, DigestChain] = field(default_factory=dict)

    def manifest(self, tp: TopicPartition) -> StateManifest:
        return self.state.get(tp) or StateManifest(tp)


def read_group_document(path: Path) -> GroupDocument | None:
    """The checkpoint document at `path`; None if there is none. Older checkpoint formats are
    upgraded in memory; a newer one raises CheckpointFormatError."""
    document = read_json(path)
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
    group, records = document.get("group"), document.get("checkpoints", [])
    manifests, digests = document.get("state", []), document.get("digests", [])
    if not isinstance(group, str) or not isinstance(records, list):
        raise SinkError(
            "checkpoint document has no group or no list of checkpoints", path=str(path)
        )
    if not isinstance(manifests, list) or not isinstance(digests, list):
        raise SinkError("checkpoint document's state or digests is not a list", path=str(path))
    checkpoints = [_checkpoint_from_json(record, path=path) for record in records]
    state = [manifest_from_json(record, path=path) for record in manifests]
    chains = [chain_from_json(record, path=path) for record in digests]
    return GroupDocument(
        group,
        {cp.topic_partition: cp for cp in checkpoints},
        {m.topic_partition: m for m in state},
        {c.topic_partition: c for c in chains},
    )


def read_checkpoint_document(path: Path) -> tuple[str, dict[TopicPartition, Checkpoint]] | None:
    """(group, checkpoints) from a checkpoint document; None if there is none (see
    `read_group_document`)."""
    document = read_group_document(path)
    return None if document is None else (document.group, document.checkpoints)


def read_epochs(path: Path) -> dict[TopicPartition, int]:
    document = read_json(path)
    if document is None:
        return {}
    if not isinstance(document, dict) or document.get("kind") != LEASE_KIND:
        raise SinkError("not an offsetkeeper lease document", path=str(path))
    entries = document.get("epochs", [])
    if not isinstance(entries, list) or not all(_is_lease_entry(entry) for entry in entries):
        raise SinkError(
            "lease document has an entry that is not {topic, partition, epoch}", path=str(path)
        )
    return {TopicPartition(entry["topic"], entry["partition"]): entry["epoch"] for entry in entries}


def _is_lease_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("topic"), str)
        and all(type(entry.get(key)) is int for key in ("partition", "epoch"))
    )


def epochs_document(group: str, epochs: Mapping[TopicPartition, int]) -> bytes:
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
