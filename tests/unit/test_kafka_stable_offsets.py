"""The Kafka sink reads an assigned partition's checkpoint through a consumer handle of the group
(never subscribed, read_committed), not the admin client: librdkafka 2.16's admin OffsetFetch
crashed the consumer process (SIGSEGV, confluentinc/librdkafka#5040) when the group coordinator
had just moved, as it does when the leader of the group's offsets partition is killed
(tests/chaos/test_leader_kill.py)."""

from __future__ import annotations

from typing import Any

import confluent_kafka
import pytest

from consumer import SinkError, TopicPartition
from sinks import KafkaSink
from sinks._kafka_offsets import encode_checkpoint_metadata
from sinks._kafka_settings import parse_kafka_url
from tests.unit.test_kafka_sink import _checkpoint


class _RecordingConsumer:
    """Stands in for confluent_kafka.Consumer: answers committed() from `offsets`."""

    def __init__(self, config: dict[str, Any], offsets: dict[tuple[str, int], Any]) -> None:
        self.config = config
        self.offsets = offsets
        self.asked: list[tuple[list[tuple[str, int]], float]] = []

    def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
        self.asked.append(([(tp.topic, tp.partition) for tp in partitions], timeout))
        if isinstance(self.offsets, Exception):
            raise self.offsets
        answers = []
        for tp in partitions:
            found = self.offsets.get((tp.topic, tp.partition))
            if found is None:  # nothing committed: what librdkafka answers
                answers.append(confluent_kafka.TopicPartition(tp.topic, tp.partition, -1001))
            else:
                offset, metadata = found
                answers.append(
                    confluent_kafka.TopicPartition(
                        tp.topic, tp.partition, offset, metadata=metadata
                    )
                )
        return answers

    def subscribe(self, *_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the offsets reader must never join the group")


class _NoAdmin:
    def list_consumer_group_offsets(self, *_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an assigned partition's offsets must not be read by the admin")


def _sink(monkeypatch: pytest.MonkeyPatch, offsets: Any) -> tuple[KafkaSink, list[Any]]:
    made: list[_RecordingConsumer] = []

    def consumer(config: dict[str, Any]) -> _RecordingConsumer:
        made.append(_RecordingConsumer(config, offsets))
        return made[-1]

    monkeypatch.setattr(confluent_kafka, "Consumer", consumer)
    sink = KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out?transaction_timeout_ms=10000"))
    sink._admin = _NoAdmin()  # as open() would have made it
    return sink, made


def test_assigned_partitions_are_read_stable_through_a_never_subscribed_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoint = _checkpoint()
    metadata = encode_checkpoint_metadata(checkpoint, sink_topic="out")
    sink, made = _sink(monkeypatch, {("in", 3): (120, metadata)})
    wanted = [TopicPartition("in", 3), TopicPartition("in", 4)]
    assert sink.load_checkpoints("g", wanted) == {TopicPartition("in", 3): checkpoint}
    (reader,) = made
    assert reader.config["group.id"] == "g"
    assert reader.config["isolation.level"] == "read_committed"  # stable offsets only
    assert reader.config["enable.auto.commit"] is False
    # The transaction timeout plus the broker's abort interval, as before.
    assert reader.asked == [([("in", 3), ("in", 4)], 30.0)]
    assert sink.load_checkpoints("g", []) == {}
    assert len(reader.asked) == 1, "nothing asked for no partitions"


def test_a_committed_offset_not_read_in_time_is_a_sink_error_naming_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timed_out = confluent_kafka.KafkaException(
        confluent_kafka.KafkaError(confluent_kafka.KafkaError._TIMED_OUT)
    )
    sink, _made = _sink(monkeypatch, timed_out)
    with pytest.raises(SinkError, match="committed offsets") as caught:
        sink.load_checkpoints("g", [TopicPartition("in", 0)])
    assert caught.value.context["group"] == "g"
