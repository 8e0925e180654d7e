"""Every producer whose writes a commit depends on waits for all in-sync replicas (acks=all,
idempotent): the dead-letter writer and the Kafka sink's transactional producer. On a cluster
with min.insync.replicas=2, a write acknowledged so survives the loss of its leader (see
tests/chaos/test_leader_kill.py); a user's client settings cannot lower it."""

from __future__ import annotations

from typing import Any

import confluent_kafka
import pytest

from consumer import ConfigError
from consumer.deadletters.writer import KafkaDeadLetterWriter
from sinks._kafka_producer import transactional_producer
from sinks._kafka_settings import parse_kafka_url


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The configuration of every confluent_kafka.Producer made during the test (none
    connects)."""
    configs: list[dict[str, Any]] = []

    class RecordingProducer:
        def __init__(self, config: dict[str, Any]) -> None:
            configs.append(dict(config))

        def init_transactions(self, _timeout: float) -> None:
            return None

    monkeypatch.setattr(confluent_kafka, "Producer", RecordingProducer)
    return configs


def test_the_dead_letter_producer_uses_acks_all_whatever_the_client_settings(
    recorded: list[dict[str, Any]],
) -> None:
    writer = KafkaDeadLetterWriter(
        bootstrap_servers="127.0.0.1:9092",
        group="g",
        topic_template="{group}.dlq",
        client_config={
            "acks": "1",
            "request.required.acks": "1",
            "enable.idempotence": "false",
            "client.id": "mine",
        },
    )
    writer._producer_instance()  # made lazily, on the first dead letter
    (config,) = recorded
    assert config["acks"] == "all"
    assert config["enable.idempotence"] is True
    # librdkafka applies settings in order, the last of two names for one setting winning: the
    # user's other name for acks must not come after ours (it did, behind the user's `acks`).
    assert "request.required.acks" not in config
    assert config["client.id"] == "mine"  # other settings pass through


def test_the_kafka_sink_producer_uses_acks_all_and_refuses_a_user_acks(
    recorded: list[dict[str, Any]],
) -> None:
    url = "kafka://127.0.0.1:9092/out?linger.ms=5"
    transactional_producer({"linger.ms": "5"}, parse_kafka_url(url), "tid", sink=url)
    (config,) = recorded
    assert config["acks"] == "all"
    assert config["enable.idempotence"] is True
    assert config["transactional.id"] == "tid"
    for setting in ("acks=1", "request.required.acks=1"):
        with pytest.raises(ConfigError):
            parse_kafka_url(f"kafka://127.0.0.1:9092/out?{setting}")
