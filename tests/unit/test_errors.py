"""consumer.core.errors: one root, a small tree, and context that names what an error is about."""

from __future__ import annotations

import pytest

from consumer import (
    CheckpointError,
    CheckpointFormatError,
    ConfigError,
    DecodeError,
    FencedError,
    InvalidRecordError,
    KafkaError,
    OffsetkeeperError,
    RecordError,
    SinkError,
)


@pytest.mark.parametrize(
    ("error_class", "parent"),
    [
        (ConfigError, OffsetkeeperError),
        (KafkaError, OffsetkeeperError),
        (SinkError, OffsetkeeperError),
        (FencedError, SinkError),
        (CheckpointError, OffsetkeeperError),
        (CheckpointFormatError, CheckpointError),
        (RecordError, OffsetkeeperError),
        (DecodeError, RecordError),
        (InvalidRecordError, RecordError),
    ],
)
def test_the_exception_tree(error_class: type[Exception], parent: type[Exception]) -> None:
    assert error_class.__bases__ == (parent,)
    assert issubclass(error_class, Exception)


def test_message_with_context_and_none_values_dropped() -> None:
    error = ConfigError("bad thing", path="/etc/x.toml", keys=["a"], missing=None)
    assert error.message == "bad thing"
    assert error.context == {"path": "/etc/x.toml", "keys": ["a"]}
    assert str(error) == "bad thing (path='/etc/x.toml', keys=['a'])"


def test_message_without_context_is_just_the_message() -> None:
    assert str(SinkError("sink is down")) == "sink is down"
    assert SinkError("sink is down").args == ("sink is down",)


def test_kafka_error_says_whether_retrying_may_help() -> None:
    assert KafkaError("timeout", retriable=True, code="_TIMED_OUT").retriable is True
    error = KafkaError("auth failed")
    assert error.retriable is False
    assert error.context == {}


def test_fenced_error_names_its_partitions_sorted() -> None:
    error = FencedError("taken over", partitions=[("b", 0), ("a", 2), ("a", 1)], group="g")
    assert error.partitions == frozenset({("a", 1), ("a", 2), ("b", 0)})
    assert error.context == {"partitions": [("a", 1), ("a", 2), ("b", 0)], "group": "g"}
    assert str(error) == ("taken over (partitions=[('a', 1), ('a', 2), ('b', 0)], group='g')")


def test_record_error_names_topic_partition_offset_and_field() -> None:
    error = InvalidRecordError("amount is wrong", topic="t", partition=1, offset=9, field="amount")
    assert (error.topic, error.partition, error.offset, error.field) == ("t", 1, 9, "amount")
    assert str(error) == "amount is wrong (topic='t', partition=1, offset=9, field='amount')"


def test_located_copies_the_error_with_its_place_keeping_type_field_context_and_cause() -> None:
    cause = ValueError("inner")
    original = InvalidRecordError("bad field", field="status", table="orders")
    original.__cause__ = cause

    located = original.located(topic="orders", partition=4, offset=77)

    assert type(located) is InvalidRecordError
    assert located is not original
    assert (located.topic, located.partition, located.offset) == ("orders", 4, 77)
    assert located.field == "status"
    assert located.context == {
        "topic": "orders",
        "partition": 4,
        "offset": 77,
        "field": "status",
        "table": "orders",
    }
    assert located.__cause__ is cause
    assert str(located) == (
        "bad field (topic='orders', partition=4, offset=77, field='status', table='orders')"
    )
    # The original is untouched.
    assert original.offset is None
    assert str(original) == "bad field (field='status', table='orders')"


def test_located_replaces_an_earlier_location() -> None:
    error = DecodeError("bad bytes", topic="old", partition=0, offset=1)
    located = error.located(topic="new", partition=5, offset=6)
    assert type(located) is DecodeError
    assert located.context == {"topic": "new", "partition": 5, "offset": 6}


def test_every_error_is_caught_by_the_root() -> None:
    with pytest.raises(OffsetkeeperError):
        raise FencedError("x", partitions=[])
