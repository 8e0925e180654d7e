"""What the `offsetkeeper checkpoint` commands do with keyed state: its size per partition
(`show`), its entries in an export document (`export`/`import`), and the eager upgrade of
every entry, blobs of format 2 included (`migrate --app`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from consumer.checkpoints.model import Checkpoint
from consumer.core.app import StateSchema
from consumer.core.errors import ConfigError
from consumer.core.records import TopicPartition
from consumer.engine.sink import Sink, StateChange, StateEntry, StateStore
from consumer.engine.state import Stored, current_value, encode_value, split_legacy_blob


def state_sizes(sink: Sink, group: str) -> dict[TopicPartition, tuple[int, int]]:
    """(entries, bytes of their values) per partition; nothing for a sink without state."""
    return sink.state_sizes(group) if isinstance(sink, StateStore) else {}


def export_entries(sink: Sink, group: str, partitions: Iterable[TopicPartition]) -> list[Any]:
    """Every state entry of the partitions, JSON-ready: the value as its JSON text."""
    if not isinstance(sink, StateStore):
        return []
    return [
        {
            "topic": tp.topic,
            "partition": tp.partition,
            "key": entry.key,
            "value": entry.value.decode(),
            "version": entry.version,
        }
        for tp in sorted(partitions)
        for entry in sink.scan_state(group, tp)
    ]


def parse_entries(
    document: Mapping[str, Any], *, path: str, group: str
) -> dict[TopicPartition, list[StateEntry]]:
    """The state entries of an export document (none in an export of version 1), each
    checked: a str key, a value that is JSON text, a version of 1 or more. Entries that name
    another group (a `migrate` backup holds every group's) are left out."""
    records = document.get("state_entries", [])
    if not isinstance(records, list):
        raise ConfigError("the export's state_entries must be a list", path=path)
    entries: dict[TopicPartition, list[StateEntry]] = {}
    for index, record in enumerate(records):
        context = {"path": path, "index": index}
        if not isinstance(record, dict):
            raise ConfigError("state entry is not an object", **context)
        if record.get("group", group) != group:
            continue
        topic, partition = record.get("topic"), record.get("partition")
        key, value, version = record.get("key"), record.get("value"), record.get("version")
        if not isinstance(topic, str) or type(partition) is not int or partition < 0:
            raise ConfigError("state entry needs a topic and a partition", **context)
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError("state entry needs a str key and a JSON text value", **context)
        if type(version) is not int or not 1 <= version < 2**31:
            raise ConfigError("state entry version must be an integer of 1 or more", **context)
        try:
            json.loads(value)
        except ValueError:
            raise ConfigError("state entry value is not JSON text", **context) from None
        stored = StateEntry(key, value.encode("utf-8", "surrogatepass"), version)
        entries.setdefault(TopicPartition(topic, partition), []).append(stored)
    return entries


def replacing_changes(
    sink: Sink,
    group: str,
    entries: Mapping[TopicPartition, list[StateEntry]],
    partitions: Iterable[TopicPartition],
) -> list[StateChange]:
    """The changes that make each partition's state exactly `entries` (an import replaces
    the state: stored keys it does not name are deleted)."""
    changes: list[StateChange] = []
    for tp in sorted(partitions):
        wanted = {entry.key: entry for entry in entries.get(tp, [])}
        if isinstance(sink, StateStore):
            changes.extend(
                StateChange(tp, stored.key, None, stored.version)
                for stored in sink.scan_state(group, tp)
                if stored.key not in wanted
            )
        changes.extend(StateChange(tp, e.key, e.value, e.version) for e in wanted.values())
    if changes and not isinstance(sink, StateStore):
        raise ConfigError("the export holds state entries, and the sink cannot store keyed state")
    return changes


@dataclass(frozen=True, slots=True)
class StateUpgrade:
    """What `checkpoint migrate --app` does to one partition's state."""

    partition: TopicPartition
    blob_entries: int  # entries split out of a format-2 blob
    upgraded: int  # entries rewritten at the app's state version
    changes: tuple[StateChange, ...]


def plan_state_upgrade(
    sink: Sink, group: str, checkpoint: Checkpoint, schema: StateSchema
) -> StateUpgrade:
    """Split a partition's format-2 blob into entries and upgrade every entry older than the
    app's state version; an entry newer than it raises `CheckpointFormatError`."""
    tp = checkpoint.topic_partition
    stored: Iterable[tuple[str, Stored]]
    if checkpoint.state is not None:
        stored = split_legacy_blob(checkpoint.state, checkpoint.state_version, tp).items()
        blob = True
    elif isinstance(sink, StateStore):
        stored = ((e.key, (e.value, e.version)) for e in sink.scan_state(group, tp))
        blob = False
    else:
        return StateUpgrade(tp, 0, 0, ())
    changes: list[StateChange] = []
    upgraded = 0
    for key, entry in stored:
        value = current_value(schema, entry, key, tp)  # refuses a newer version
        if entry[1] != schema.version:
            upgraded += 1
        elif not blob:
            continue
        changes.append(StateChange(tp, key, encode_value(value), schema.version))
    return StateUpgrade(tp, len(changes) if blob else 0, upgraded, tuple(changes))


def blob_cleared(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint once its blob's entries are written beside it."""
    return replace(checkpoint, state=None, state_version=None)
