"""Property tests of the upgrade chains: any valid older checkpoint (and any older state)
upgrades to a valid current one that means the same offsets."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import avro.io
import avro.schema
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import CURRENT_FORMAT_VERSION, StateSchema, decode_checkpoint, encode_checkpoint
from consumer.checkpoints.model import from_avro, upgrade_record
from consumer.engine.state import BatchState, StateCache, open_partition_state
from consumer.examples.totals import state_v1_to_v2
from schemas import checkpoint_schema_text
from tests.fixtures.state_store import MemoryStateStore

names = st.text(min_size=1, max_size=40)
instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000))

v1_records = st.fixed_dictionaries(
    {
        "format_version": st.just(1),
        "group": names,
        "topic": names,
        "partition": st.integers(0, 2**31 - 1),
        "next_offset": st.integers(0, 2**63 - 1),
        "updated_at": instants,
    }
)


def _schema(version: int) -> avro.schema.Schema:
    return avro.schema.parse(checkpoint_schema_text(version))


def _v1_bytes(record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    avro.io.DatumWriter(_schema(1)).write(record, avro.io.BinaryEncoder(buffer))
    return buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(v1_records)
def test_any_v1_record_upgrades_to_a_valid_current_record_with_the_same_offsets(
    record: dict[str, Any],
) -> None:
    upgraded = upgrade_record(record)
    assert upgraded["format_version"] == CURRENT_FORMAT_VERSION
    assert avro.io.validate(_schema(CURRENT_FORMAT_VERSION), upgraded, raise_on_error=True)
    for field in ("group", "topic", "partition", "next_offset", "updated_at"):
        assert upgraded[field] == record[field]
    checkpoint = decode_checkpoint(record)
    assert encode_checkpoint(checkpoint) == upgraded
    assert checkpoint.read_from_format == 1


@settings(max_examples=100, deadline=None)
@given(v1_records)
def test_any_v1_avro_datum_decodes_to_the_same_checkpoint_as_its_record(
    record: dict[str, Any],
) -> None:
    assert from_avro(_v1_bytes(record), format_version=1) == decode_checkpoint(record)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.integers(-(2**53), 2**53), max_size=30))
def test_any_v1_totals_blob_becomes_v2_entries_keeping_every_total(state: dict[str, int]) -> None:
    """A format-2 checkpoint's blob of v1 totals: split into entries, each upgraded when read."""
    blob = json.dumps(state).encode()
    checkpoint = decode_checkpoint(
        {
            "format_version": 2,
            "group": "g",
            "topic": "t",
            "partition": 0,
            "next_offset": 5,
            "updated_at": datetime(2026, 1, 1, tzinfo=UTC),
            "epoch": 1,
            "leader_epoch": None,
            "writer_version": "0.1.0",
            "state": blob,
            "state_version": 1,
        }
    )
    store = MemoryStateStore()
    tp = checkpoint.topic_partition
    owner = open_partition_state(store, StateCache(), "g", tp, checkpoint)
    view = BatchState(owner, StateSchema(version=2, upgraders={1: state_v1_to_v2})).record_view()
    upgraded = {customer: view[customer] for customer in state}
    assert {customer: entry["total_cents"] for customer, entry in upgraded.items()} == state
    assert all(entry["currency"] == "EUR" for entry in upgraded.values())
    assert store.reads == 0  # a blob's entries are all in memory
