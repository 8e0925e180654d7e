"""Figures, ratios and targets from the raw runs; the JSON document, its Markdown table and
its PNG charts (charts.py).

`python ops/bench/report.py DIR [DIR ...]` draws bench.md and the charts again from each
DIR/bench.json, without running anything."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import charts

# Share of the limit (the bare consumer's rate) each sink is to reach.
TARGET_SHARE_OF_LIMIT = {"ok-postgresql": 0.75, "ok-sqlite": 0.8, "ok-null": 0.9}
TARGET_VS_HANDWRITTEN = 3.0
TARGET_EXACTLY_ONCE_COST = 0.05
TARGET_RSS_MIB = 300.0
# offsetkeeper -> PostgreSQL at the latency rate, default settings.
TARGET_LATENCY_P50_MS = 20
TARGET_LATENCY_P99_MS = 100


def percentiles(samples: Sequence[int]) -> dict[str, Any]:
    if not samples:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": ordered[-1]}


def cadence_text(entry: dict[str, Any]) -> str:
    if entry.get("p50_ms") is None:
        return entry.get("error", "no samples")
    return f"{latency_text(entry)}  {entry['batches']} commits, {entry['records_per_batch']}/commit"


def latency_text(entry: dict[str, Any]) -> str:
    if entry.get("p50_ms") is None:
        return "no samples"
    return (
        f"p50 {entry['p50_ms']} ms  p90 {entry['p90_ms']} ms  p99 {entry['p99_ms']} ms  "
        f"max {entry['max_ms']} ms  ({entry['records_measured']:,} records)"
    )


def _runs_ok(runs: list[dict[str, Any]]) -> bool:
    return all(
        run["exit_code"] == 0 and all(c.get("ok") for c in run.get("checks", {}).values())
        for run in runs
    )


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["records_per_s"] for r in runs if r.get("records_per_s") and r["exit_code"] == 0]
    return {
        "records_per_s_median": round(statistics.median(rates)) if rates else None,
        "records_per_s_runs": [round(r) for r in rates],
        "runs": len(runs),
        "records_per_run": runs[0]["records_target"] if runs else None,
        "peak_rss_mib_max": max(
            (r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib")), default=None
        ),
        "checked": any("checks" in r for r in runs),
        "correct": _runs_ok(runs),
        "raw": runs,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def build(
    *,
    settings: Any,
    contenders: Sequence[Any],
    runs: dict[str, Any],
    latency: dict[str, Any],
    cadence: dict[str, Any],
    recovery: dict[str, Any],
    profiles: dict[str, Any],
    machine: dict[str, Any],
    began_at: datetime,
    duration_s: float,
    load: tuple[list[float], list[float]],
    aiokafka: bool,
) -> dict[str, Any]:
    throughput: dict[str, Any] = {}
    for contender in contenders:
        per_encoding = {}
        for encoding, contender_runs in runs.get(contender.name, {}).items():
            per_encoding[encoding] = _summary(contender_runs)
        throughput[contender.name] = {"label": contender.label, **per_encoding}
    for encoding in settings.encodings:
        rate = {
            name: entry.get(encoding, {}).get("records_per_s_median")
            for name, entry in throughput.items()
        }
        for name, entry in throughput.items():
            if encoding not in entry:
                continue
            entry[encoding]["vs_limit"] = _ratio(rate[name], rate.get("limit"))
            entry[encoding]["vs_handwritten"] = _ratio(rate[name], rate.get("handwritten"))
            entry[encoding]["vs_peer"] = _ratio(rate[name], rate.get("peer-quixstreams"))
    targets = _targets(settings, throughput, latency)
    correct = all(
        entry[e]["correct"]
        for entry in throughput.values()
        for e in settings.encodings
        if e in entry
    ) and all(
        all(c.get("ok") for c in trial["checks"].values()) and trial["replacement_exit_code"] == 0
        for trial in recovery.get("trials", [])
    )
    return {
        "mode": "quick" if settings.quick else "full",
        "began_at": began_at.isoformat(timespec="seconds"),
        "duration_s": round(duration_s),
        "correct": correct,
        "machine": {**machine, "load_average_before": load[0], "load_average_after": load[1]},
        "workload": {
            "records": settings.records,
            "partitions": 6,
            "value_bytes": "about 200 (JSON; Avro padded to the same)",
            "repeated_keys": "about 20% (so about 80% distinct keys)",
            "encodings": list(settings.encodings),
            "repetitions": settings.repetitions,
            "handwritten_records": settings.handwritten_records,
            "batch_max_records": 2000,
        },
        "aiokafka_backend": "measured"
        if aiokafka
        else "not available: `offsetkeeper run --help` shows no --backend option",
        "throughput": throughput,
        "latency": latency,
        "cadence": cadence,
        "recovery": _recovery_summary(recovery),
        "targets": targets,
        "profiles": profiles,
    }


def _recovery_summary(recovery: dict[str, Any]) -> dict[str, Any]:
    if not recovery:
        return {}
    by_mode: dict[str, list[float]] = {}
    for trial in recovery["trials"]:
        by_mode.setdefault(trial["mode"], []).append(trial["recovery_s"])
    return {
        **recovery,
        "median_s": {mode: round(statistics.median(v), 2) for mode, v in by_mode.items()},
    }


def _targets(
    settings: Any, throughput: dict[str, Any], latency: dict[str, Any]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    judged = not settings.quick

    def add(what: str, value: Any, met: bool | None, detail: str) -> None:
        out.append(
            {"target": what, "value": value, "met": met if judged else None, "detail": detail}
        )

    pg = throughput.get("ok-postgresql", {})
    split = throughput.get("ok-split-postgresql", {})
    kafka_only = throughput.get("ok-kafka-offsets-postgresql", {})
    same_decoder = throughput.get("limit-msgspec", {}).get("json", {}).get("records_per_s_median")
    for encoding in settings.encodings:
        for name, floor in TARGET_SHARE_OF_LIMIT.items():
            found = throughput.get(name, {}).get(encoding, {})
            share = found.get("vs_limit")
            if share is not None:
                add(
                    f"{name.removeprefix('ok-')} >= {floor:.2f}x limit ({encoding})",
                    share,
                    share >= floor,
                    "rate / limit rate",
                )
            if encoding == "json" and same_decoder and found.get("records_per_s_median"):
                add(
                    f"(info) {name.removeprefix('ok-')} x the limit decoding with msgspec (json)",
                    _ratio(found["records_per_s_median"], same_decoder),
                    None,
                    "rate / rate of the bare consumer using offsetkeeper's JSON decoder",
                )
        entry = pg.get(encoding)
        if not entry:
            continue
        hw = entry.get("vs_handwritten")
        add(
            f"PostgreSQL >= 3x hand-written ({encoding})",
            hw,
            hw is not None and hw >= TARGET_VS_HANDWRITTEN,
            "rate / hand-written rate",
        )
        base = split.get(encoding, {}).get("records_per_s_median")
        rate = entry.get("records_per_s_median")
        cost = round(1 - rate / base, 3) if rate and base else None
        add(
            f"exactly-once costs <= 5% vs offsets in a 2nd transaction ({encoding})",
            cost,
            cost is not None and cost <= TARGET_EXACTLY_ONCE_COST,
            "1 - rate / rate with checkpoints in a 2nd transaction (negative: faster)",
        )
        base = kafka_only.get(encoding, {}).get("records_per_s_median")
        cost = round(1 - rate / base, 3) if rate and base else None
        add(
            f"(info) cost of keeping checkpoints in the sink vs offsets only in Kafka ({encoding})",
            cost,
            None,
            "1 - rate / rate with no checkpoint in the sink",
        )
        peer = entry.get("vs_peer")
        add(
            f"ahead of the peer ({encoding})",
            peer,
            peer is not None and peer > 1.0,
            "rate / Quix Streams rate",
        )
    followed = latency.get("ok-postgresql", {})
    for quantile, limit in (("p50", TARGET_LATENCY_P50_MS), ("p99", TARGET_LATENCY_P99_MS)):
        value = followed.get(f"{quantile}_ms")
        if value is not None:
            add(
                f"PostgreSQL latency {quantile} <= {limit} ms at {followed.get('rate_per_s')}/s",
                value,
                value <= limit,
                "produce timestamp to commit, default settings",
            )
    rss = [
        (name, e.get("peak_rss_mib_max"))
        for name, entry in throughput.items()
        if name.startswith("ok-")
        for e in (entry.get(enc, {}) for enc in settings.encodings)
        if e.get("peak_rss_mib_max")
    ]
    if rss:
        worst = max(rss, key=lambda item: item[1])
        add(
            f"peak RSS < {TARGET_RSS_MIB:.0f} MB ({settings.records:,} records)",
            worst[1],
            worst[1] < TARGET_RSS_MIB,
            f"highest offsetkeeper process: {worst[0]} (MiB)",
        )
    return out


# -- Markdown ------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value else "n/a"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def write_results(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """bench.json, bench.md and the charts into `out_dir`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    return [out_dir / "bench.json", *redraw(doc, out_dir)]


