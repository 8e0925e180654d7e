"""ops/bench's PNG charts (charts.py, through report.py): drawn from the committed results alone,
they plot the document's figures, and the committed bench.md and charts are what the code
draws from the committed bench.json (so they were regenerated, and stay in step)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fixtures.browser import png_size

BENCH = Path(__file__).resolve().parents[2] / "ops" / "bench"
RESULTS = BENCH / "results"


@pytest.fixture(scope="module")
def report() -> Iterator[ModuleType]:
    """ops/bench/report.py, imported the way the harness imports it (ops/bench on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import report as module  # noqa: PLC0415 - only importable with ops/bench on the path

        yield module
    finally:
        sys.path.remove(str(BENCH))


def _doc(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "bench.json").read_text()))


def test_the_throughput_chart_plots_each_contenders_ratio_of_the_limit(
    report: ModuleType,
) -> None:
    bars = report.charts.throughput_bars(_doc(RESULTS), report.TARGET_SHARE_OF_LIMIT)

    by_key = {(bar.label, bar.encoding): bar for bar in bars}
    postgres = by_key[("offsetkeeper -> PostgreSQL (exactly-once)", "json")]
    assert (postgres.ratio, postgres.records_per_s, postgres.target) == (0.381, 40_366, 0.75)
    limit = by_key[("limit: bare confluent-kafka consumer, decode only", "avro")]
    assert (limit.ratio, limit.target) == (1.0, None)
    assert (
        "bare consumer decoding JSON with msgspec (offsetkeeper's JSON decoder)",
        "avro",
    ) not in by_key
    assert len(bars) == 22  # 12 contenders in JSON (--workers 2 too), 10 in Avro


def test_the_latency_chart_plots_the_percentiles(report: ModuleType) -> None:
    bars = report.charts.latency_bars(_doc(RESULTS))

    assert len(bars) == 8
    postgres = next(bar for bar in bars if bar.label.startswith("offsetkeeper -> PostgreSQL (exa"))
    assert (postgres.rate_per_s, postgres.p50_ms, postgres.p90_ms, postgres.p99_ms) == (
        2000,
        13,
        18,
        44,
    )
    assert report.charts.latency_bars(_doc(RESULTS / "workers")) == []  # no latency phase


@pytest.mark.parametrize("results", [RESULTS, RESULTS / "workers"], ids=["full", "workers"])
def test_the_committed_charts_are_drawn_again_from_the_committed_results(
    report: ModuleType, results: Path, tmp_path: Path
) -> None:
    shutil.copy(results / "bench.json", tmp_path / "bench.json")

    written = report.main([str(tmp_path)])

    assert written == 0
    names = report.charts.chart_names(_doc(results))
    assert names == (
        ["throughput.png", "latency.png"] if results == RESULTS else ["throughput.png"]
    )
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown == (results / "bench.md").read_text()
    for name in names:
        assert f"]({name})" in markdown  # bench.md links its charts
        drawn = (tmp_path / name).read_bytes()
        width, height = png_size(drawn)
        assert width == 1100
        assert 300 <= height <= 1600
        assert drawn == (results / name).read_bytes(), f"{name} is stale: run report.py"
