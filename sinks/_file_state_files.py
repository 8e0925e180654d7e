"""The file sink's keyed-state files: their names, their JSON Lines content, and the manifest
of each partition that the group's checkpoint document carries.

    DIR/_offsetkeeper/state/<group>/<topic>+<partition>+<seq:020d>.<base|delta>.jsonl

A partition's committed state is the files its manifest lists, in order: at most one base
(a snapshot of every entry, first) and the deltas after it (each one batch's changes). A
file is committed when the checkpoint document that lists it is; any other file of the
directory is a leftover (of a batch that never committed, or a compaction's superseded files).

Each file is a header line, then one line per entry:

    {"kind": "offsetkeeper-file-state", "file_version": 1, "type": "delta", "group": ...,
     "topic": ..., "partition": ..., "seq": ..., "lines": <entry lines that follow>}
    {"key": "k", "value": "<the value's JSON text>", "version": 2}
    {"key": "k", "value_base64": "...", "version": 2}     a value that is not UTF-8
    {"key": "k", "deleted": true}                          a delta's tombstone
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer import SinkError, TopicPartition

STATE_KIND = "offsetkeeper-file-state"
STATE_FILE_VERSION = 1
BASE = "base"
DELTA = "delta"

_STATE_NAME = re.compile(
    r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<seq>\d{20})\.(?P<type>base|delta)\.jsonl$"
)

# One line of a state file: the key, and its JSON value and version (value None: deleted).
StateLine = tuple[str, bytes | None, int]


def state_file_name(tp: TopicPartition, seq: int, kind: str) -> str:
    return f"{tp.topic}+{tp.partition}+{seq:020d}.{kind}.jsonl"


@dataclass(frozen=True, slots=True)
class StateFileName:
    topic_partition: TopicPartition
    seq: int
    kind: str


def parse_state_file_name(name: str) -> StateFileName | None:
    match = _STATE_NAME.match(name)
    if match is None:
        return None
    tp = TopicPartition(match["topic"], int(match["partition"]))
    return StateFileName(tp, int(match["seq"]), match["type"])


# -- the manifest ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateManifest:
    """A partition's committed state files, in order (a base first, if any), the last sequence
    number used (never reused, so a new file never replaces a committed one), and the entries'
    count and value bytes (so sizes are known without reading the files)."""

    topic_partition: TopicPartition
    seq: int = 0
    files: tuple[str, ...] = ()
    entries: int = 0
    value_bytes: int = 0

    @property
    def deltas(self) -> int:
        return sum(1 for name in self.files if name.endswith(f".{DELTA}.jsonl"))


def manifest_to_json(manifest: StateManifest) -> dict[str, Any]:
    return {
        "topic": manifest.topic_partition.topic,
        "partition": manifest.topic_partition.partition,
        "seq": manifest.seq,
        "files": list(manifest.files),
        "entries": manifest.entries,
        "value_bytes": manifest.value_bytes,
    }


def manifest_from_json(record: Any, *, path: Path) -> StateManifest:
    """A manifest from the checkpoint document at `path`; its file names are checked to be the
    partition's, in increasing sequence order, none after `seq`."""
    if not (
        isinstance(record, dict)
        and isinstance(record.get("topic"), str)
        and all(type(record.get(k)) is int for k in ("partition", "seq", "entries", "value_bytes"))
        and isinstance(record.get("files"), list)
        and all(isinstance(name, str) for name in record["files"])
    ):
        raise SinkError(
            "state manifest is not {topic, partition, seq, files, entries, value_bytes}",
            path=str(path),
        )
    tp = TopicPartition(record["topic"], record["partition"])
    manifest = StateManifest(
        tp, record["seq"], tuple(record["files"]), record["entries"], record["value_bytes"]
    )
    parsed = [parse_state_file_name(name) for name in manifest.files]
    seqs = [p.seq for p in parsed if p is not None and p.topic_partition == tp]
    kinds = [p.kind for p in parsed if p is not None]
    if (
        len(seqs) != len(parsed)
        or seqs != sorted(set(seqs))
        or any(seq > manifest.seq for seq in seqs)
        or BASE in kinds[1:]
    ):
        raise SinkError(
            "state manifest lists files that are not the partition's, in order",
            path=str(path),
            topic=tp.topic,
            partition=tp.partition,
        )
    return manifest


# -- file contents -----------------------------------------------------------------------------


def encode_state_file(
    group: str, tp: TopicPartition, seq: int, kind: str, lines: Iterable[StateLine]
) -> bytes:
    body = [_encode_line(key, value, version) for key, value, version in lines]
    header = {
        "kind": STATE_KIND,
        "file_version": STATE_FILE_VERSION,
        "type": kind,
        "group": group,
        "topic": tp.topic,
        "partition": tp.partition,
        "seq": seq,
        "lines": len(body),
    }
    return b"".join([_json_line(header), *body])


def _encode_line(key: str, value: bytes | None, version: int) -> bytes:
    if value is None:
        return _json_line({"key": key, "deleted": True})
    try:
        return _json_line({"key": key, "value": value.decode("utf-8"), "version": version})
    except UnicodeDecodeError:
        encoded = base64.b64encode(value).decode("ascii")
        return _json_line({"key": key, "value_base64": encoded, "version": version})


def _json_line(record: dict[str, Any]) -> bytes:
    # ASCII only: a key holding a lone surrogate is escaped, and read back the same.
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def read_state_file(path: Path, group: str, tp: TopicPartition, seq: int) -> list[StateLine]:
    """The lines of a committed state file, checked against its header. Raises
    FileNotFoundError as is (a compaction may have removed it since its manifest was read)."""
    content = path.read_bytes()
    expected = {"kind": STATE_KIND, "file_version": STATE_FILE_VERSION, "group": group}
    expected |= {"topic": tp.topic, "partition": tp.partition, "seq": seq}
    try:
        return _decode_file(content, expected)
    except (ValueError, RecursionError, KeyError, TypeError, binascii.Error) as exc:
        raise SinkError(
            "a committed state file is not what its manifest names",
            path=str(path),
            reason=f"{type(exc).__name__}: {str(exc)[:80]}",
        ) from exc


def _decode_file(content: bytes, expected: dict[str, Any]) -> list[StateLine]:
    lines = content.splitlines()
    header = json.loads(lines[0]) if lines else None
    if not isinstance(header, dict) or any(header.get(k) != v for k, v in expected.items()):
        raise ValueError("its header names another file")
    if header.get("lines") != len(lines) - 1 or not content.endswith(b"\n"):
        raise ValueError("it is not complete")
    return [_decode_line(line) for line in lines[1:]]


def _decode_line(line: bytes) -> StateLine:
    record = json.loads(line)
    key = record["key"]
    if not isinstance(key, str):
        raise TypeError("key")
    if record.get("deleted") is True:
        return key, None, 0
    version = record["version"]
    if type(version) is not int:
        raise TypeError("version")
    if "value" in record:
        value = record["value"]
        if not isinstance(value, str):
            raise TypeError("value")
        return key, value.encode("utf-8"), version
    return key, base64.b64decode(record["value_base64"], validate=True), version
