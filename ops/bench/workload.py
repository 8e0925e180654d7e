"""The benchmark workload: deterministic records, their two encodings, and the expected sink.

Pure Python plus fastavro, so the peer's separate venv imports it too. Every record is a
function of its sequence number `seq` (0..N-1), so nothing has to be kept in memory to check a
sink afterwards:

- about 20% of records reuse the key of one of the previous `_REUSE_WINDOW` records, so upserts
  really update (the same key always lands in the same partition: `partition_of(key)`);
- a JSON value is about 200 bytes; the Avro value (Confluent wire framing: magic byte 0, a
  4-byte schema id, then Avro binary) is padded to about the same size;
- `ts_ms` is the wall-clock time the producer sent the record (for latency); it is the only
  field that is not a function of `seq`, and checks ignore it.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fastavro

PARTITIONS = 6
TABLE = "bench_events"
# Column name -> offsetkeeper column type. Every contender writes exactly these columns.
COLUMNS: dict[str, str] = {
    "id": "text",
    "customer": "text",
    "amount_cents": "bigint",
    "currency": "text",
    "status": "text",
    "seq": "bigint",
    "ts_ms": "bigint",
    "note": "text",
}
KEY_COLUMN = "id"
# The columns a check compares (ts_ms is the send time, not a function of seq).
CHECKED_COLUMNS = ("id", "customer", "amount_cents", "currency", "status", "seq", "note")
PG_DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, customer TEXT,"
    " amount_cents BIGINT, currency TEXT, status TEXT, seq BIGINT, ts_ms BIGINT, note TEXT)"
)

REPEAT_SHARE = 0.2
_REUSE_WINDOW = 10_000
_CURRENCIES = ("EUR", "USD", "GBP", "CHF")
_STATUSES = ("created", "paid", "shipped", "delivered", "cancelled")
_NOTE_SOURCE = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud "
) * 2
_JSON_NOTE_LEN = 54  # JSON value ~200 bytes
_AVRO_NOTE_LEN = 145  # Avro value ~200 bytes (no field names on the wire)

SCHEMA_ID = 1
AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "BenchEvent",
    "namespace": "offsetkeeper.bench",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "customer", "type": "string"},
        {"name": "amount_cents", "type": "long"},
        {"name": "currency", "type": "string"},
        {"name": "status", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "ts_ms", "type": "long"},
        {"name": "note", "type": "string"},
    ],
}
PARSED_SCHEMA = fastavro.parse_schema(AVRO_SCHEMA)
_HEADER = struct.pack(">bI", 0, SCHEMA_ID)


def _digest(seq: int) -> bytes:
    return hashlib.blake2b(seq.to_bytes(8, "big"), digest_size=16).digest()


def key_ids(n: int) -> array:
    """key_ids[seq]: the seq of the record that introduced the key record `seq` carries."""
    ids = array("l", bytes(8 * n))
    for seq in range(n):
        d = _digest(seq)
        repeat = seq > 0 and int.from_bytes(d[0:4], "big") < REPEAT_SHARE * 2**32
        if repeat:
            back = 1 + int.from_bytes(d[4:8], "big") % min(seq, _REUSE_WINDOW)
            ids[seq] = ids[seq - back]
        else:
            ids[seq] = seq
    return ids


def key_for(key_id: int) -> str:
    return f"ord-{key_id:09d}"


def partition_of(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


def fields(seq: int, key_id: int, encoding: str, ts_ms: int = 0) -> dict[str, Any]:
    """The record `seq` as a dict of COLUMNS (its key is that of record `key_id`)."""
    d = _digest(seq)
    note_len = _JSON_NOTE_LEN if encoding == "json" else _AVRO_NOTE_LEN
    start = d[14] % 40
    return {
        "id": key_for(key_id),
        "customer": f"cust-{int.from_bytes(d[8:11], 'big') % 50_000:05d}",
        "amount_cents": 100 + int.from_bytes(d[11:14], "big") % 999_900,
        "currency": _CURRENCIES[d[14] % len(_CURRENCIES)],
        "status": _STATUSES[d[15] % len(_STATUSES)],
        "seq": seq,
        "ts_ms": ts_ms,
        "note": _NOTE_SOURCE[start : start + note_len],
    }


def encode(value: dict[str, Any], encoding: str) -> bytes:
    if encoding == "json":
        return json.dumps(value, separators=(",", ":")).encode()
    out = io.BytesIO()
    out.write(_HEADER)
    fastavro.schemaless_writer(out, PARSED_SCHEMA, value)
    return out.getvalue()


def decode_avro(value: bytes) -> dict[str, Any]:
    """Confluent wire format -> dict; the schema is parsed once, at import."""
    if value[0] != 0:
        raise ValueError("not Confluent wire format (magic byte is not 0)")
    return fastavro.schemaless_reader(io.BytesIO(value[5:]), PARSED_SCHEMA)  # type: ignore[return-value]


def json_loads(value: bytes) -> dict[str, Any]:
    return json.loads(value)  # type: ignore[no-any-return]


def decode(value: bytes, encoding: str) -> dict[str, Any]:
    return json_loads(value) if encoding == "json" else decode_avro(value)


@dataclass(frozen=True)
class Expected:
    """What a correct sink holds after the whole workload: one row per key, the last write."""

    n: int
    encoding: str
    last_seq: dict[str, int]  # key -> seq of the last record with that key

    def row(self, key: str) -> dict[str, Any]:
        seq = self.last_seq[key]
        return fields(seq, _key_id_of(key), self.encoding)

    def per_partition(self) -> dict[int, int]:
        """Records per partition: the end offset each checkpoint must reach."""
        counts = dict.fromkeys(range(PARTITIONS), 0)
        ids = key_ids(self.n)
        for seq in range(self.n):
            counts[partition_of(key_for(ids[seq]))] += 1
        return counts


def _key_id_of(key: str) -> int:
    return int(key.removeprefix("ord-"))


def expected(n: int, encoding: str) -> Expected:
    ids = key_ids(n)
    last: dict[str, int] = {}
    for seq in range(n):
        last[key_for(ids[seq])] = seq
    return Expected(n=n, encoding=encoding, last_seq=last)


def records(
    n: int, encoding: str, ids: array | None = None, start: int = 0
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(partition, key, fields) for seq in [start, n); ts_ms is filled in when sent."""
    ids = ids if ids is not None else key_ids(n)
    for seq in range(start, n):
        key = key_for(ids[seq])
        yield partition_of(key), key, fields(seq, ids[seq], encoding)