def redraw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """bench.md and the charts from the document (bench.json is left as it is)."""
    (out_dir / "bench.md").write_text(markdown(doc))
    return [out_dir / "bench.md", *charts.write_charts(doc, TARGET_SHARE_OF_LIMIT, out_dir)]


def markdown(doc: dict[str, Any]) -> str:
    lines = _header(doc) + _charts(doc) + _throughput(doc) + _latency(doc) + _cadence(doc)
    lines += _recovery(doc) + _targets_md(doc)
    lines += _profiles(doc)
    return "\n".join(lines) + "\n"


def _header(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    w = doc["workload"]
    return [
        f"# offsetkeeper benchmark ({doc['mode']} run)",
        "",
        f"Run {doc['began_at']}, took {doc['duration_s']} s. Row-by-row checks: "
        f"**{'all passed' if doc['correct'] else 'FAILED'}**.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}; load average {m['load_average_before']} before, "
        f"{m['load_average_after']} after (other work shares this machine). "
        f"Python {m['python']}, offsetkeeper {m['offsetkeeper']} ({m['offsetkeeper_commit']}), "
        f"confluent-kafka {m['confluent_kafka']} / librdkafka {m['librdkafka']}, psycopg "
        f"{m['psycopg']}, fastavro {m['fastavro']}; {m['kafka_broker']}, {m['java']}; "
        f"{m['postgresql']}; peer: Quix Streams {m['peer']}.",
        "",
        f"Workload: {w['records']:,} records over {w['partitions']} partitions, values of "
        f"{w['value_bytes']} bytes, {w['repeated_keys']}. Rate = records / (last commit - "
        f"first record), median of {w['repetitions']} run(s). Batches of up to "
        f"{w['batch_max_records']} records. aiokafka backend: {doc['aiokafka_backend']}.",
        "",
        "How each figure is taken, and what each contender is: ops/bench/README.md.",
    ]


def _charts(doc: dict[str, Any]) -> list[str]:
    titles = {
        charts.THROUGHPUT_PNG: "Throughput as a ratio of the limit",
        charts.LATENCY_PNG: "Latency percentiles",
    }
    names = charts.chart_names(doc)
    if not names:
        return []
    return ["", "Charts: " + ", ".join(f"[{titles[name]}]({name})" for name in names) + "."]


def _throughput_cells(entry: dict[str, Any], enc: str, total: int) -> tuple[str, str | None]:
    e = entry.get(enc)
    if not e:
        return " | | | | |", None
    runs = ", ".join(f"{r:,}" for r in e["records_per_s_runs"])
    prefix = "" if e["records_per_run"] >= total else f" (first {e['records_per_run']:,})"
    cells = (
        f" **{_rate(e['records_per_s_median'])}** ({runs}){prefix} |"
        f" {_x(e['vs_limit'])} | {_x(e['vs_handwritten'])} | {_x(e['vs_peer'])} |"
        f" {e['peak_rss_mib_max']} |"
    )
    if e["checked"] or not e["correct"]:
        return cells, f"{enc} {'ok' if e['correct'] else 'FAILED'}"
    return cells, None


def _throughput(doc: dict[str, Any]) -> list[str]:
    encodings = doc["workload"]["encodings"]
    header = "| contender |"
    rule = "| --- |"
    for enc in encodings:
        header += f" {enc} rec/s | x limit | x hand-written | x peer | peak RSS MiB |"
        rule += " ---: | ---: | ---: | ---: | ---: |"
    lines = ["", "## Throughput", "", header + " checked |", rule + " --- |"]
    for entry in doc["throughput"].values():
        row = f"| {entry['label']} |"
        checked = []
        for enc in encodings:
            cells, check = _throughput_cells(entry, enc, doc["workload"]["records"])
            row += cells
            if check:
                checked.append(check)
        lines.append(row + f" {', '.join(checked) or '-'} |")
    return lines


def _latency(doc: dict[str, Any]) -> list[str]:
    if not doc["latency"]:
        return []
    lines = [
        "",
        "## End-to-end latency (produce timestamp to commit), JSON",
        "",
        "| contender | rate | p50 ms | p90 ms | p99 ms | max ms | records |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, e in doc["latency"].items():
        label = doc["throughput"].get(name, {}).get("label", name)
        if "error" in e:
            lines.append(f"| {label} | | {e['error']} | | | | |")
            continue
        lines.append(
            f"| {label} | {e['rate_per_s']}/s | {e['p50_ms']} | {e['p90_ms']} | "
            f"{e['p99_ms']} | {e['max_ms']} | {e['records_measured']:,} |"
        )
    return lines


def _cadence(doc: dict[str, Any]) -> list[str]:
    if not doc.get("cadence"):
        return []
    lines = [
        "",
        "## Commit cadence: offsetkeeper -> PostgreSQL following the latency stream, JSON",
        "",
        "`--commit-interval`: how long a batch may wait to fill once it has a record. A crash",
        "redoes at most the batch being committed and the one being processed.",
        "",
        "| commit interval | p50 ms | p99 ms | commits | records per commit |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in doc["cadence"].values():
        if "error" in e:
            lines.append(f"| {e.get('commit_interval_s')} s | {e['error']} | | | |")
            continue
        lines.append(
            f"| {e['commit_interval_s']:g} s | {e['p50_ms']} | {e['p99_ms']} | "
            f"{e['batches']:,} | {e['records_per_batch']} |"
        )
    return lines


def _recovery(doc: dict[str, Any]) -> list[str]:
    rec = doc["recovery"]
    if not rec:
        return []
    lines = [
        "",
        "## Recovery after kill -9 (offsetkeeper -> PostgreSQL)",
        "",
        f"A consumer follows a stream of {rec['stream_rate_per_s']} records/s; it is "
        f"killed with SIGKILL and a replacement is started at once. Time from the kill "
        f"to the replacement's first committed batch (session.timeout.ms = "
        f"{rec['session_timeout_ms']}; includes the replacement's process start).",
        "",
        "| membership | trials (s) | median s | assigned after (s) | rows |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for mode, median in rec["median_s"].items():
        trials = [t for t in rec["trials"] if t["mode"] == mode]
        label = "static (group.instance.id)" if mode == "static" else "dynamic (session timeout)"
        ok = all(all(c["ok"] for c in t["checks"].values()) for t in trials)
        lines.append(
            f"| {label} | {', '.join(str(t['recovery_s']) for t in trials)} | {median} | "
            f"{', '.join(str(t['replacement_assigned_after_s']) for t in trials)} | "
            f"{'exactly once' if ok else 'WRONG'} |"
        )
    return lines


def _targets_md(doc: dict[str, Any]) -> list[str]:
    lines = ["", "## Targets", "", "| target | value | met |", "| --- | ---: | --- |"]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {t['target']} | {shown} | {met} |")
    if doc["mode"] == "quick":
        lines += [
            "",
            "Quick run: a smoke test of the harness and of correctness; its speed "
            "figures are not judged.",
        ]
    return lines


def _profiles(doc: dict[str, Any]) -> list[str]:
    if not doc["profiles"]:
        return []
    lines = ["", "## Where offsetkeeper's time goes (cProfile, JSON)", ""]
    for name, prof in doc["profiles"].items():
        if "error" in prof:
            lines += [f"{name}: profile failed ({prof['error']})", ""]
            continue
        lines += [
            f"{name}: {prof['records']:,} records, engine.run {prof['total_s']} s "
            f"under the profiler (top functions: {prof['text']})",
            "",
            "| part | cumulative s | share of engine.run |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| {p['part']} | {p['seconds']} | {p['share']:.0%} |" for p in prof["parts"]]
        lines.append("")
    return lines


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: python ops/bench/report.py DIR [DIR ...] (each holding bench.json)")
        return 2
    for directory in map(Path, argv):
        doc = json.loads((directory / "bench.json").read_text())
        for path in redraw(doc, directory):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
