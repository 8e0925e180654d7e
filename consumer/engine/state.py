"""Keyed processor state: the mapping a stateful processor sees, and how the engine keeps it.

A stateful app's processor gets, per record, a `KeyedState`: a mapping of str keys to JSON
values over its partition's state. Three layers answer a read, newest first:

    the record's own view (values it read or set, decoded once per record)
    the batch's pending changes (`BatchState`: the records before it in this batch)
    the committed state (`PartitionState`: an LRU cache of entries over the sink)

When a record succeeds, each key it touched is encoded again and, if its JSON or version
changed, becomes a pending change (so an in-place mutation of a value read is kept, and a
failed record leaves nothing behind). The batch's changes are written by the sink in the
batch's transaction (`StateStore.write_state`) and applied to the cache after it commits: a
batch's cost follows the keys it changed, not the size of the state.

Bounded memory: the cache (`StateCache`) holds committed entries of every partition up to a
byte budget; an evicted entry is read from the sink again when needed. A partition whose
sink holds no entries (or few enough to load at assignment) is *complete*: a miss is then an
absent key, with no read at all, until one of its entries is evicted. `App.state_key` names
the keys a record touches, so a batch's misses are read in one call per partition.

Versions: each entry carries the app's state version that wrote it; an older one is upgraded
when read (`StateSchema.upgraders`, one entry at a time) and written back by the batch that
read it. A newer one is refused (`CheckpointFormatError`), and nothing is written.

A checkpoint of format 2 holds the whole state as one JSON object ("legacy blob"). It is split
into entries in memory at assignment, and written as entries by the first batch that commits
the partition, in the transaction that also clears the blob: kill -9 anywhere leaves either
the blob or the entries.
"""

from __future__ import annotations

import itertools
import json
import json.encoder
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from consumer.checkpoints.model import Checkpoint
from consumer.checkpoints.versioning import upgrade_chain
from consumer.core.app import StateKeyFunction, StateSchema
from consumer.core.errors import CheckpointError, InvalidRecordError
from consumer.core.records import Record, TopicPartition
from consumer.engine.sink import StateChange, StateStore

# Bytes a cached entry is counted for beyond its key's and value's length. tracemalloc shows
# 300 (217 for the tuples and the ordered dict's slot and node, 82 for the str and bytes
# headers); RSS grows by more once the cache is full and evicts (the allocator keeps freed
# objects' pages): 5M keys through a 64 MiB cache grew RSS by ~120 MiB with 300. Counting 450
# keeps RSS near the budget.
ENTRY_OVERHEAD_BYTES = 450
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# A partition whose stored entries fit in this share of the cache, besides what the cache
# holds already, is loaded whole at assignment (one scan instead of a read per miss).
_PRELOAD_SHARE = 0.5

Stored = tuple[bytes | None, int]  # an entry's JSON (None: absent) and its version
_ABSENT: Any = object()


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# One encoder and decoder for every entry. json.dumps with options builds an encoder per call,
# which costs more than encoding a small value; CPython's C encoder, made once, encodes one in
# about 1.4 us against 3.3 us (no circular-reference check: a cycle is a RecursionError).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_MAKE_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = (
    None
    if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(
        None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )
)
_DECODER = json.JSONDecoder()


def encode_value(value: Any) -> bytes:
    """An entry's value as stored: strict compact JSON (no NaN), ASCII; keys in the value's
    order."""
    if _C_ENCODER is None:
        return _ENCODER.encode(value).encode()
    return "".join(_C_ENCODER(value, 0)).encode()


