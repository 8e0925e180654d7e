"""sinks._kafka*, the parts that need no broker: URL, row <-> message, checkpoint <-> offset
metadata, group metadata parsing, what each transactional error means, and keyed state's
changelog names, messages and in-memory copies (applied on commit only)."""

from __future__ import annotations

import json
import math
import struct
from datetime import UTC, datetime
from typing import Any

import confluent_kafka
import pytest

from consumer import ConfigError, StateChange, StateEntry, TopicPartition, open_sink
from consumer.checkpoints.model import CURRENT_FORMAT_VERSION, Checkpoint
from consumer.core.app import Table
from consumer.core.errors import (
    CheckpointError,
    CheckpointFormatError,
    FencedError,
    RowsRefusedError,
    SinkError,
)
from sinks import KafkaSink, decode_row, encode_row
from sinks._kafka_errors import TransactionFailure, classify
from sinks._kafka_membership import parse_group_metadata
from sinks._kafka_offsets import (
    OFFSET_METADATA_MAX_BYTES,
    decode_committed_offset,
    encode_checkpoint_metadata,
    own_metadata,
)
from sinks._kafka_settings import (
    DEFAULT_TRANSACTION_TIMEOUT_MS,
    MAX_TOPIC_NAME_LENGTH,
    TOPIC_NAME_CHARACTERS,
    parse_kafka_url,
)
from sinks._kafka_state import (
    PartitionState,
    changelog_topic,
    decode_message,
    encode_change,
)

EVENTS = Table(
    name="events",
    columns={"id": "text", "n": "bigint", "blob": "bytes", "doc": "json", "ok": "boolean"},
    key=("id",),
)


def test_url_names_bootstrap_servers_topic_and_defaults() -> None:
    settings = parse_kafka_url("kafka://a:9092,b:9093/out.events")
    assert settings.bootstrap_servers == "a:9092,b:9093"
    assert settings.topic == "out.events"
    assert settings.transactional_id is None
    assert settings.transaction_timeout_ms == DEFAULT_TRANSACTION_TIMEOUT_MS
    assert settings.jobs_topic is None
    assert settings.client_config == {}
    assert settings.description == "kafka://a:9092,b:9093/out.events"


def test_url_options_and_librdkafka_keys_are_separated() -> None:
    settings = parse_kafka_url(
        "kafka://h:1/t?transactional_id=pod-0&transaction_timeout_ms=15000"
        "&jobs_topic=jobs&linger.ms=20&security.protocol=SSL"
    )
    assert settings.transactional_id == "pod-0"
    assert settings.transaction_timeout_ms == 15000
    assert settings.jobs_topic == "jobs"
    assert settings.client_config == {"linger.ms": "20", "security.protocol": "SSL"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka:///t", "needs HOST:PORT"),
        ("kafka://u:pw@h:1/t", "needs HOST:PORT"),
        ("kafka://h:1", "one output topic"),
        ("kafka://h:1/a/b", "one output topic"),
        ("kafka://h:1/t?batch=5", "unknown kafka sink options"),
        ("kafka://h:1/t?checkpoint_table=x", "unknown kafka sink options"),
        ("kafka://h:1/t?transactional.id=x", "sets these client settings itself"),
        ("kafka://h:1/t?enable.idempotence=false", "sets these client settings itself"),
        ("kafka://h:1/t?transaction_timeout_ms=soon", "whole number"),
        ("kafka://h:1/t?transaction_timeout_ms=10", "too small"),
        ("kafka://h:1/t?transactional_id=", "must not be empty"),
    ],
)
def test_invalid_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_kafka_url(url)


def test_a_url_with_a_password_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError, match="no user part") as caught:
        parse_kafka_url("kafka://admin:s3cr3t@h:1/t")
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.context["sink"] == "kafka://admin:***@h:1/t"


def test_open_sink_makes_a_kafka_sink() -> None:
    sink = open_sink("kafka://127.0.0.1:9092/out?sasl.password=secret")
    assert isinstance(sink, KafkaSink)
    assert sink.description == "kafka://127.0.0.1:9092/out"
    assert sink.jobs_topic == "out.offsetkeeper-jobs"
    assert sink.writes_per_partition is False


