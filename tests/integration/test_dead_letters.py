"""Bad records against a real broker: retried, then dead-lettered once each with their origin,
never lost across a kill -9 between the dead-letter write and the commit, and re-driven after
a fix (`offsetkeeper dlq show|replay`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from consumer.deadletters.writer import (
    HEADER_ATTEMPTS,
    HEADER_ERROR_CLASS,
    HEADER_ERROR_MESSAGE,
    HEADER_GROUP,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TIMESTAMP,
    HEADER_TOPIC,
)
from tests.fixtures.dead_letters import Message, offsetkeeper, read_topic
from tests.fixtures.kafka_tools import create_topic, end_offsets, partition_contents, unique_name
from tests.fixtures.processes import REPO, ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = pytest.mark.integration

GOOD = 40
POISON = b"poison"
BROKEN = b"broken-json"
DEAD_LETTER_FLAGS = (
    "--on-bad-record",
    "dead-letter",
    "--bad-record-retries",
    "1",
    "--bad-record-backoff",
    "0.05",
    "--stop-when-idle",
    "3",
)


def _order(index: int, currency: str | None = None) -> bytes:
    order: dict[str, object] = {"order_id": f"o{index}", "amount": index * 1.5}
    if currency is not None:
        order["currency"] = currency
    return json.dumps(order).encode()


def _produce_with_bad_records(kafka: Service, topic: str, *, broken: bool) -> None:
    """GOOD orders over two partitions, a poison key in each, and (optionally) invalid JSON."""
    from tests.fixtures.kafka_tools import produce  # noqa: PLC0415

    messages: list[tuple[bytes | None, bytes | None]] = [
        (f"k{i}".encode(), _order(i)) for i in range(GOOD)
    ]
    messages.insert(7, (POISON, _order(1000)))
    messages.insert(25, (POISON, _order(1001)))
    if broken:
        messages.insert(13, (BROKEN, b'{"order_id": "o-broken", "amount": '))
    produce(kafka.address, topic, messages, partition_of={POISON: 0, BROKEN: 1})


def _rows(db: Path) -> list[tuple[object, ...]]:
    return sqlite_rows(
        db,
        "SELECT source_topic, source_partition, source_offset, order_id FROM poison_orders "
        "ORDER BY source_topic, source_partition, source_offset",
    )


def _expected_rows(
    kafka: Service, topic: str, *, skip_keys: Iterable[bytes]
) -> list[tuple[object, ...]]:
    skipped = set(skip_keys)
    return [
        (topic, partition, offset, json.loads(value or b"{}")["order_id"])
        for partition, records in sorted(partition_contents(kafka.address, topic, 2).items())
        for offset, key, value in records
        if key not in skipped
    ]


def _bad_records(kafka: Service, topic: str) -> dict[tuple[int, int], tuple[bytes, bytes]]:
    return {
        (partition, offset): (key or b"", value or b"")
        for partition, records in partition_contents(kafka.address, topic, 2).items()
        for offset, key, value in records
        if key in (POISON, BROKEN)
    }


def _origin(message: Message) -> tuple[str, int, int]:
    h = message.headers
    return (h[HEADER_TOPIC].decode(), int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET]))


def test_bad_records_are_dead_lettered_once_each_with_their_origin_and_untouched_bytes(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("poison"), unique_name("poison")
    create_topic(kafka.address, topic, 2)
    _produce_with_bad_records(kafka, topic, broken=True)
    db = tmp_path / "poison.db"
    process = ConsumerProcess(
        run_args("tests.apps.poison:app", kafka.address, group, topic, f"sqlite:///{db}")
        + list(DEAD_LETTER_FLAGS),
        tmp_path / "run.log",
    )
    consumers.append(process)

    assert process.wait(timeout=120) == 0, process.log_path.read_text()[-3000:]

    assert _rows(db) == _expected_rows(kafka, topic, skip_keys=(POISON, BROKEN))
    assert len(_rows(db)) == GOOD
    bad = _bad_records(kafka, topic)
    letters = read_topic(kafka.address, f"{group}.dlq")
    assert sorted(_origin(m) for m in letters) == sorted((topic, p, o) for p, o in bad)
    for letter in letters:
        _topic, partition, offset = _origin(letter)
        assert (letter.key, letter.value) == bad[(partition, offset)], "original bytes untouched"
        assert letter.headers[HEADER_GROUP] == group.encode()
        assert letter.headers[HEADER_ATTEMPTS] == b"2"
        assert int(letter.headers[HEADER_TIMESTAMP]) > 0
        if letter.key == POISON:
            assert letter.headers[HEADER_ERROR_CLASS] == b"ValueError"
            assert b"cannot price order" in letter.headers[HEADER_ERROR_MESSAGE]
        else:
            assert letter.headers[HEADER_ERROR_CLASS] == b"DecodeError"
            assert b"not valid JSON" in letter.headers[HEADER_ERROR_MESSAGE]
        assert f"offset={offset}".encode() in letter.headers[HEADER_ERROR_MESSAGE]
    events = [e["event"] for e in process.events()]
    assert events.count("record_dead_lettered") == 3
    assert events.count("record_retry") == 3, "one retry per bad record"

    shown = offsetkeeper(
        "dlq",
        "show",
        "--bootstrap-servers",
        kafka.address,
        "--dead-letter-topic",
        f"{group}.dlq",
        "--format",
        "json",
    )
    assert shown.returncode == 0, shown.stderr
    listed = [json.loads(line) for line in shown.stdout.splitlines()]
    assert sorted((e["topic"], e["partition"], e["offset"]) for e in listed) == sorted(
        (topic, p, o) for p, o in bad
    )
    assert {e["error_class"] for e in listed} == {"ValueError", "DecodeError"}

    # Re-driving through the pipeline stops, named, at a letter that is still bad (the bytes of
    # the broken JSON cannot be fixed by code), with the letters before it committed.
    redrive = offsetkeeper(
        "dlq",
        "replay",
        "--bootstrap-servers",
        kafka.address,
        "--dead-letter-topic",
        f"{group}.dlq",
        "--to",
        "pipeline",
        "--app",
        "tests.apps.poison:fixed_app",
        "--sink",
        f"sqlite:///{db}",
    )
    assert redrive.returncode == 2, redrive.stdout + redrive.stderr
    assert "still bad" in redrive.stdout
    redriven = int(redrive.stdout.split("re-drove ", 1)[1].split(" ", 1)[0])
    assert redriven < len(bad), "only the letters before the still-bad one count"
    assert "not valid JSON" in redrive.stdout

    # A replay (backfill) of the same topic follows the same policy, into its own topic.
    replay_db = tmp_path / "replay.db"
    replayed = offsetkeeper(
        "replay",
        "--app",
        "tests.apps.poison:app",
        "--bootstrap-servers",
        kafka.address,
        "--topic",
        topic,
        "--from-offset",
        "0",
        "--sink",
        f"sqlite:///{replay_db}",
        "--job-id",
        "backfill",
        "--on-bad-record",
        "dead-letter",
        "--dead-letter-topic",
        "{group}.{topic}.dlq",
        "--bad-record-retries",
        "0",
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "3 dead-lettered" in replayed.stdout
    assert _rows(replay_db) == _expected_rows(kafka, topic, skip_keys=(POISON, BROKEN))
    replay_letters = read_topic(kafka.address, f"replay-backfill.{topic}.dlq")
    assert sorted(_origin(m) for m in replay_letters) == sorted((topic, p, o) for p, o in bad)
    assert {m.headers[HEADER_GROUP] for m in replay_letters} == {b"replay-backfill"}


@pytest.mark.parametrize("backend", ["confluent", "aiokafka"])
def test_a_kill_between_the_dead_letter_write_and_the_commit_loses_no_dead_letter(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess], backend: str
) -> None:
    topic, group = unique_name("poison-kill"), unique_name("poison-kill")
    create_topic(kafka.address, topic, 2)
    _produce_with_bad_records(kafka, topic, broken=True)
    db = tmp_path / "poison.db"
    args = run_args(
        "tests.apps.poison:app",
        kafka.address,
        group,
        topic,
        f"sqlite:///{db}",
        *DEAD_LETTER_FLAGS,
        "--backend",
        backend,
    )
    crashed = ConsumerProcess(
        args, tmp_path / "crash.log", env={"OFFSETKEEPER_TEST_CRASH_POINT": "after-dead-letters"}
    )
    consumers.append(crashed)
    assert crashed.wait(timeout=120) == -9, "killed after its dead letters were acknowledged"
    written_before_crash = read_topic(kafka.address, f"{group}.dlq")
    assert written_before_crash, "the crash came after the dead-letter write"
    committed = sqlite_checkpoints(db, group)
    bad = _bad_records(kafka, topic)
    for letter in written_before_crash:
        _t, partition, offset = _origin(letter)
        # Nothing past the dead letter was committed: its offset is still ahead of the checkpoint.
        assert committed.get(partition, 0) <= offset, (committed, partition, offset)

    restarted = ConsumerProcess(args, tmp_path / "restart.log")
    consumers.append(restarted)
    assert restarted.wait(timeout=120) == 0

    assert _rows(db) == _expected_rows(kafka, topic, skip_keys=(POISON, BROKEN))
    letters = read_topic(kafka.address, f"{group}.dlq")
    origins = [_origin(m) for m in letters]
    assert set(origins) == {(topic, p, o) for p, o in bad}, "every bad record, none lost"
    assert len(origins) > len(set(origins)), "the crash re-sent (never dropped) its letters"
    shown = offsetkeeper(
        "dlq", "show", "--bootstrap-servers", kafka.address, "--dead-letter-topic", f"{group}.dlq"
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{len(bad)} dead letter(s)")
    assert f"{len(origins) - len(bad)} repeat(s) collapsed" in shown.stdout


def test_dead_letters_are_re_driven_once_into_the_pipeline_and_into_their_source_topic(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("redrive"), unique_name("redrive")
    create_topic(kafka.address, topic, 2)
    _produce_with_bad_records(kafka, topic, broken=False)
    db = tmp_path / "redrive.db"
    sink = f"sqlite:///{db}"
    first = ConsumerProcess(
        run_args("tests.apps.poison:app", kafka.address, group, topic, sink)
        + list(DEAD_LETTER_FLAGS),
        tmp_path / "run.log",
    )
    consumers.append(first)
    assert first.wait(timeout=120) == 0
    poison = _bad_records(kafka, topic)
    assert len(poison) == 2
    dlq = f"{group}.dlq"
    common = ("--bootstrap-servers", kafka.address, "--dead-letter-topic", dlq)

    # Through the fixed pipeline: the rows the live consumer would have written, once.
    to_pipeline = ("dlq", "replay", *common, "--to", "pipeline", "--sink", sink)
    fixed = ("--app", "tests.apps.poison:fixed_app")
    done = offsetkeeper(*to_pipeline, *fixed)
    assert done.returncode == 0, done.stderr
    assert "re-drove 2 dead letter(s) to pipeline" in done.stdout
    assert _rows(db) == _expected_rows(kafka, topic, skip_keys=())
    again = offsetkeeper(*to_pipeline, *fixed)
    assert "re-drove 0 dead letter(s)" in again.stdout, "a second run re-drives nothing"
    assert _rows(db) == _expected_rows(kafka, topic, skip_keys=())

    # Back into the source topic (transactionally, with the re-drive group's position).
    ends_before = end_offsets(kafka.address, topic, 2)
    dry = offsetkeeper("dlq", "replay", *common, "--to", "original", "--dry-run")
    assert "would re-drive 2 dead letter(s)" in dry.stdout, dry.stdout + dry.stderr
    assert end_offsets(kafka.address, topic, 2) == ends_before
    redriven = offsetkeeper("dlq", "replay", *common, "--to", "original")
    assert redriven.returncode == 0, redriven.stderr
    assert "re-drove 2 dead letter(s) to original" in redriven.stdout
    once_more = offsetkeeper("dlq", "replay", *common, "--to", "original")
    assert "re-drove 0 dead letter(s)" in once_more.stdout
    source = read_topic(kafka.address, topic)
    copies = [m for m in source if m.offset >= ends_before[m.partition]]
    assert sorted((m.partition, m.key, m.value) for m in copies) == sorted(
        (partition, key, value) for (partition, _offset), (key, value) in poison.items()
    ), "each original back in its own partition, bytes untouched, once"
    assert all(not name.startswith("offsetkeeper.dlq.") for m in copies for name in m.headers)


def test_avro_with_evolution_bad_frames_and_a_registry_outage(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    """v1 and v2 records interleaved, read as v2 (defaults applied); a bad magic byte, an
    unknown schema id and a truncated body are dead-lettered; a registry answering 503 at
    start-up is waited out, and dead-letters nothing."""
    from consumer.decoding.avro import encode_confluent  # noqa: PLC0415
    from tests.fixtures.kafka_tools import produce  # noqa: PLC0415
    from tests.fixtures.schema_registry import FakeSchemaRegistry  # noqa: PLC0415

    v1 = json.loads((REPO / "schemas/examples/orders-v1.avsc").read_text())
    v2 = json.loads((REPO / "schemas/examples/orders-v2.avsc").read_text())
    topic, group = unique_name("avro-poison"), unique_name("avro-poison")
    create_topic(kafka.address, topic, 2)
    with FakeSchemaRegistry() as registry:
        id1 = registry.register(f"{topic}-value", v1)
        id2 = registry.register(f"{topic}-value", v2)

        def order(i: int, schema_id: int) -> bytes:
            base = {"order_id": f"o{i}", "customer": "c", "amount_cents": i, "status": "paid"}
            if schema_id == id1:
                return encode_confluent(v1, id1, {**base, "coupon": None})
            return encode_confluent(v2, id2, {**base, "currency": "USD"})

        messages: list[tuple[bytes | None, bytes | None]] = [
            (f"k{i}".encode(), order(i, id1 if i % 2 else id2)) for i in range(30)
        ]
        good = list(messages)
        bad = [
            (b"bad-magic", b"\x01" + order(100, id2)[1:]),
            (
                b"unknown-id",
                encode_confluent(
                    v2,
                    999,
                    {
                        "order_id": "o101",
                        "customer": "c",
                        "amount_cents": 1,
                        "status": "s",
                        "currency": "EUR",
                    },
                ),
            ),
            (b"truncated", order(102, id1)[:-4]),
            (POISON, order(103, id2)),
        ]
        for position, message in zip((3, 11, 17, 24), bad, strict=True):
            messages.insert(position, message)
        produce(kafka.address, topic, messages)

        registry.fail_with(503)
        db = tmp_path / "avro.db"
        process = ConsumerProcess(
            run_args("tests.apps.poison:app", kafka.address, group, topic, f"sqlite:///{db}")
            + list(DEAD_LETTER_FLAGS)
            + [
                "--decode",
                f"{topic}=avro",
                "--schema-registry-url",
                registry.url,
                "--reader-schema",
                f"{topic}={REPO / 'schemas/examples/orders-v2.avsc'}",
            ],
            tmp_path / "avro.log",
        )
        consumers.append(process)
        process.wait_for_event(
            "decode_retry", timeout=60, what="the consumer to wait out the registry outage"
        )
        registry.fail_with(None)
        assert process.wait(timeout=120) == 0, process.log_path.read_text()[-3000:]

    rows = sqlite_rows(db, "SELECT order_id, amount, currency FROM poison_orders ORDER BY order_id")
    expected = sorted((f"o{i}", float(i), "EUR" if i % 2 else "USD") for i in range(30))
    assert sorted(rows) == expected, "v1 records read as v2 get the default currency"
    assert len(good) == 30
    letters = read_topic(kafka.address, f"{group}.dlq")
    by_key = {m.key: m for m in letters}
    assert sorted(by_key) == sorted(key for key, _v in bad), "each bad record once, no other"
    assert len(letters) == len(bad)
    assert dict(bad)[b"truncated"] == by_key[b"truncated"].value
    messages_by_key = {k: m.headers[HEADER_ERROR_MESSAGE].decode() for k, m in by_key.items()}
    assert "magic byte" in messages_by_key[b"bad-magic"]
    assert "999" in messages_by_key[b"unknown-id"]
    assert by_key[POISON].headers[HEADER_ERROR_CLASS] == b"ValueError"
    assert by_key[b"truncated"].headers[HEADER_ERROR_CLASS] == b"DecodeError"


def test_a_re_driven_letter_never_replaces_a_newer_write_of_its_key(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    from tests.fixtures.kafka_tools import produce  # noqa: PLC0415

    topic, group = unique_name("redrive-latest"), unique_name("redrive-latest")
    create_topic(kafka.address, topic, 1)
    orders = [
        ("a", 1, False),
        ("a", 2, True),  # dead-lettered; "a" is written again after it
        ("a", 3, False),
        ("b", 1, False),
        ("b", 2, True),  # dead-lettered; the last write of "b"
    ]
    produce(
        kafka.address,
        topic,
        (
            (key.encode(), json.dumps({"order_id": key, "version": v, "poison": bad}).encode())
            for key, v, bad in orders
        ),
    )
    db = tmp_path / "latest.db"
    sink = f"sqlite:///{db}"
    live = ConsumerProcess(
        run_args("tests.apps.poison_latest:app", kafka.address, group, topic, sink)
        + list(DEAD_LETTER_FLAGS),
        tmp_path / "run.log",
    )
    consumers.append(live)
    assert live.wait(timeout=120) == 0
    latest = "SELECT order_id, version, offsetkeeper_offset FROM latest_orders ORDER BY order_id"
    assert sqlite_rows(db, latest) == [("a", 3, 2), ("b", 1, 3)]

    common = ("--bootstrap-servers", kafka.address, "--dead-letter-topic", f"{group}.dlq")
    done = offsetkeeper(
        "dlq", "replay", *common, "--to", "pipeline", "--sink", sink,
        "--app", "tests.apps.poison_latest:fixed_app",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "re-drove 2 dead letter(s) to pipeline" in done.stdout
    # "a" keeps its newer write (offset 2); "b" takes the re-driven letter, its newest record.
    assert sqlite_rows(db, latest) == [("a", 3, 2), ("b", 2, 4)]