class StateCache:
    """Committed entries of every partition of one loop, least recently used first, within a
    byte budget. Evicting an entry makes its partition incomplete (its sink must be read).

    Entries are keyed by (the owner's slot number, key): tuples of atomic values, which the
    garbage collector stops tracking, so a cache of millions of entries adds nothing to each
    collection (keyed by the owner object itself, it made every record ~30% slower)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, str], Stored] = OrderedDict()
        self._owners: dict[int, PartitionState] = {}
        self._slots = itertools.count()

    def slot_for(self, owner: PartitionState) -> int:
        """A new slot number for a new ownership of a partition."""
        slot = next(self._slots)
        self._owners[slot] = owner
        return slot

    def release(self, slot: int) -> None:
        """The ownership ended: its entries age out; it is no longer told of evictions."""
        self._owners.pop(slot, None)

    def get(self, slot: int, key: str) -> Stored | None:
        found = self._entries.get((slot, key))
        if found is not None:
            self._entries.move_to_end((slot, key))
        return found

    def put(self, slot: int, key: str, stored: Stored) -> None:
        entries = self._entries
        entry = (slot, key)
        previous = entries.pop(entry, None)
        if previous is not None:
            self.bytes -= _cost(key, previous)
        entries[entry] = stored
        self.bytes += _cost(key, stored)
        while self.bytes > self.max_bytes and entries:
            (evicted_slot, evicted_key), evicted = entries.popitem(last=False)
            self.bytes -= _cost(evicted_key, evicted)
            owner = self._owners.get(evicted_slot)
            if owner is not None:
                owner.complete = False

    def __len__(self) -> int:
        return len(self._entries)


def _cost(key: str, stored: Stored) -> int:
    return len(key) + len(stored[0] or b"") + ENTRY_OVERHEAD_BYTES


class PartitionState:
    """One partition's committed state as of its position: cached entries over the sink,
    plus a format-2 blob's entries until a commit has written them. Each ownership has its
    own cache slot, so a new one never sees an earlier one's cached entries."""

    def __init__(
        self,
        store: StateStore,
        group: str,
        partition: TopicPartition,
        cache: StateCache,
        *,
        complete: bool,
        legacy: dict[str, Stored] | None = None,
    ) -> None:
        self.store = store
        self.group = group
        self.partition = partition
        self.cache = cache
        # True: every entry of the partition is in the cache or `legacy` (a miss is absent).
        self.complete = complete
        self.legacy = legacy or {}
        self.slot = cache.slot_for(self)

    def lookup(self, key: str) -> Stored:
        """The committed entry of `key` ((None, 0) when absent), reading the sink on a miss."""
        if self.legacy:
            return self.legacy.get(key, (None, 0))
        found = self.cache.get(self.slot, key)
        if found is not None:
            return found
        if self.complete:
            return (None, 0)
        return self.fetch([key]).get(key, (None, 0))

    def fetch(self, keys: Iterable[str]) -> dict[str, Stored]:
        """Read the entries of `keys` that are not cached, in one call to the sink; returns
        them (absent ones as (None, 0)) and caches them."""
        if self.complete or self.legacy:
            return {}
        missing = {key for key in keys if self.cache.get(self.slot, key) is None}
        if not missing:
            return {}
        stored = self.store.read_state(self.group, self.partition, missing)
        fetched: dict[str, Stored] = {}
        for key in missing:
            entry = stored.get(key)
            fetched[key] = (None, 0) if entry is None else (entry.value, entry.version)
            self.cache.put(self.slot, key, fetched[key])
        return fetched

    def apply(self, changes: Sequence[StateChange]) -> None:
        """A batch's changes, now committed (a blob they included is written: drop it)."""
        self.legacy = {}
        for change in changes:
            self.cache.put(self.slot, change.key, (change.value, change.version))


def open_partition_state(
    store: StateStore,
    cache: StateCache,
    group: str,
    partition: TopicPartition,
    checkpoint: Checkpoint | None,
) -> PartitionState:
    """The partition's committed state at assignment: a format-2 blob split into entries, or
    the sink's entries (loaded whole when they fit the cache's preload share)."""
    if checkpoint is not None and checkpoint.state is not None:
        legacy = split_legacy_blob(checkpoint.state, checkpoint.state_version, partition)
        return PartitionState(store, group, partition, cache, complete=True, legacy=legacy)
    count, size = store.state_sizes(group, [partition]).get(partition, (0, 0))
    state = PartitionState(store, group, partition, cache, complete=count == 0)
    needed = size + count * (ENTRY_OVERHEAD_BYTES + 16)  # 16: a short key's length
    if count and cache.bytes + needed <= cache.max_bytes * _PRELOAD_SHARE:
        state.complete = True  # set first: a put that evicts one of them clears it again
        for entry in store.scan_state(group, partition):
            cache.put(state.slot, entry.key, (entry.value, entry.version))
    return state


def split_legacy_blob(
    blob: bytes, version: int | None, partition: TopicPartition
) -> dict[str, Stored]:
    """A format-2 state blob (one JSON object) as entries: one per top-level key, carrying the
    blob's state version (upgraded per entry when read)."""
    context = {"topic": partition.topic, "partition": partition.partition}
    try:
        whole = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError("stored processor state is not JSON", **context) from exc
    if whole is None:
        return {}
    if not isinstance(whole, dict):
        raise CheckpointError(
            "a format-2 state blob must be a JSON object to become keyed state entries "
            f"(it is a JSON {type(whole).__name__}); nothing was changed",
            **context,
        )
    entry_version = version or 1
    return {str(key): (encode_value(value), entry_version) for key, value in whole.items()}