def test_a_row_becomes_a_json_value_keyed_by_the_key_columns() -> None:
    row = {"id": "a-1", "n": 7, "blob": b"\x00\xff", "doc": {"x": [1, 2]}, "ok": True}
    key, value = encode_row(EVENTS, row)
    assert json.loads(key) == {"id": "a-1"}
    assert json.loads(value) == {
        "id": "a-1",
        "n": 7,
        "blob": "AP8=",
        "doc": {"x": [1, 2]},
        "ok": True,
    }
    assert decode_row(EVENTS, value) == row


def test_missing_columns_are_null_and_the_same_key_encodes_the_same() -> None:
    key_one, value = encode_row(EVENTS, {"id": "k"})
    key_two, _ = encode_row(EVENTS, {"id": "k", "n": 1})
    assert key_one == key_two, "one key must always land on one partition"
    assert decode_row(EVENTS, value) == {
        "id": "k",
        "n": None,
        "blob": None,
        "doc": None,
        "ok": None,
    }


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("doc", {1, 2}),
        ("doc", math.nan),  # json.dumps would write NaN, which is not JSON
        ("doc", {"x": [math.inf]}),
        ("n", -math.inf),
        ("id", "\ud800"),  # a lone surrogate: not UTF-8 (and in the key)
        ("doc", {"k": "\udc00"}),
        ("blob", "not bytes"),
    ],
)
def test_a_value_json_cannot_hold_is_refused_naming_table_and_column(
    column: str, value: Any
) -> None:
    with pytest.raises(RowsRefusedError, match="cannot be written as JSON") as caught:
        encode_row(EVENTS, {"id": "k", column: value})
    assert caught.value.context["table"] == "events"
    assert caught.value.context["field"] == column
    assert isinstance(caught.value, SinkError)


def test_the_sink_declares_no_nan_and_no_infinities() -> None:
    limits = KafkaSink(parse_kafka_url("kafka://h:1/t")).value_limits
    assert (limits.nan, limits.infinity) == (False, False)


def test_a_message_that_is_not_a_row_is_a_sink_error() -> None:
    with pytest.raises(SinkError, match="not a JSON object"):
        decode_row(EVENTS, b"[1]")
    with pytest.raises(SinkError, match="not base64"):
        decode_row(EVENTS, b'{"id": "k", "blob": "***"}')


def _checkpoint(state: bytes | None = b"\x01state") -> Checkpoint:
    return Checkpoint(
        group="g",
        topic="in",
        partition=3,
        next_offset=120,
        updated_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        epoch=4,
        leader_epoch=9,
        writer_version="1.2.3",
        state=state,
        state_version=2,
    )


def test_checkpoint_metadata_round_trips_through_the_committed_offset() -> None:
    checkpoint = _checkpoint()
    metadata = encode_checkpoint_metadata(checkpoint, sink_topic="out")
    assert json.loads(metadata)["sink"] == "out"
    assert " " not in metadata, "compact JSON: the broker limits the metadata's size"
    decoded = decode_committed_offset("g", "in", 3, 120, metadata)
    assert decoded == checkpoint
    assert decoded.read_from_format == CURRENT_FORMAT_VERSION


def test_a_plain_kafka_offset_reads_as_a_format_1_checkpoint() -> None:
    for metadata in (None, "", "some other tool's note", '{"not": "ours"}'):
        decoded = decode_committed_offset("g", "in", 0, 55, metadata)
        assert decoded.next_offset == 55
        assert decoded.read_from_format == 1
        assert decoded.epoch == 0
        assert decoded.state is None


def test_metadata_nested_too_deep_for_the_decoder_is_not_ours() -> None:
    metadata = "[" * OFFSET_METADATA_MAX_BYTES  # any client may commit 4 KB of free text
    assert own_metadata(metadata) is None
    assert decode_committed_offset("g", "in", 0, 7, metadata).read_from_format == 1


@pytest.mark.parametrize("state", ["not base64!", "QUJ", 5])
def test_a_state_that_is_not_base64_is_a_checkpoint_error_naming_the_partition(state: Any) -> None:
    metadata = json.loads(encode_checkpoint_metadata(_checkpoint(), sink_topic="out"))
    metadata["state"] = state
    with pytest.raises(CheckpointError, match="not base64") as caught:
        decode_committed_offset("g", "in", 3, 120, json.dumps(metadata))
    assert caught.value.context == {
        "group": "g",
        "topic": "in",
        "partition": 3,
        "offset": 120,
    }


