"""The keyed-state bench's workload and its two apps (issue #15).

A record's value is `{"k": KEY, "a": AMOUNT}` (JSON, about 25 bytes); its Kafka key is KEY and
its partition `workload.partition_of(KEY)`. Every record is a function of its sequence number:

- the first pass of a run over N keys: record `seq` (0..N-1) carries key `key_for(seq)`, so
  every key comes once (the worst case for a cache: no record re-reads an entry);
- the second pass ("flat cost"): `hot_records` (100,000) more records appended to the same
  topic, over `hot_keys` (1,000) of those N keys, spread evenly, each hot_records // hot_keys
  times, consumed on top of the sink the first pass left (N entries).

Both apps write one upsert row per record into `state_sums` (key, count, sum):

- `stateful_app` keeps `{"count": n, "sum": s}` per key in keyed state (`state_key` names the
  record's key, so a batch's cache misses are read in one call per partition) and writes the
  running totals;
- `stateless_app` writes the same row without state: count 1, sum = the record's amount.

`Workload.expected` recomputes what a correct sink holds after each pass, key by key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import workload

from consumer import App, KeyedState, Record, Row, StateSchema, Table

TABLE = "state_sums"
COLUMNS: dict[str, str] = {"key": "text", "count": "bigint", "sum": "bigint"}
HOT_KEYS = 1000
HOT_RECORDS = 100_000

SUMS = Table(name=TABLE, columns=COLUMNS, key=("key",))


def key_for(index: int) -> str:
    return f"k{index:08d}"


def key_index(key: str) -> int:
    return int(key[1:])


def amount(seq: int) -> int:
    return 1 + ((seq * 2654435761) % 2**32) % 997


@dataclass(frozen=True)
class Workload:
    """The records of one run over `n` keys, and what a correct sink holds afterwards."""

    n: int
    hot_keys: int = HOT_KEYS
    hot_records: int = HOT_RECORDS

    def __post_init__(self) -> None:
        if not 0 < self.hot_keys <= self.n or self.hot_records % self.hot_keys:
            raise ValueError("hot keys must be 1..n and divide the hot records")

    def hot_index(self, j: int) -> int:
        """The key index of hot key j (0..hot_keys-1): spread evenly over the n keys."""
        return j * (self.n // self.hot_keys)

    def first_pass(self) -> Iterator[tuple[int, str, bytes]]:
        """(partition, key, value) of records 0..n-1: each of the n keys once."""
        for seq in range(self.n):
            yield _record(seq, key_for(seq))

    def second_pass(self) -> Iterator[tuple[int, str, bytes]]:
        """(partition, key, value) of records n..n+hot_records-1: the hot keys, round robin."""
        for r in range(self.hot_records):
            yield _record(self.n + r, key_for(self.hot_index(r % self.hot_keys)))

    def expected(self, *, stateful: bool, second: bool) -> Callable[[str], tuple[int, int] | None]:
        """key -> the (count, sum) a correct sink holds after the first pass (or both passes);
        None for a key the workload never wrote. Computed per key: nothing of size n is kept."""
        hot: dict[str, tuple[int, int]] = {}
        if second:
            per_key = self.hot_records // self.hot_keys
            for j in range(self.hot_keys):
                index = self.hot_index(j)
                seqs = [self.n + j + self.hot_keys * t for t in range(per_key)]
                if stateful:
                    hot[key_for(index)] = (1 + per_key, amount(index) + sum(map(amount, seqs)))
                else:  # an upsert per record: the last record's row
                    hot[key_for(index)] = (1, amount(seqs[-1]))
        n = self.n

        def of(key: str) -> tuple[int, int] | None:
            found = hot.get(key)
            if found is not None:
                return found
            try:
                index = key_index(key)
            except ValueError:
                return None
            return (1, amount(index)) if 0 <= index < n and key == key_for(index) else None

        return of


def _record(seq: int, key: str) -> tuple[int, str, bytes]:
    value = b'{"k":"%s","a":%d}' % (key.encode(), amount(seq))
    return workload.partition_of(key), key, value


def _stateful(record: Record, state: KeyedState) -> Row:
    key: str = record.value["k"]
    entry = state.get(key)
    if entry is None:
        entry = {"count": 0, "sum": 0}
    entry["count"] += 1
    entry["sum"] += record.value["a"]
    state[key] = entry
    return Row(TABLE, {"key": key, "count": entry["count"], "sum": entry["sum"]})


def _stateless(record: Record) -> Row:
    return Row(TABLE, {"key": record.value["k"], "count": 1, "sum": record.value["a"]})


def _state_key(record: Record) -> str | None:
    value = record.value
    return value.get("k") if isinstance(value, dict) else None


stateful_app = App(
    name="bench-state",
    tables=(SUMS,),
    decode="json",
    processor=_stateful,
    state=StateSchema(version=1),
    state_key=_state_key,
)
stateless_app = App(name="bench-state-none", tables=(SUMS,), decode="json", processor=_stateless)


def entry_value(raw: bytes) -> tuple[int, int]:
    """(count, sum) of a stored state entry's JSON."""
    value = json.loads(raw)
    return int(value["count"]), int(value["sum"])
