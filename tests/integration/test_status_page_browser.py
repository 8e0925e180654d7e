"""The status page in a real browser (headless Chromium, tests/fixtures/browser.py) against a
live consumer on the real broker: a bad record stops its partition, and the page shows it (topic,
partition, offset, field, error class, never the record's values) beside the partitions that
caught up; it loads nothing but itself, and reloads itself. The screenshot is kept under
.local/artifacts/ (and the test's tmp dir)."""

from __future__ import annotations

import importlib.metadata
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.browser import chromium, png_size, wait_for_text
from tests.fixtures.dirty_orders import DIRTY, produce_orders
from tests.fixtures.kafka_tools import create_topic, unique_name
from tests.fixtures.ops_http import OPS_ARGS, OpsEndpoint, ops_endpoint
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service
from tests.fixtures.tools import ARTIFACTS

pytestmark = pytest.mark.integration

APP = "tests.apps.passthrough:app"
PARTITIONS = 3
HUGE = next(d for d in DIRTY if d.name == "amount 10**30")  # refused by the row check
STOP_AT = 150  # its position in partition 1


def _settled(ops: OpsEndpoint) -> dict[str, Any] | None:
    """/status.json once partition 1 is stopped and the others have caught up."""
    status, document = ops.get("/status.json")
    if status != 200:
        return None
    partitions = {p["partition"]: p for p in document["partitions"]}
    if len(partitions) < PARTITIONS or partitions[1]["stopped"] is None:
        return None
    if any(partitions[p]["lag"] != 0 for p in (0, 2)):
        return None
    return dict(document)


def test_the_page_shows_a_partition_stopped_by_a_bad_record(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("status-page"), unique_name("status-page")
    create_topic(kafka.address, topic, PARTITIONS)
    produced = produce_orders(
        kafka.address, topic, partitions=PARTITIONS, good=900, dirty=[(1, STOP_AT, HUGE)]
    )
    ends = produced.ends()
    process = ConsumerProcess(
        run_args(
            APP,
            kafka.address,
            group,
            topic,
            f"sqlite:///{tmp_path / 'orders.db'}",
            "--bad-record-retries",
            "0",
            "--lag-interval",
            "0.5",
            *OPS_ARGS,
        ),
        tmp_path / "consumer.log",
    )
    consumers.append(process)
    ops = ops_endpoint(process)
    wait_until(lambda: _settled(ops) is not None, timeout=120, what="partition 1 to stop")

    with chromium(tmp_path) as browser:
        url = f"http://127.0.0.1:{ops.port}/"
        started = time.monotonic()
        browser.navigate(url)
        text = wait_for_text(browser, "Stopped partitions")
        shot = browser.screenshot(tmp_path / "status-page.png")
        # It reloads itself: the browser asks again within the refresh interval (5 s).
        wait_until(
            lambda: browser.requested_urls().count(url) >= 2,
            timeout=15,
            what="the page to reload itself",
        )
        reloaded_after = time.monotonic() - started
        requested = browser.requested_urls()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "status-page.png", ARTIFACTS / "status-page.png")
    print(f"screenshot: {ARTIFACTS / 'status-page.png'}; reloaded after {reloaded_after:.1f}s")
    print(text)

    lines = text.splitlines()
    version = importlib.metadata.version("offsetkeeper")
    for label, value in (("App", APP), ("Group", group), ("Topics", topic)):
        assert lines[lines.index(label) + 1] == value, text
    assert lines[lines.index("Version") + 1] == version
    assert lines[lines.index("Status") + 1] == "not ready"
    assert f"{topic}[1] is stopped on a bad record at offset {STOP_AT}" in lines
    # The stopped partitions' table: topic, partition, offset, field, error class.
    assert f"{topic}\t1\t{STOP_AT}\tamount\tInvalidRecordError" in lines
    # Partitions 0 and 2 caught up: next offset = end offset, lag 0, consuming.
    for partition in (0, 2):
        row = next(line for line in lines if line.startswith(f"{topic}\t{partition}\t"))
        cells = row.split("\t")
        end = f"{ends[partition]:,}"
        assert cells[2:5] == [end, end, "0"], row
        assert cells[5].endswith(" ago"), row
        assert cells[-1] == "consuming", row
    row = [line for line in lines if line.startswith(f"{topic}\t1\t")][-1]  # the partitions'
    assert row.split("\t")[2:5] == [f"{STOP_AT}", f"{ends[1]:,}", f"{ends[1] - STOP_AT:,}"]
    assert row.endswith("\tstopped")
    assert lines[lines.index("Bad records that stopped a partition") + 1] == "1"
    assert lines[lines.index("Dead letters") + 1] == "0"
    assert lines[lines.index("Records lost") + 1] == "0"
    assert lines[lines.index("Sink retries") + 1] == "0 in all; none in progress"
    assert str(10**30) not in text, "a row value reached the page"
    assert set(requested) == {url}, f"the page loaded something else: {requested}"
    assert png_size(shot) == (1280, 1000)
    assert len(shot) > 20_000, "the screenshot is blank"
    assert process.alive(), "the other partitions keep flowing; the process runs on"