def test_metadata_of_a_newer_format_is_refused() -> None:
    metadata = json.dumps({"offsetkeeper": CURRENT_FORMAT_VERSION + 1})
    with pytest.raises(CheckpointFormatError):
        decode_committed_offset("g", "in", 0, 1, metadata)


def test_a_state_too_large_for_offset_metadata_names_partition_and_size() -> None:
    state = b"x" * OFFSET_METADATA_MAX_BYTES
    with pytest.raises(SinkError, match="too large for Kafka offset metadata") as caught:
        encode_checkpoint_metadata(_checkpoint(state), sink_topic="out")
    context = caught.value.context
    assert (context["topic"], context["partition"]) == ("in", 3)
    assert context["metadata_bytes"] > OFFSET_METADATA_MAX_BYTES
    assert context["state_bytes"] == len(state)
    # Just below the limit fits.
    fitting = b"x" * 2900
    assert len(encode_checkpoint_metadata(_checkpoint(fitting), sink_topic="out")) <= 4096


def _serialized(generation: int, member: str, instance: str | None = None) -> bytes:
    tail = b"\x01" if instance is None else b"\x00" + instance.encode() + b"\x00"
    return b"CGMDv2:" + struct.pack("=i", generation) + b"g\x00" + member.encode() + b"\x00" + tail


def test_group_metadata_says_generation_and_member() -> None:
    member = parse_group_metadata(_serialized(7, "rdkafka-1"))
    assert member is not None
    assert (member.group, member.generation, member.member_id) == ("g", 7, "rdkafka-1")
    assert member.is_member
    static = parse_group_metadata(_serialized(2, "inst-1-x", "inst-1"))
    assert static is not None
    assert static.member_id == "inst-1-x"


def test_group_metadata_of_an_evicted_consumer_is_not_a_member() -> None:
    evicted = parse_group_metadata(_serialized(-1, ""))
    assert evicted is not None
    assert not evicted.is_member
    assert parse_group_metadata(b"something else") is None
    assert parse_group_metadata(object()) is None


def test_real_client_group_metadata_parses_as_not_yet_a_member() -> None:
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "parse-check"}
    )
    try:
        parsed = parse_group_metadata(consumer.consumer_group_metadata())
    finally:
        consumer.close()
    assert parsed is not None
    assert parsed.group == "parse-check"
    assert not parsed.is_member


def _error(code: int, **flags: bool) -> confluent_kafka.KafkaError:
    return confluent_kafka.KafkaError(code, "test", **flags)


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (_error(confluent_kafka.KafkaError.UNKNOWN_MEMBER_ID, txn_requires_abort=True), "member"),
        (_error(confluent_kafka.KafkaError.FENCED_INSTANCE_ID, txn_requires_abort=True), "member"),
        (_error(confluent_kafka.KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True), "gen"),
        (_error(confluent_kafka.KafkaError.REBALANCE_IN_PROGRESS, retriable=True), "gen"),
        (_error(confluent_kafka.KafkaError._FENCED, fatal=True), "producer"),
        (_error(confluent_kafka.KafkaError.PRODUCER_FENCED, fatal=True), "producer"),
        (_error(confluent_kafka.KafkaError.INVALID_PRODUCER_EPOCH, fatal=True), "producer"),
        (_error(confluent_kafka.KafkaError._INCONSISTENT, fatal=True), "fatal"),
        (_error(confluent_kafka.KafkaError._TIMED_OUT, txn_requires_abort=True), "abortable"),
        (_error(confluent_kafka.KafkaError._TIMED_OUT, retriable=True), "retriable"),
        (_error(confluent_kafka.KafkaError.UNKNOWN), "abortable"),
    ],
)
def test_each_transactional_error_maps_to_one_action(
    error: confluent_kafka.KafkaError, failure: str
) -> None:
    expected = {
        "member": TransactionFailure.MEMBER_FENCED,
        "gen": TransactionFailure.GENERATION_MOVED,
        "producer": TransactionFailure.PRODUCER_FENCED,
        "fatal": TransactionFailure.FATAL,
        "abortable": TransactionFailure.ABORTABLE,
        "retriable": TransactionFailure.RETRIABLE,
    }[failure]
    assert classify(error) is expected


