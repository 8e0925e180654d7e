"""sinks._kafka_producer.WatchedProducer and the Kafka sink around it (no broker): a
transactional call that outlives its timeout (librdkafka#5456/#5511: send_offsets_to_transaction
blocked for good once the group coordinator's node was killed) is given up on within the
timeout plus a margin, as a fatal error: the sink drops the producer without committing or
aborting through it, the engine's retry makes a new one, and the wedged thread never holds the
process open."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

import sinks._kafka_producer as kafka_producer
from consumer import Checkpoint, SinkError
from sinks import KafkaSink
from sinks._kafka_errors import TransactionFailure, classify
from sinks._kafka_producer import WatchedProducer
from sinks._kafka_settings import parse_kafka_url

REPO = Path(__file__).resolve().parents[2]
# librdkafka's serialized group metadata of member "m-1" of group "g" in generation 3.
_MEMBER_METADATA = b"CGMDv2:" + struct.pack("=i", 3) + b"g\x00m-1\x00\x01"


class _WedgingProducer:
    """Stands in for confluent_kafka.Producer: send_offsets_to_transaction blocks until
    `release` is set (for ever, unless a test sets it), like librdkafka#5511."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def init_transactions(self, _timeout: float) -> None:
        self.calls.append("init")

    def send_offsets_to_transaction(self, *_args: object) -> None:
        self.calls.append("send_offsets")
        self.release.wait()

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit")

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append("abort")

    def flush(self, _timeout: float) -> int:
        self.calls.append("flush")
        return 0


@pytest.fixture
def short_margin(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(kafka_producer, "WEDGE_MARGIN_S", 0.3)
    return 0.3


def test_a_call_that_outlives_its_timeout_wedges_the_producer_as_a_fatal_error(
    short_margin: float, log_events: list[MutableMapping[str, Any]]
) -> None:
    inner = _WedgingProducer()
    producer = WatchedProducer(inner, transactional_id="tid-1", sink="kafka://h/out")
    producer.begin_transaction()
    started = time.monotonic()
    with pytest.raises(confluent_kafka.KafkaException) as raised:
        producer.send_offsets_to_transaction([], b"metadata", 0.2)
    waited = time.monotonic() - started
    assert 0.5 <= waited < 3.0  # the call's own timeout plus the margin, not for ever
    error = raised.value.args[0]
    assert error.code() == confluent_kafka.KafkaError._TIMED_OUT
    assert classify(error) is TransactionFailure.FATAL  # the sink makes a new producer
    assert producer.wedged_in == "send_offsets_to_transaction"
    # Nothing more goes through it: not an abort, not a commit, not a new transaction.
    for call in (
        lambda: producer.abort_transaction(1),
        lambda: producer.commit_transaction(1),
        producer.begin_transaction,
    ):
        with pytest.raises(confluent_kafka.KafkaException, match="given up on"):
            call()
    assert producer.flush(1) == 0
    assert inner.calls == ["begin", "send_offsets"]
    (wedged,) = [e for e in log_events if e["event"] == "kafka_sink_producer_wedged"]
    assert wedged["call"] == "send_offsets_to_transaction"
    assert wedged["transactional_id"] == "tid-1"
    assert "librdkafka#5456" in wedged["why"]
    inner.release.set()


def test_calls_that_return_in_time_pass_their_errors_through_unchanged() -> None:
    class Refusing(_WedgingProducer):
        def commit_transaction(self, _timeout: float) -> None:
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(confluent_kafka.KafkaError.ILLEGAL_GENERATION)
            )

    producer = WatchedProducer(Refusing(), transactional_id="t", sink="s")
    producer.init_transactions(1)
    with pytest.raises(confluent_kafka.KafkaException) as raised:
        producer.commit_transaction(1)
    assert raised.value.args[0].code() == confluent_kafka.KafkaError.ILLEGAL_GENERATION
    assert producer.wedged_in is None
    producer.abort_transaction(1)  # still usable


def test_the_sink_drops_a_wedged_producer_and_the_retry_gets_a_new_one(
    short_margin: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    wedging = _WedgingProducer()
    fresh = _WedgingProducer()
    made: list[str] = []

    def new_producer(*_args: object, **_kwargs: object) -> WatchedProducer:
        made.append("new")
        return WatchedProducer(fresh, transactional_id="tid-2", sink="s")

    monkeypatch.setattr("sinks._kafka.transactional_producer", new_producer)
    monkeypatch.setattr("sinks._kafka.OPERATION_TIMEOUT_S", 0.2)  # what the calls are given
    sink = KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out"))
    sink.bind_group_metadata(lambda: _MEMBER_METADATA)
    sink._producer = WatchedProducer(wedging, transactional_id="tid-1", sink="s")
    sink._group = "g"
    sink.begin()
    checkpoint = Checkpoint(
        group="g", topic="in", partition=0, next_offset=7, updated_at=datetime.now(UTC)
    )
    with pytest.raises(SinkError) as raised:
        sink.save_checkpoints("g", [checkpoint], {})
    assert raised.value.context["failure"] == "fatal"
    assert sink._producer is None
    assert sink._transaction is None
    assert wedging.calls == ["begin", "send_offsets"]  # no abort through a wedged producer
    sink.begin()  # the engine's retry
    assert made == ["new"]
    assert fresh.calls == ["begin"]
    wedging.release.set()
    fresh.release.set()


def test_a_thread_wedged_for_good_does_not_hold_the_process_open_at_exit() -> None:
    script = textwrap.dedent(
        """
        import threading
        import confluent_kafka
        import sinks._kafka_producer as kp
        kp.WEDGE_MARGIN_S = 0.1

        class Stuck:
            def send_offsets_to_transaction(self, *args):
                threading.Event().wait()

        producer = kp.WatchedProducer(Stuck(), transactional_id="t", sink="s")
        try:
            producer.send_offsets_to_transaction([], b"", 0.1)
        except confluent_kafka.KafkaException:
            print("wedged", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "wedged"
