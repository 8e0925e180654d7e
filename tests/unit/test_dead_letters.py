"""consumer.deadletters.writer: the headers a dead letter carries, and reading them back."""

from __future__ import annotations

import pytest

from consumer import ConfigError, DecodeError, RawRecord, RecordError
from consumer.deadletters.writer import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_OFFSET,
    HEADER_PREFIX,
    DeadLetterOrigin,
    dead_letter_headers,
    error_class,
    original_record,
    resolve_topic,
)
from consumer.engine.batch import DeadLetter

ORIGINAL = RawRecord(
    topic="orders",
    partition=3,
    offset=41,
    timestamp_ms=1_700_000_000_123,
    key=b"\x00key",
    value=b"\x00\x00\x00\x00\x07garbage",
    headers=(("trace", b"abc"), ("empty", None)),
)


def _letter(error: RecordError) -> DeadLetter:
    return DeadLetter(record=ORIGINAL, error=error, attempts=3)


def _as_read_back(headers: list[tuple[str, bytes]]) -> RawRecord:
    """The dead letter as a consumer of the dead-letter topic sees it."""
    return RawRecord(
        topic="g.dlq",
        partition=0,
        offset=7,
        timestamp_ms=1,
        key=ORIGINAL.key,
        value=ORIGINAL.value,
        headers=tuple(headers),
    )


def test_headers_name_the_origin_and_the_error_and_keep_the_original_headers_first() -> None:
    error = DecodeError("unknown schema id 7", field="schema id").located(
        topic="orders", partition=3, offset=41
    )
    headers = dead_letter_headers(_letter(error), "g")

    assert headers[:2] == [("trace", b"abc"), ("empty", b"")]
    found = dict(headers)
    assert found[HEADER_OFFSET] == b"41"
    assert found[HEADER_ERROR_CLASS] == b"DecodeError"
    assert found[HEADER_ERROR_FIELD] == b"schema id"
    assert b"unknown schema id 7" in found[HEADER_ERROR_MESSAGE]
    assert b"offset=41" in found[HEADER_ERROR_MESSAGE]


def test_a_processor_exception_is_reported_by_its_own_class() -> None:
    error = RecordError("processor raised ValueError: boom", topic="orders", partition=3, offset=41)
    error.__cause__ = ValueError("boom")

    assert error_class(error) == "ValueError"
    assert dict(dead_letter_headers(_letter(error), "g"))[HEADER_ERROR_CLASS] == b"ValueError"


def test_the_original_record_is_read_back_from_a_dead_letter_byte_for_byte() -> None:
    error = RecordError("bad", topic="orders", partition=3, offset=41)
    found = original_record(_as_read_back(dead_letter_headers(_letter(error), "g")))

    assert found is not None
    original, origin = found
    assert original == RawRecord(
        topic="orders",
        partition=3,
        offset=41,
        timestamp_ms=1_700_000_000_123,
        key=ORIGINAL.key,
        value=ORIGINAL.value,
        headers=(("trace", b"abc"), ("empty", b"")),
    )
    assert (origin.group, origin.attempts, origin.error_class) == ("g", 3, "RecordError")
    assert not any(name.startswith(HEADER_PREFIX) for name, _v in original.headers)


def test_a_record_without_our_headers_is_not_a_dead_letter() -> None:
    assert DeadLetterOrigin.from_headers([("trace", b"abc")]) is None
    assert original_record(_as_read_back([("offsetkeeper.dlq.topic", b"t")])) is None


def test_the_topic_template_fills_in_group_and_topic() -> None:
    assert resolve_topic("{group}.dlq", group="g", source_topic="t") == "g.dlq"
    assert resolve_topic("dlq-{topic}", group="g", source_topic="t") == "dlq-t"
    with pytest.raises(ConfigError, match="only use"):
        resolve_topic("{cluster}.dlq", group="g", source_topic="t")