class _FailingProducer:
    """Stands in for confluent_kafka.Producer: send_offsets_to_transaction fails as told."""

    def __init__(self, error: confluent_kafka.KafkaError) -> None:
        self.error = error
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def send_offsets_to_transaction(self, *_args: object) -> None:
        self.calls.append("send_offsets")
        raise confluent_kafka.KafkaException(self.error)

    def abort_transaction(self, *_args: object) -> None:
        self.calls.append("abort")


def _bound_sink(producer: _FailingProducer, metadata: bytes) -> KafkaSink:
    sink = KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out"))
    sink.bind_group_metadata(lambda: metadata)
    sink._producer = producer  # no broker in a unit test
    sink._group = "g"
    sink.begin()
    return sink


def test_a_member_fenced_by_the_coordinator_raises_fenced_error_for_the_whole_batch() -> None:
    producer = _FailingProducer(
        _error(confluent_kafka.KafkaError.UNKNOWN_MEMBER_ID, txn_requires_abort=True)
    )
    sink = _bound_sink(producer, _serialized(3, "m-1"))
    other = Checkpoint(
        group="g", topic="in", partition=5, next_offset=9, updated_at=datetime.now(UTC)
    )
    with pytest.raises(FencedError) as caught:
        sink.save_checkpoints("g", [_checkpoint(), other], {})
    assert caught.value.partitions == {("in", 3), ("in", 5)}
    assert producer.calls == ["begin", "send_offsets", "abort"]


def test_an_evicted_consumer_commits_nothing_even_though_the_broker_would_accept_it() -> None:
    producer = _FailingProducer(_error(confluent_kafka.KafkaError.UNKNOWN))
    sink = _bound_sink(producer, _serialized(-1, ""))
    with pytest.raises(FencedError, match="not a member"):
        sink.save_checkpoints("g", [_checkpoint()], {})
    assert "send_offsets" not in producer.calls


def test_a_new_generation_of_a_member_still_in_the_group_is_retried_not_fenced() -> None:
    producer = _FailingProducer(
        _error(confluent_kafka.KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True)
    )
    sink = _bound_sink(producer, _serialized(4, "m-1"))
    with pytest.raises(SinkError) as caught:
        sink.save_checkpoints("g", [_checkpoint()], {})
    assert not isinstance(caught.value, FencedError)
    assert caught.value.context["failure"] == "generation_moved"
    assert producer.calls[-1] == "abort"


def test_a_client_whose_group_metadata_cannot_be_read_is_refused_at_open() -> None:
    sink = KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out"))
    sink.bind_group_metadata(lambda: b"some-future-serialization")
    sink._admin = object()  # no broker in a unit test: open() fails before asking it
    with pytest.raises(ConfigError, match="cannot read the consumer's group membership"):
        sink.open([])


# --- keyed state -----------------------------------------------------------------------------


