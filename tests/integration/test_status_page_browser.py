"""The status page in a real browser (headless Chromium, tests/fixtures/browser.py) against a
live consumer on the real broker: a bad record stops its partition, and the page shows it (topic,
partition, offset, field, error class, never the record's values) beside the partitions that
caught up; it loads nothing but itself, and reloads itself. The screenshot is kept under
.local/artifacts/ (and the test's tmp dir)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from consumer._version import __version__ as consumer_version_string
from tests.fixtures.browser import chromium, png_size, wait_for_text
from tests.fixtures.processes import ConsumerProcess, wait_until
from tests.fixtures.services import Service
from tests.fixtures.stopped_partition import (
    APP,
    ROW_VALUE,
    STOP_AT,
    STOPPED,
    start_stopped_consumer,
)
from tests.fixtures.tools import ARTIFACTS

pytestmark = pytest.mark.integration


def test_the_page_shows_a_partition_stopped_by_a_bad_record(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    consumer = start_stopped_consumer(kafka.address, tmp_path, consumers, "status-page")
    topic, group, ops = consumer.topic, consumer.group, consumer.ops
    ends = consumer.produced.ends()

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
    version = consumer_version_string
    for label, value in (("App", APP), ("Group", group), ("Topics", topic)):
        assert lines[lines.index(label) + 1] == value, text
    assert lines[lines.index("Version") + 1] == version
    assert lines[lines.index("Status") + 1] == "not ready"
    assert f"{topic}[{STOPPED}] is stopped on a bad record at offset {STOP_AT}" in lines
    # The stopped partitions' table: topic, partition, offset, field, error class.
    assert f"{topic}\t{STOPPED}\t{STOP_AT}\tamount\tInvalidRecordError" in lines
    # Partitions 0 and 2 caught up: next offset = end offset, lag 0, consuming.
    for partition in set(ends) - {STOPPED}:
        row = next(line for line in lines if line.startswith(f"{topic}\t{partition}\t"))
        cells = row.split("\t")
        end = f"{ends[partition]:,}"
        assert cells[2:5] == [end, end, "0"], row
        assert cells[5].endswith(" ago"), row
        assert cells[-1] == "consuming", row
    row = [line for line in lines if line.startswith(f"{topic}\t{STOPPED}\t")][-1]
    end, lag = ends[STOPPED], ends[STOPPED] - STOP_AT
    assert row.split("\t")[2:5] == [f"{STOP_AT}", f"{end:,}", f"{lag:,}"]
    assert row.endswith("\tstopped")
    assert lines[lines.index("Bad records that stopped a partition") + 1] == "1"
    assert lines[lines.index("Dead letters") + 1] == "0"
    assert lines[lines.index("Records lost") + 1] == "0"
    assert lines[lines.index("Sink retries") + 1] == "0 in all; none in progress"
    assert ROW_VALUE not in text, "a row value reached the page"
    assert set(requested) == {url}, f"the page loaded something else: {requested}"
    assert png_size(shot) == (1280, 1000)
    assert len(shot) > 20_000, "the screenshot is blank"
    assert consumer.process.alive(), "the other partitions keep flowing; the process runs on"