class BatchState:
    """One batch's work on one partition's state: the pending changes of the records that
    succeeded so far, over the committed state."""

    def __init__(self, owner: PartitionState, schema: StateSchema) -> None:
        self.owner = owner
        self.schema = schema
        self._pending: dict[str, Stored] = {}
        # Entries prefetched for this batch: kept here too, as the cache may evict them
        # before their records come (a batch touching more keys than the cache holds).
        self._fetched: dict[str, Stored] = {}

    def record_view(self) -> KeyedState:
        """The mapping one record's processor call sees."""
        return KeyedState(self)

    def base(self, key: str) -> Stored:
        found = self._pending.get(key) or self._fetched.get(key)
        return found if found is not None else self.owner.lookup(key)

    def prefetch(self, keys: Iterable[str]) -> None:
        self._fetched.update(self.owner.fetch(key for key in keys if key not in self._pending))

    def keep(self, view: KeyedState) -> None:
        """The record succeeded: each key it touched whose JSON or version changed is pending.
        Raises `InvalidRecordError` for a value that is not JSON (the record's failure)."""
        version = self.schema.version
        kept: dict[str, Stored] = {}  # all encoded first: a failure keeps none of them
        for key, value in view.touched.items():
            encoded = None if value is _ABSENT else _encoded(key, value)
            base = view.bases.get(key)  # None: set without being read first
            if base is not None and encoded == base[0] and (encoded is None or base[1] == version):
                continue  # unchanged, or absent before and after
            kept[key] = (encoded, version)
        self._pending.update(kept)

    def changes(self) -> list[StateChange]:
        """What committing this batch writes: its pending changes, and a blob's entries that
        no commit has written yet."""
        tp = self.owner.partition
        changes = [
            StateChange(tp, key, value, version)
            for key, (value, version) in self.owner.legacy.items()
            if key not in self._pending
        ]
        changes.extend(
            StateChange(tp, key, value, version) for key, (value, version) in self._pending.items()
        )
        return changes


def _encoded(key: str, value: Any) -> bytes:
    try:
        return encode_value(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRecordError(
            "the processor stored a state value that is not JSON (dict, list, str, number, "
            "bool or None; no NaN)",
            field=f"state[{key[:80]!r}]",
            reason=f"{type(exc).__name__}: {str(exc)[:120]}",
        ) from None


class KeyedState:
    """The partition's state as one record's processor sees it: a mapping of str keys to JSON
    values (`get`, `[]`, `in`, `del`, `setdefault`, `pop`). It cannot be iterated or counted
    (the state may be larger than memory). Values are decoded for this record: change them in
    place or assign them; both are kept when the record succeeds."""

    __slots__ = ("_batch", "bases", "touched")

    def __init__(self, batch: BatchState) -> None:
        self._batch = batch
        self.touched: dict[str, Any] = {}  # key -> value as this record left it (or _ABSENT)
        self.bases: dict[str, Stored] = {}  # key -> the entry before this record, when read

    def _load(self, key: str) -> Any:
        if key in self.touched:
            return self.touched[key]
        _check_key(key)
        base = self._batch.base(key)
        self.bases[key] = base
        value = _ABSENT if base[0] is None else self._decoded(key, base)
        self.touched[key] = value
        return value

    def _decoded(self, key: str, stored: Stored) -> Any:
        return current_value(self._batch.schema, stored, key, self._batch.owner.partition)

    def __getitem__(self, key: str) -> Any:
        value = self._load(key)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._load(key)
        return default if value is _ABSENT else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._load(key) is not _ABSENT

    def __setitem__(self, key: str, value: Any) -> None:
        _check_key(key)
        self.touched[key] = value

    def __delitem__(self, key: str) -> None:
        if self._load(key) is _ABSENT:
            raise KeyError(key)
        self.touched[key] = _ABSENT

    def setdefault(self, key: str, default: Any = None) -> Any:
        value = self._load(key)
        if value is _ABSENT:
            self.touched[key] = value = default
        return value

    def pop(self, key: str, *default: Any) -> Any:
        value = self._load(key)
        if value is _ABSENT:
            if default:
                return default[0]
            raise KeyError(key)
        self.touched[key] = _ABSENT
        return value

    def __iter__(self) -> Iterator[str]:
        raise TypeError("keyed state cannot be iterated: it may be larger than memory")

    def __len__(self) -> int:
        raise TypeError("keyed state cannot be counted: it may be larger than memory")


def current_value(schema: StateSchema, stored: Stored, key: str, partition: TopicPartition) -> Any:
    """A stored entry's value at the app's state version: decoded, and upgraded one version at
    a time when older. A newer version raises `CheckpointFormatError` (nothing is written)."""
    raw, version = stored
    try:
        value = _DECODER.decode(raw.decode()) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):  # the sink's data, not the record's
        raise CheckpointError(
            "a stored state entry is not JSON",
            key=key[:80],
            topic=partition.topic,
            partition=partition.partition,
        ) from None
    if version != schema.version:
        value = upgrade_chain(
            value,
            from_version=version,
            to_version=schema.version,
            steps=schema.upgraders,
            what="state entry",
            key=key[:80],
            topic=partition.topic,
            partition=partition.partition,
        )
    return value


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"state keys are str, got {type(key).__name__}")


def keys_of(state_key: StateKeyFunction, record: Record) -> Iterable[str]:
    """The keys `App.state_key` names for `record` (none when it fails: the record's own
    processing reports that)."""
    try:
        keys = state_key(record)
    except Exception:  # the processor meets the same record and handles its failure
        return ()
    if keys is None:
        return ()
    if isinstance(keys, str):
        return (keys,)
    return [key for key in keys if isinstance(key, str)]
