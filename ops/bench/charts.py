"""PNG charts of a benchmark document (bench.json), written beside bench.md:

    throughput.png  each contender's rate as a ratio of the limit (the bare consumer, 1.0), per
                    encoding, with the targets of the sinks that have one
    latency.png     end-to-end latency percentiles (p50, p90, p99; produce timestamp to commit)
                    per contender at the latency phase's rate, on a log scale

Drawn with matplotlib's Agg backend (no display), from the document alone, so committed results
can be drawn again without running the benchmark: `python ops/bench/report.py DIR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

THROUGHPUT_PNG = "throughput.png"
LATENCY_PNG = "latency.png"
_ENCODING_COLOURS = {"json": "#3b75af", "avro": "#ef8636"}
_QUANTILE_COLOURS = {"p50": "#a6cee3", "p90": "#1f78b4", "p99": "#08306b"}
# PNG metadata without the matplotlib version, so a redraw by the same code is byte-stable.
_METADATA = {"Software": None}


@dataclass(frozen=True)
class ThroughputBar:
    label: str
    encoding: str
    ratio: float  # rate / the limit's rate
    records_per_s: int
    target: float | None  # share of the limit this contender is to reach


@dataclass(frozen=True)
class LatencyBar:
    label: str
    rate_per_s: int
    p50_ms: int
    p90_ms: int
    p99_ms: int


def throughput_bars(doc: dict[str, Any], targets: dict[str, float]) -> list[ThroughputBar]:
    """One bar per contender and encoding that has a ratio, in the document's order."""
    bars = []
    for name, entry in doc["throughput"].items():
        for encoding in doc["workload"]["encodings"]:
            found = entry.get(encoding) or {}
            if found.get("vs_limit") is None or not found.get("records_per_s_median"):
                continue
            bars.append(
                ThroughputBar(
                    label=entry["label"],
                    encoding=encoding,
                    ratio=float(found["vs_limit"]),
                    records_per_s=int(found["records_per_s_median"]),
                    target=targets.get(name),
                )
            )
    return bars


def latency_bars(doc: dict[str, Any]) -> list[LatencyBar]:
    """One group per contender whose latency run gave percentiles, in the document's order."""
    bars = []
    for name, entry in (doc.get("latency") or {}).items():
        if entry.get("p50_ms") is None:
            continue
        bars.append(
            LatencyBar(
                label=doc["throughput"].get(name, {}).get("label", name),
                rate_per_s=int(entry["rate_per_s"]),
                p50_ms=int(entry["p50_ms"]),
                p90_ms=int(entry["p90_ms"]),
                p99_ms=int(entry["p99_ms"]),
            )
        )
    return bars


def _subtitle(doc: dict[str, Any]) -> str:
    machine = doc["machine"]
    return (
        f"{doc['mode']} run {doc['began_at'][:10]}, {machine['cores']} cores "
        f"({machine['cpu_model']}), offsetkeeper {machine['offsetkeeper']}"
    )


def draw_throughput(doc: dict[str, Any], targets: dict[str, float], path: Path) -> None:
    bars = throughput_bars(doc, targets)
    labels = list(dict.fromkeys(bar.label for bar in bars))
    encodings = [e for e in doc["workload"]["encodings"] if any(b.encoding == e for b in bars)]
    height = 0.8 / max(len(encodings), 1)
    figure, axes = plt.subplots(figsize=(11, 1.2 + 0.55 * len(labels) * len(encodings)))
    for offset, encoding in enumerate(encodings):
        for bar in (b for b in bars if b.encoding == encoding):
            y = labels.index(bar.label) + offset * height
            axes.barh(y, bar.ratio, height, color=_ENCODING_COLOURS.get(encoding, "#777"))
            axes.text(
                max(bar.ratio, bar.target or 0.0) + 0.01,
                y,
                f"{bar.ratio:.2f}x  ({bar.records_per_s:,}/s)",
                va="center",
                fontsize=8,
            )
            if bar.target is not None:
                axes.plot([bar.target] * 2, [y - height / 2, y + height / 2], "r-", lw=2)
    legend = [Patch(color=_ENCODING_COLOURS.get(e, "#777"), label=e.upper()) for e in encodings]
    legend.append(Line2D([], [], color="r", lw=2, label="target"))
    axes.axvline(1.0, color="#444", ls="--", lw=1)
    axes.set_yticks([i + height * (len(encodings) - 1) / 2 for i in range(len(labels))], labels)
    axes.invert_yaxis()
    axes.set_xlim(0, max([b.ratio for b in bars] + [1.0]) * 1.3)
    axes.set_xlabel("records/s as a ratio of the limit (bare confluent-kafka consumer = 1.0)")
    axes.set_title(f"Throughput per contender\n{_subtitle(doc)}", fontsize=10)
    axes.legend(handles=legend, loc="lower right", fontsize=8)
    _save(figure, path)


def draw_latency(doc: dict[str, Any], path: Path) -> None:
    bars = latency_bars(doc)
    height = 0.27
    figure, axes = plt.subplots(figsize=(11, 1.2 + 0.6 * len(bars)))
    for offset, quantile in enumerate(("p50", "p90", "p99")):
        values = [getattr(bar, f"{quantile}_ms") for bar in bars]
        ys = [i + offset * height for i in range(len(bars))]
        axes.barh(ys, values, height, color=_QUANTILE_COLOURS[quantile], label=quantile)
        for y, value in zip(ys, values, strict=True):
            axes.text(value * 1.08, y, f"{value:,} ms", va="center", fontsize=7)
    axes.set_xscale("log")
    axes.set_yticks([i + height for i in range(len(bars))], [bar.label for bar in bars])
    axes.invert_yaxis()
    axes.set_xlim(1, max(bar.p99_ms for bar in bars) * 10)
    rates = sorted({bar.rate_per_s for bar in bars})
    axes.set_xlabel(
        "milliseconds from produce timestamp to commit (log scale), at "
        + ", ".join(f"{rate:,}" for rate in rates)
        + " records/s"
    )
    axes.set_title(f"End-to-end latency (JSON)\n{_subtitle(doc)}", fontsize=10)
    axes.legend(loc="upper right", fontsize=8)
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata=_METADATA)
    plt.close(figure)


def chart_names(doc: dict[str, Any]) -> list[str]:
    """The charts a document has data for."""
    names = [THROUGHPUT_PNG] if doc.get("throughput") else []
    return names + ([LATENCY_PNG] if latency_bars(doc) else [])


def write_charts(doc: dict[str, Any], targets: dict[str, float], out_dir: Path) -> list[Path]:
    """Draw every chart the document has data for into `out_dir`; the paths written."""
    written = []
    for name in chart_names(doc):
        path = out_dir / name
        if name == THROUGHPUT_PNG:
            draw_throughput(doc, targets, path)
        else:
            draw_latency(doc, path)
        written.append(path)
    return written
