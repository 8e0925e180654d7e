"""`offsetkeeper audit` against the real broker and both SQL sinks: clean on a correct sink,
and each kind of difference found row by row (deleted, altered and added by hand; a range
skipped by moving a checkpoint forward)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.kafka_tools import create_topic, encode, order_event, produce, unique_name
from tests.fixtures.processes import OFFSETKEEPER, REPO, ConsumerProcess, run_args
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest

pytestmark = pytest.mark.integration

APP = "tests.apps.ledger:app"
EXIT_PROBLEMS_FOUND = 4


def offsetkeeper(
    kafka: Service, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`offsetkeeper COMMAND [SUBCOMMAND] --bootstrap-servers ... ARGS`, its output captured."""
    command, rest = args[0], args[1:]
    subcommand = (rest[0],) if command == "checkpoint" else ()
    return subprocess.run(
        [
            OFFSETKEEPER,
            command,
            *subcommand,
            "--bootstrap-servers",
            kafka.address,
            "--log-format",
            "json",
            *rest[len(subcommand) :],
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"PATH": str(Path(OFFSETKEEPER).parent), "PYTHONPATH": str(REPO), **(env or {})},
    )


def audit(
    kafka: Service, sink: SinkUnderTest, topic: str, group: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    result = offsetkeeper(
        kafka,
        "audit",
        "--app",
        APP,
        "--topic",
        topic,
        "--group",
        group,
        "--sink",
        sink.url,
        "--format",
        "json",
        *extra,
    )
    assert result.returncode in {0, EXIT_PROBLEMS_FOUND}, result.stderr[-3000:]
    return result.returncode, json.loads(result.stdout)


def totals(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {table["table"]: table["totals"] for table in report["tables"]}


def consume_until_idle(
    kafka: Service, sink: SinkUnderTest, topic: str, group: str, log: Path
) -> None:
    member = ConsumerProcess(
        run_args(APP, kafka.address, group, topic, sink.url, "--stop-when-idle", "2"), log
    )
    assert member.wait(timeout=120) == 0, log.read_text()[-3000:]


def _orders(topic_keys: range, version: int) -> list[tuple[bytes, bytes]]:
    return [(f"o-{i}".encode(), encode(order_event(f"o-{i}", version))) for i in topic_keys]


def test_the_audit_is_clean_then_finds_rows_deleted_altered_and_added_by_hand(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path
) -> None:
    topic, group = unique_name("audit"), unique_name("audited")
    create_topic(kafka.address, topic, 3)
    produce(kafka.address, topic, _orders(range(600), 1))
    produce(kafka.address, topic, _orders(range(300), 2))  # half the keys updated
    consume_until_idle(kafka, sink, topic, group, tmp_path / "live.log")

    code, report = audit(kafka, sink, topic, group)
    assert code == 0, report
    assert report["clean"] is True
    assert report["records_recomputed"] == 900
    clean = {"matching": 0, "missing": 0, "different": 0, "unexpected": 0}
    assert totals(report) == {
        "ledger_latest": {**clean, "matching": 600},
        "ledger_entries": {**clean, "matching": 900},
    }

    sink.query_write("DELETE FROM ledger_latest WHERE order_id = 'o-5'")
    sink.query_write(
        "UPDATE ledger_entries SET amount_cents = amount_cents + 1 WHERE order_id = 'o-400'"
    )
    sink.query_write("INSERT INTO ledger_latest (order_id, customer) VALUES ('forged', 'x')")

    code, report = audit(kafka, sink, topic, group)
    assert code == EXIT_PROBLEMS_FOUND
    assert report["clean"] is False
    assert totals(report) == {
        "ledger_latest": {**clean, "matching": 599, "missing": 1, "unexpected": 1},
        "ledger_entries": {**clean, "matching": 899, "different": 1},
    }
    latest, entries = report["tables"]
    examples = {
        verdict: example
        for counts in latest["partitions"].values()
        for verdict, shown in counts["examples"].items()
        for example in shown
    }
    assert examples["missing"]["key"] == ["o-5"]
    assert examples["unexpected"] == {
        "key": ["forged"],
        "stored_at": None,
        "why": "no source position",
    }
    (altered,) = [
        example
        for counts in entries["partitions"].values()
        for example in counts["examples"].get("different", [])
    ]
    assert altered["columns"] == ["amount_cents"]

    # Samples: the slices of one split add up to the whole.
    slices = [
        audit(kafka, sink, topic, group, "--sample-every", "2", "--sample-slice", str(i))[1]
        for i in range(2)
    ]
    whole = totals(report)
    for table, counts in whole.items():
        for verdict, count in counts.items():
            assert sum(totals(part)[table][verdict] for part in slices) == count
    assert 0 < totals(slices[0])["ledger_latest"]["matching"] < 599

    # The text report names each difference.
    text = offsetkeeper(
        kafka, "audit", "--app", APP, "--topic", topic, "--group", group, "--sink", sink.url
    )
    assert text.returncode == EXIT_PROBLEMS_FOUND
    assert "DIFFERENCES FOUND" in text.stdout
    assert '"o-5"' in text.stdout
    assert "no source position" in text.stdout


def test_the_audit_finds_a_range_skipped_by_moving_a_checkpoint_forward(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path
) -> None:
    topic, group = unique_name("audit-skip"), unique_name("skipper")
    create_topic(kafka.address, topic, 2)
    produce(kafka.address, topic, _orders(range(100), 1))
    consume_until_idle(kafka, sink, topic, group, tmp_path / "first.log")
    produce(kafka.address, topic, _orders(range(100, 300), 1))
    moved = offsetkeeper(
        kafka, "checkpoint", "reset", "--group", group, "--topic", topic, "--to-latest",
        "--sink", sink.url,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr[-2000:]
    produce(kafka.address, topic, _orders(range(300, 400), 1))
    consume_until_idle(kafka, sink, topic, group, tmp_path / "second.log")

    code, report = audit(kafka, sink, topic, group)
    assert code == EXIT_PROBLEMS_FOUND
    clean = {"matching": 0, "missing": 0, "different": 0, "unexpected": 0}
    assert totals(report) == {
        "ledger_latest": {**clean, "matching": 200, "missing": 200},
        "ledger_entries": {**clean, "matching": 200, "missing": 200},
    }
    missing = {
        example["key"][0]
        for table in report["tables"]
        if table["table"] == "ledger_latest"
        for counts in table["partitions"].values()
        for example in counts["examples"].get("missing", [])
    }
    assert missing, "examples name the missing keys"
    assert all(100 <= int(key.removeprefix("o-")) < 300 for key in missing)