def test_url_state_options_set_the_changelog_topics_prefix_replication_and_min_isr() -> None:
    default = parse_kafka_url("kafka://h:1/t")
    assert default.state_topic_prefix == "offsetkeeper-state"
    assert default.state_replication_factor is None  # the broker's default
    assert default.state_min_insync_replicas is None
    settings = parse_kafka_url(
        "kafka://h:1/t?state_topic_prefix=team-a.state&state_replication_factor=3"
        "&state_min_insync_replicas=2"
    )
    assert settings.state_topic_prefix == "team-a.state"
    assert (settings.state_replication_factor, settings.state_min_insync_replicas) == (3, 2)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("state_topic_prefix=", "state_topic_prefix"),
        ("state_topic_prefix=a/b", "state_topic_prefix"),
        ("state_topic_prefix=" + "p" * 101, "state_topic_prefix"),
        ("state_replication_factor=0", "at least 1"),
        ("state_replication_factor=three", "whole number"),
        ("state_min_insync_replicas=-1", "at least 1"),
    ],
)
def test_invalid_state_options_are_config_errors(query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_kafka_url(f"kafka://h:1/t?{query}")


@pytest.mark.parametrize(
    ("group", "topic"),
    [
        ("billing", "payments"),
        ("team/billing:v2 é ☃", "payments.eu"),
        ("g" * 500, "t" * 249),
        ("", "t"),
        ("\ud800 lone surrogate", "t"),
    ],
)
def test_a_changelog_topic_name_is_valid_for_any_group_and_topic(group: str, topic: str) -> None:
    name = changelog_topic("p" * 100, group, topic)
    assert set(name) <= TOPIC_NAME_CHARACTERS
    assert len(name) <= MAX_TOPIC_NAME_LENGTH
    assert name == changelog_topic("p" * 100, group, topic), "the name must be stable"


def test_changelog_topic_names_read_like_group_and_topic_and_never_collide() -> None:
    name = changelog_topic("offsetkeeper-state", "billing", "payments")
    assert name.startswith("offsetkeeper-state.billing.payments.")
    assert len(name.rsplit(".", 1)[1]) == 12
    alike = {
        changelog_topic("offsetkeeper-state", group, topic)
        for group, topic in [("a.b", "t"), ("a_b", "t"), ("a/b", "t"), ("a", "b.t"), ("a.b", "t2")]
    }
    assert len(alike) == 5, "groups and topics that clean up alike keep topics of their own"


TP = TopicPartition("payments", 2)


@pytest.mark.parametrize(
    ("key", "value", "version"),
    [
        ("alice", b'{"count": 3, "sum": 70}', 1),
        ('we"ird\\key é ☃', b"[1,2,3]", 7),
        ("\ud800", b'"x"', 2),
        ("", b"null", 1),
        ("k", b'{\n  "spaced" :  true }', 1),  # kept byte for byte
    ],
)
def test_a_state_entry_round_trips_through_its_changelog_message_exactly(
    key: str, value: bytes, version: int
) -> None:
    raw_key, raw_value = encode_change(StateChange(TP, key, value, version))
    assert json.loads(raw_key) == [2, key]
    assert json.loads(raw_value or b"") == {"version": version, "value": json.loads(value)}
    assert decode_message("log", 2, raw_key, raw_value) == (key, StateEntry(key, value, version))


def test_a_deleted_entry_is_a_tombstone() -> None:
    raw_key, raw_value = encode_change(StateChange(TP, "gone", None, 1))
    assert raw_value is None
    assert decode_message("log", 2, raw_key, None) == ("gone", None)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (b'[3,"k"]', b'{"version":1,"value":1}', "key is not an entry key of its partition"),
        (b"k", b'{"version":1,"value":1}', "key is not an entry key"),
        (None, b'{"version":1,"value":1}', "key is not an entry key"),
        (b'[2,"k"]', b'{"value":1,"version":1}', "not an offsetkeeper state entry"),
        (b'[2,"k"]', b"1", "not an offsetkeeper state entry"),
    ],
)
def test_a_changelog_message_that_is_not_ours_is_a_sink_error(
    key: bytes | None, value: bytes, message: str
) -> None:
    with pytest.raises(SinkError, match=message):
        decode_message("log", 2, key, value)


def test_a_partition_state_counts_its_entries_value_bytes() -> None:
    state = PartitionState()
    state.put("a", StateEntry("a", b"123", 1))
    state.put("b", StateEntry("b", b"1", 1))
    state.put("a", StateEntry("a", b"12", 2))
    state.put("b", None)
    state.put("missing", None)
    assert state.entries == {"a": StateEntry("a", b"12", 2)}
    assert state.value_bytes == 2


class _RecordingProducer:
    """Stands in for confluent_kafka.Producer: records the transactional calls and messages;
    commit_transaction fails with `commit_error` when set."""

    def __init__(self, commit_error: confluent_kafka.KafkaError | None = None) -> None:
        self.commit_error = commit_error
        self.calls: list[str] = []
        self.messages: list[tuple[str, int | None, bytes, bytes | None]] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, *, value: bytes | None, key: bytes, **extra: Any) -> None:
        self.messages.append((topic, extra.get("partition"), key, value))

    def poll(self, _timeout: float) -> int:
        return 0

    def send_offsets_to_transaction(self, *_args: object) -> None:
        self.calls.append("send_offsets")

    def commit_transaction(self, *_args: object) -> None:
        self.calls.append("commit")
        if self.commit_error is not None:
            raise confluent_kafka.KafkaException(self.commit_error)

    def abort_transaction(self, *_args: object) -> None:
        self.calls.append("abort")


