"""consumer.checkpoints.model: the checkpoint model, its versioned codec, the released schemas."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import pytest

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointFormatError,
    TopicPartition,
    decode_checkpoint,
    encode_checkpoint,
    from_avro,
    to_avro,
)
from consumer.checkpoints.model import upgrade_record
from schemas import checkpoint_schema_text, released_checkpoint_versions

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "checkpoint"

CHECKPOINT = Checkpoint(
    group="g",
    topic="orders",
    partition=3,
    next_offset=2**40 + 5,
    updated_at=datetime(2024, 5, 1, 12, 34, 56, 789000, tzinfo=UTC),
)


def _record(**overrides: Any) -> dict[str, Any]:
    return {**encode_checkpoint(CHECKPOINT), **overrides}


# -- the model and the in-memory codec -------------------------------------------------------------


def test_encode_gives_the_current_format_record() -> None:
    assert encode_checkpoint(CHECKPOINT) == {
        "format_version": CURRENT_FORMAT_VERSION,
        "group": "g",
        "topic": "orders",
        "partition": 3,
        "next_offset": 2**40 + 5,
        "updated_at": datetime(2024, 5, 1, 12, 34, 56, 789000, tzinfo=UTC),
        "epoch": 0,
        "leader_epoch": None,
        "writer_version": "unknown",
        "state": None,
        "state_version": None,
    }


def test_encode_decode_round_trip() -> None:
    assert decode_checkpoint(encode_checkpoint(CHECKPOINT)) == CHECKPOINT


def test_decode_accepts_updated_at_as_epoch_millis() -> None:
    millis = int(CHECKPOINT.updated_at.timestamp() * 1000)
    assert decode_checkpoint(_record(updated_at=millis)) == CHECKPOINT


def test_checkpoint_names_its_topic_partition_and_is_frozen() -> None:
    assert CHECKPOINT.topic_partition == TopicPartition("orders", 3)
    with pytest.raises(AttributeError):
        CHECKPOINT.next_offset = 0  # type: ignore[misc]


def test_avro_round_trip() -> None:
    data = to_avro(CHECKPOINT)
    assert isinstance(data, bytes)
    assert from_avro(data, format_version=CURRENT_FORMAT_VERSION) == CHECKPOINT


def test_avro_keeps_millisecond_precision_only() -> None:
    precise = Checkpoint("g", "t", 0, 1, datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC))
    decoded = from_avro(to_avro(precise), format_version=CURRENT_FORMAT_VERSION)
    assert decoded.updated_at == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert decoded.next_offset == 1


# -- the golden fixture of format v1 (never regenerated: see tests/fixtures/checkpoints/README.md)


def _golden_expected() -> dict[str, Any]:
    expected: dict[str, Any] = json.loads((GOLDEN / "v1.json").read_text(encoding="utf-8"))
    return expected


def test_golden_v1_decodes_to_the_recorded_checkpoint() -> None:
    expected = _golden_expected()
    data = (GOLDEN / "v1.avro").read_bytes()

    checkpoint = from_avro(data, format_version=1)

    assert checkpoint == Checkpoint(
        group=expected["group"],
        topic=expected["topic"],
        partition=expected["partition"],
        next_offset=expected["next_offset"],
        updated_at=datetime.fromisoformat(expected["updated_at"]),
    )
    assert int(checkpoint.updated_at.timestamp() * 1000) == expected["updated_at_ms"]
    assert checkpoint.updated_at.tzinfo is not None


def test_golden_v2_decodes_to_the_recorded_checkpoint() -> None:
    expected = json.loads((GOLDEN / "v2.json").read_text(encoding="utf-8"))
    checkpoint = from_avro((GOLDEN / "v2.avro").read_bytes(), format_version=2)
    assert checkpoint == Checkpoint(
        group=expected["group"],
        topic=expected["topic"],
        partition=expected["partition"],
        next_offset=expected["next_offset"],
        updated_at=datetime.fromisoformat(expected["updated_at"]),
        epoch=expected["epoch"],
        leader_epoch=expected["leader_epoch"],
        writer_version=expected["writer_version"],
        state=expected["state_utf8"].encode(),
        state_version=expected["state_version"],
    )


def test_golden_v1_upgrades_to_v2_with_unknowns_stated() -> None:
    checkpoint = from_avro((GOLDEN / "v1.avro").read_bytes(), format_version=1)
    assert (checkpoint.epoch, checkpoint.leader_epoch, checkpoint.writer_version) == (
        0,
        None,
        "unknown",
    )
    assert (checkpoint.state, checkpoint.state_version) == (None, None)


def test_golden_v1_bytes_are_exactly_the_v1_schema_encoding_of_the_recorded_fields() -> None:
    expected = _golden_expected()
    schema = avro.schema.parse(checkpoint_schema_text(1))
    data = (GOLDEN / "v1.avro").read_bytes()

    raw_record = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(data)))
    assert raw_record == {
        "format_version": 1,
        "group": expected["group"],
        "topic": expected["topic"],
        "partition": expected["partition"],
        "next_offset": expected["next_offset"],
        "updated_at": datetime.fromisoformat(expected["updated_at"]),
    }

    buffer = io.BytesIO()
    avro.io.DatumWriter(schema).write(raw_record, avro.io.BinaryEncoder(buffer))
    assert buffer.getvalue() == data


# -- format versions: newer refused, invalid refused -------------------------------------------


def test_a_newer_format_is_refused_naming_both_versions() -> None:
    newer = CURRENT_FORMAT_VERSION + 1

    with pytest.raises(CheckpointFormatError) as caught:
        decode_checkpoint(_record(format_version=newer, extra_field="from the future"))

    message = str(caught.value)
    assert f"v{newer}" in message
    assert f"v{CURRENT_FORMAT_VERSION}" in message
    assert caught.value.context["stored_version"] == newer
    assert caught.value.context["supported_version"] == CURRENT_FORMAT_VERSION
    assert caught.value.context["topic"] == "orders"
    assert caught.value.context["partition"] == 3


def test_avro_of_a_newer_format_is_refused_naming_both_versions() -> None:
    newer = CURRENT_FORMAT_VERSION + 1
    with pytest.raises(CheckpointFormatError) as caught:
        from_avro(to_avro(CHECKPOINT), format_version=newer)
    assert f"v{newer}" in str(caught.value)
    assert f"v{CURRENT_FORMAT_VERSION}" in str(caught.value)


def test_a_newer_format_is_a_checkpoint_error() -> None:
    assert issubclass(CheckpointFormatError, CheckpointError)


@pytest.mark.parametrize("version", [None, 0, -1, "1", 1.0, True])
def test_missing_or_invalid_format_version_is_refused(version: Any) -> None:
    record = _record(format_version=version)
    if version is None:
        del record["format_version"]
    with pytest.raises(CheckpointFormatError, match="no valid format_version"):
        decode_checkpoint(record)


def test_upgrade_of_a_current_record_changes_nothing() -> None:
    record = _record()
    assert upgrade_record(record) == record
    assert upgrade_record(record) is not record, "the stored record is never modified in place"


@pytest.mark.parametrize("missing", ["group", "topic", "partition", "next_offset", "updated_at"])
def test_a_record_missing_a_field_is_a_checkpoint_error(missing: str) -> None:
    record = _record()
    del record[missing]
    with pytest.raises(CheckpointError, match="missing a field") as caught:
        decode_checkpoint(record)
    assert caught.value.context["format_version"] == CURRENT_FORMAT_VERSION
    assert missing in caught.value.context["detail"]


def test_a_record_with_a_non_numeric_offset_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="wrong type"):
        decode_checkpoint(_record(next_offset="ten"))


def test_avro_for_a_format_with_no_schema_is_refused() -> None:
    with pytest.raises(CheckpointFormatError, match="no schema ships"):
        from_avro(b"", format_version=0)


# -- the released schemas ----------------------------------------------------------------------


def test_released_versions_are_every_schema_file_from_v1_to_current() -> None:
    on_disk = sorted(
        int(path.stem[1:]) for path in SCHEMA_DIR.glob("v*.avsc") if path.stem[1:].isdigit()
    )
    assert released_checkpoint_versions() == on_disk
    assert on_disk == list(range(1, CURRENT_FORMAT_VERSION + 1))


@pytest.mark.parametrize("version", released_checkpoint_versions())
def test_every_released_schema_parses_as_a_checkpoint_record(version: int) -> None:
    schema = avro.schema.parse(checkpoint_schema_text(version))
    assert isinstance(schema, avro.schema.RecordSchema)
    assert schema.name == "Checkpoint"
    assert schema.namespace == f"io.offsetkeeper.checkpoint.v{version}"
    assert schema.fields_dict["format_version"].type.type == "int"


@pytest.mark.parametrize("version", released_checkpoint_versions())
def test_every_released_format_has_a_golden_fixture(version: int) -> None:
    assert (GOLDEN / f"v{version}.avro").is_file()
    assert (GOLDEN / f"v{version}.json").is_file()


def test_the_encoded_record_validates_against_the_current_schema() -> None:
    schema = avro.schema.parse(checkpoint_schema_text(CURRENT_FORMAT_VERSION))
    assert isinstance(schema, avro.schema.RecordSchema)
    record = encode_checkpoint(CHECKPOINT)

    assert avro.io.validate(schema, record, raise_on_error=True)
    assert set(record) == set(schema.fields_dict)


def test_a_record_with_a_wrong_type_does_not_validate() -> None:
    schema = avro.schema.parse(checkpoint_schema_text(CURRENT_FORMAT_VERSION))
    assert not avro.io.validate(schema, _record(partition="three"))


# -- records from outside: every field checked, a CheckpointError naming it ------------------------


@pytest.mark.parametrize(
    ("field", "value", "detail"),
    [
        ("group", 7, "must be a string"),
        ("topic", ["orders"], "must be a string, got a list"),
        ("writer_version", None, "must be a string"),
        ("partition", -1, "must be in [0, 2147483647]"),
        ("partition", 2**31, "must be in [0, 2147483647]"),
        ("partition", True, "must be an integer"),
        ("partition", "3", "must be an integer"),
        ("partition", 3.0, "must be an integer"),
        ("next_offset", -1, "must be in [0, 9223372036854775807]"),
        ("next_offset", 2**63, "must be in [0, 9223372036854775807]"),
        pytest.param("next_offset", 10**5000, "got an integer of", id="next_offset-5000-digits"),
        ("next_offset", "ten", "must be an integer"),
        ("epoch", -5, "must be in [0,"),
        ("leader_epoch", -2, "must be in [-1,"),
        ("leader_epoch", "7", "must be an integer"),
        ("state", 10**12, "must be bytes or null, got int"),  # bytes(10**12) would allocate
        ("state", "c3RhdGU=", "must be bytes or null, got str"),
        ("state_version", -1, "must be in [0,"),
        ("updated_at", 10**20, "out of range"),
        ("updated_at", -(10**20), "out of range"),
        ("updated_at", "2024-05-01", "epoch milliseconds or a datetime"),
        ("updated_at", 1.5, "epoch milliseconds or a datetime"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_a_checkpoint_error_naming_it(
    field: str, value: Any, detail: str
) -> None:
    with pytest.raises(CheckpointError, match="missing a field or has a wrong type") as caught:
        decode_checkpoint(_record(**{field: value}))

    assert caught.value.context["field"] == field
    assert detail in caught.value.context["detail"]
    assert len(str(caught.value)) < 400, "a hostile value is never quoted in full"


def test_a_record_that_is_not_a_mapping_is_a_checkpoint_error() -> None:
    for record in ([1, 2], "text", None, 7):
        with pytest.raises(CheckpointError, match="not an object"):
            decode_checkpoint(record)  # type: ignore[arg-type]


def test_bytes_like_state_is_kept_as_bytes() -> None:
    for state in (bytearray(b"s"), memoryview(b"s")):
        assert decode_checkpoint(_record(state=state)).state == b"s"


def test_a_huge_format_version_is_refused_without_quoting_it() -> None:
    with pytest.raises(CheckpointFormatError, match="newer than this code knows") as caught:
        decode_checkpoint(_record(format_version=10**5000))
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "data",
    [b"", b"\x04", b"\xff" * 64, b"\x00" * 3, to_avro(CHECKPOINT)[:-3], b"\x80" * 20],
    ids=["empty", "truncated-varint", "garbage", "zeros", "truncated", "endless-varint"],
)
def test_avro_bytes_that_do_not_decode_are_a_checkpoint_error(data: bytes) -> None:
    with pytest.raises(CheckpointError) as caught:
        from_avro(data, format_version=CURRENT_FORMAT_VERSION)
    assert caught.value.context["format_version"] == CURRENT_FORMAT_VERSION
