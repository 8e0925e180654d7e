"""A hostile Avro value against a real broker: a record nesting 20,000 levels deep (which
crashed fastavro's C reader with SIGSEGV, on every restart) is dead-lettered once with its
error field, and the good records around it are written once each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.deadletters.writer import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_FIELD,
    HEADER_ERROR_MESSAGE,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
)
from consumer.decoding.avro import encode_single_object, parse_schema, schema_fingerprint
from tests.fixtures.dead_letters import read_topic
from tests.fixtures.hostile_avro import ORDER_CHAIN, order_chain_body
from tests.fixtures.kafka_tools import create_topic, partition_contents, produce, unique_name
from tests.fixtures.processes import ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_rows

pytestmark = pytest.mark.integration

GOOD = 30
DEEP_KEY = b"deep"
HOSTILE_DEPTH = 20_000


def _good_order(index: int) -> bytes:
    """A short chain (1 to 3 orders) of the recursive schema: well under the depth limit."""
    chain: dict[str, object] | None = None
    for depth in range(index % 3):
        chain = {"order_id": f"inner-{index}-{depth}", "amount_cents": depth, "next": chain}
    order = {"order_id": f"o{index}", "amount_cents": index, "next": chain}
    return encode_single_object(ORDER_CHAIN, order)


@pytest.mark.parametrize("backend", ["confluent", "aiokafka"])
def test_a_20000_deep_record_is_dead_lettered_and_the_good_ones_written_once(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess], backend: str
) -> None:
    topic, group = unique_name("avro-deep"), unique_name("avro-deep")
    create_topic(kafka.address, topic, 2)
    schema_dir = tmp_path / "schemas"
    schema_dir.mkdir()
    (schema_dir / "order-chain.avsc").write_text(json.dumps(ORDER_CHAIN))
    header = b"\xc3\x01" + schema_fingerprint(parse_schema(ORDER_CHAIN))
    hostile = header + order_chain_body("o-deep", 1, HOSTILE_DEPTH)
    assert len(hostile) < 70_000
    messages: list[tuple[bytes | None, bytes | None]] = [
        (f"k{i}".encode(), _good_order(i)) for i in range(GOOD)
    ]
    messages.insert(GOOD // 2, (DEEP_KEY, hostile))
    produce(kafka.address, topic, messages, partition_of={DEEP_KEY: 1})

    db = tmp_path / "deep.db"
    process = ConsumerProcess(
        run_args(
            "tests.apps.poison:app",
            kafka.address,
            group,
            topic,
            f"sqlite:///{db}",
            "--backend",
            backend,
            "--decode",
            f"{topic}=avro-local",
            "--schema-dir",
            str(schema_dir),
            "--on-bad-record",
            "dead-letter",
            "--bad-record-retries",
            "1",
            "--bad-record-backoff",
            "0.05",
            "--stop-when-idle",
            "3",
        ),
        tmp_path / "run.log",
    )
    consumers.append(process)

    assert process.wait(timeout=120) == 0, process.log_path.read_text()[-3000:]

    rows = sqlite_rows(db, "SELECT order_id, amount FROM poison_orders ORDER BY order_id")
    assert sorted(rows) == sorted((f"o{i}", float(i)) for i in range(GOOD)), "each good one once"
    letters = read_topic(kafka.address, f"{group}.dlq")
    assert [letter.key for letter in letters] == [DEEP_KEY], "the deep record, once"
    (letter,) = letters
    assert letter.value == hostile, "its bytes untouched"
    assert letter.headers[HEADER_ERROR_FIELD] == b"nesting depth"
    assert letter.headers[HEADER_ERROR_CLASS] == b"DecodeError"
    assert b"nests deeper than 256 levels" in letter.headers[HEADER_ERROR_MESSAGE]
    deep_offsets = [
        offset for offset, key, _value in partition_contents(kafka.address, topic, 2)[1]
        if key == DEEP_KEY
    ]  # fmt: skip
    assert letter.headers[HEADER_TOPIC] == topic.encode()
    assert (int(letter.headers[HEADER_PARTITION]), int(letter.headers[HEADER_OFFSET])) == (
        1,
        deep_offsets[0],
    )