GROUP = "g"
CHANGELOG = changelog_topic("offsetkeeper-state", GROUP, TP.topic)


def _state_sink(producer: _RecordingProducer) -> KafkaSink:
    """A sink with partition 2's state already restored (empty) and its changelog checked: no
    broker in a unit test."""
    sink = KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out"))
    sink._producer = producer
    sink._group = GROUP
    sink._admin = object()
    sink._state.changelogs._checked[CHANGELOG] = 4
    sink._state._copies[(GROUP, TP)] = PartitionState()
    sink._memberless.metadata = lambda _group: b"no membership"  # type: ignore[method-assign]
    return sink


def _state_batch(sink: KafkaSink, changes: list[StateChange], *, offsets: bool = True) -> None:
    sink.begin()
    sink.write_state(GROUP, changes)
    if offsets:
        checkpoint = Checkpoint(
            group=GROUP, topic=TP.topic, partition=2, next_offset=5, updated_at=datetime.now(UTC)
        )
        sink.save_checkpoints(GROUP, [checkpoint], {})


def test_state_changes_go_to_the_source_partitions_changelog_partition_and_apply_on_commit() -> (
    None
):
    producer = _RecordingProducer()
    sink = _state_sink(producer)
    _state_batch(sink, [StateChange(TP, "a", b"1", 1), StateChange(TP, "b", None, 1)])
    assert producer.messages == [
        (CHANGELOG, 2, b'[2,"a"]', b'{"version":1,"value":1}'),
        (CHANGELOG, 2, b'[2,"b"]', None),
    ]
    assert sink.read_state(GROUP, TP, ["a"]) == {}, "nothing is visible before the commit"
    sink.commit()
    assert sink.read_state(GROUP, TP, ["a", "b"]) == {"a": StateEntry("a", b"1", 1)}
    assert sink.state_sizes(GROUP, [TP]) == {TP: (1, 1)}
    _state_batch(sink, [StateChange(TP, "a", None, 1), StateChange(TP, "c", b"[]", 2)])
    sink.commit()
    assert list(sink.scan_state(GROUP, TP)) == [StateEntry("c", b"[]", 2)]


def test_rolled_back_state_changes_are_discarded() -> None:
    producer = _RecordingProducer()
    sink = _state_sink(producer)
    _state_batch(sink, [StateChange(TP, "a", b"1", 1)])
    sink.rollback()
    assert producer.calls[-1] == "abort"
    assert sink.read_state(GROUP, TP, ["a"]) == {}
    _state_batch(sink, [StateChange(TP, "b", b"2", 1)])
    sink.commit()
    assert [entry.key for entry in sink.scan_state(GROUP, TP)] == ["b"]


def test_state_without_its_partitions_offsets_is_refused_as_it_would_not_be_fenced() -> None:
    producer = _RecordingProducer()
    sink = _state_sink(producer)
    _state_batch(sink, [StateChange(TP, "a", b"1", 1)], offsets=False)
    with pytest.raises(SinkError, match="offsets are not in the transaction") as caught:
        sink.commit()
    assert caught.value.context["partitions"] == [("payments", 2)]
    assert "commit" not in producer.calls
    assert producer.calls[-1] == "abort"
    assert sink.read_state(GROUP, TP, ["a"]) == {}


def test_after_a_failed_commit_the_copy_is_dropped_so_the_next_read_restores_the_truth() -> None:
    producer = _RecordingProducer(_error(confluent_kafka.KafkaError._INCONSISTENT, fatal=True))
    sink = _state_sink(producer)
    _state_batch(sink, [StateChange(TP, "a", b"1", 1)])
    with pytest.raises(SinkError):
        sink.commit()
    assert (GROUP, TP) not in sink._state._copies


def test_acquire_drops_the_copies_of_an_earlier_ownership(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = _state_sink(_RecordingProducer())
    other = TopicPartition("payments", 3)
    sink._state._copies[(GROUP, other)] = PartitionState()
    monkeypatch.setattr(sink, "load_checkpoints", lambda _group, _partitions: {})
    assert sink.acquire(GROUP, [TP]) == {TP: 1}
    assert sink._state.loaded(GROUP) == [other]
