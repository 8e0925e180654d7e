"""The keyed-state benchmark (issue #15): a stateful app against the same app without state.

Run it through `ops/bench/state [--quick]` (see "Keyed state" in ops/bench/README.md). Per key
count N (10k, 100k, 600k, 1M, 5M by default; --quick: 10k, 100k):

1. one topic of N records over N keys (each key once: the worst case for a state cache),
   6 partitions, produced once and consumed by both contenders;
2. per sink (SQLite, PostgreSQL), each contender consumes it from the start with a fresh group
   into a fresh sink (a new SQLite file, a new PostgreSQL database): `ok_driver.py` (the engine
   built as `offsetkeeper run` builds it) with `state_app.stateless_app` (one upsert per
   record: key, count 1, sum = amount) and `state_app.stateful_app` (count and sum per key in
   keyed state, the running totals upserted). Rate = records / (last commit - first record),
   as in the main bench; peak RSS = the driver's VmHWM at exit;
3. "flat cost" (N up to --flat-max-keys): 100,000 more records over 1,000 of the N keys are
   appended to the topic, and both contenders consume them on top of the sink their first
   pass left (same group, same sink: N state entries). A batch's cost should follow the keys
   it changes, not the state's size: the rate should not fall as N grows;
4. every run is checked: each key's row (count, sum) exact and no other row, the stateful
   contender's state entries exact (one per key, in the key's partition), checkpoints at each
   partition's end, and the committed offset ranges tiling the records consumed exactly once;
5. results/state.md (tables, targets) and state.json (every run, its checks, the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import machine
import produce
import psycopg
import services as services_mod
import state_app
import verify
import workload
from harness import Children
from psycopg import sql

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
FULL_KEYS = (10_000, 100_000, 600_000, 1_000_000, 5_000_000)
QUICK_KEYS = (10_000, 100_000)
DEFAULT_CACHE_MB = 256
STATE_TABLE = "offsetkeeper_state"
ENGINE_DIRS = ("consumer", "sinks", "schemas")
# Targets of issue #15.
TARGET_RATIO = 0.6
TARGET_RATIO_KEYS = 600_000
TARGET_RSS_OVER_CACHE_MIB = 200.0
CONTENDERS = ("stateless", "stateful")
APPS = {"stateless": "state_app:stateless_app", "stateful": "state_app:stateful_app"}
_EXAMPLES = 5


def log_line(message: str) -> None:
    stamp = datetime.now(tz=UTC).strftime("%H:%M:%S")
    print(f"[state-bench {stamp}] {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    quick: bool
    keys: tuple[int, ...]
    sinks: tuple[str, ...]
    out_dir: Path
    idle_s: float
    small_cache_from: int  # key counts from this one on run with small_cache_mb
    small_cache_mb: int
    flat_max_keys: int
    hot_keys: int
    hot_records: int
    repetitions: int  # first passes of key counts below repeat_below run this many times
    repeat_below: int
    keep_work: bool = False

    def repetitions_for(self, n: int) -> int:
        return self.repetitions if n < self.repeat_below else 1

    def cache_mb(self, n: int) -> int:
        return self.small_cache_mb if n >= self.small_cache_from else DEFAULT_CACHE_MB


@dataclass
class Ctx:
    settings: Settings
    bootstrap: str
    dsn: str
    work: Path
    engine_env: dict[str, str] = field(default_factory=dict)
    children: Children = field(default_factory=Children)


# -- sinks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkRef:
    """One contender's fresh sink for one key count: a SQLite file or a PostgreSQL database."""

    kind: str  # sqlite | postgresql
    url: str
    path: Path | None = None  # sqlite
    database: str | None = None  # postgresql


def pg_url(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def new_sink(ctx: Ctx, kind: str, name: str) -> SinkRef:
    if kind == "sqlite":
        path = ctx.work / "sinks" / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return SinkRef(kind, f"sqlite:///{path}", path=path)
    database = name.replace("-", "_")
    with psycopg.connect(ctx.dsn, autocommit=True) as db:
        db.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
        db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return SinkRef(kind, pg_url(ctx.dsn, database), database=database)


def drop_sink(ctx: Ctx, sink: SinkRef) -> None:
    if sink.path is not None:
        for leftover in sink.path.parent.glob(f"{sink.path.name}*"):
            leftover.unlink()
    if sink.database is not None:
        with psycopg.connect(ctx.dsn, autocommit=True) as db:
            db.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(sink.database)
                )
            )


def _rows(sink: SinkRef, query: str, params: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """Stream a query's rows from the sink (a server-side cursor on PostgreSQL)."""
    if sink.path is not None:
        db = sqlite3.connect(f"file:{sink.path}?mode=ro", uri=True)
        try:
            yield from db.execute(query, params)
        finally:
            db.close()
        return
    with psycopg.connect(sink.url) as pg, pg.cursor(name="okstate-check") as cursor:
        cursor.itersize = 20_000
        cursor.execute(query.replace("?", "%s"), params)
        yield from cursor


# -- checks --------------------------------------------------------------------------------------


def check_rows(
    sink: SinkRef, n: int, expected: Callable[[str], tuple[int, int] | None]
) -> dict[str, Any]:
    """Every key's row is exactly (count, sum) expected, and there is no other row (the table's
    primary key rules out duplicates; n rows of n distinct expected keys are all of them)."""
    rows = wrong = unexpected = 0
    examples: list[str] = []
    query = f'SELECT key, "count", "sum" FROM {state_app.TABLE}'
    for key, count, total in _rows(sink, query, ()):
        rows += 1
        want = expected(str(key))
        if want is None:
            unexpected += 1
        elif (int(count), int(total)) != want:
            wrong += 1
        else:
            continue
        if len(examples) < _EXAMPLES:
            examples.append(f"{key}: ({count}, {total}) expected {want}")
    missing = n - (rows - unexpected)
    return {
        "ok": rows == n and not (wrong or unexpected or missing),
        "rows": rows,
        "expected_rows": n,
        "wrong": wrong,
        "unexpected": unexpected,
        "missing": missing,
        "examples": examples,
    }


def check_state(
    sink: SinkRef,
    group: str,
    topic: str,
    n: int,
    expected: Callable[[str], tuple[int, int] | None],
) -> dict[str, Any]:
    """The stateful contender's entries: one per key, in the key's partition, each equal to
    the key's (count, sum), at version 1; nothing else under its group and topic."""
    entries = wrong = unexpected = misplaced = 0
    keys_seen: set[str] = set()
    examples: list[str] = []
    query = (
        f"SELECT key, value, version, partition FROM {STATE_TABLE} WHERE group_id = ? AND topic = ?"
    )
    for raw_key, raw_value, version, partition in _rows(sink, query, (group, topic)):
        entries += 1
        key = bytes(raw_key).decode()
        keys_seen.add(key)
        want = expected(key)
        problem = None
        if want is None:
            unexpected += 1
            problem = "unexpected"
        elif int(partition) != workload.partition_of(key):
            misplaced += 1
            problem = f"in partition {partition}"
        elif int(version) != 1 or state_app.entry_value(bytes(raw_value)) != want:
            wrong += 1
            problem = f"{bytes(raw_value)!r} v{version}, expected {want}"
        if problem is not None and len(examples) < _EXAMPLES:
            examples.append(f"{key}: {problem}")
    missing = n - len(keys_seen) + unexpected
    duplicated = entries - len(keys_seen)
    return {
        "ok": not (wrong or unexpected or misplaced or missing or duplicated),
        "entries": entries,
        "expected_entries": n,
        "wrong": wrong,
        "unexpected": unexpected,
        "misplaced": misplaced,
        "missing": missing,
        "duplicated": duplicated,
        "examples": examples,
    }


def check_ranges(
    reported: Mapping[str, Sequence[Sequence[int]]],
    starts: Mapping[int, int],
    ends: Mapping[int, int],
) -> dict[str, Any]:
    """The committed offset ranges tile [start, end) of every partition: no gap, no overlap."""
    problems: list[str] = []
    for partition, end in ends.items():
        position = starts.get(partition, 0)
        for first, after in sorted(tuple(r) for r in reported.get(str(partition), [])):
            if first != position:
                kind = "overlap" if first < position else "gap"
                problems.append(f"p{partition}: {kind} at {position} (next range starts {first})")
            position = max(position, after)
        if position != end:
            problems.append(f"p{partition}: committed up to {position}, end is {end}")
    return {"ok": not problems, "problems": problems[:_EXAMPLES]}


def stored_checkpoints(sink: SinkRef, group: str, topic: str) -> dict[int, int]:
    if sink.path is not None:
        return verify.sqlite_checkpoints(sink.path, group, topic)
    return verify.pg_checkpoints(sink.url, group, topic)


# -- runs ----------------------------------------------------------------------------------------


def run_driver(ctx: Ctx, argv: list[str], log_path: Path, timeout_s: float) -> tuple[int, float]:
    """One consumer process, killed by PID at the timeout; (exit code, wall seconds)."""
    started = time.monotonic()
    process = ctx.children.start(argv, log_path, ctx.engine_env)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log_line(f"  timeout after {timeout_s:.0f}s: killing pid {process.pid}")
    ctx.children.kill(process)
    return int(process.returncode), time.monotonic() - started


def consume(
    ctx: Ctx,
    *,
    contender: str,
    sink: SinkRef,
    n: int,
    phase: str,
    round_no: int,
    topic: str,
    group: str,
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    load: state_app.Workload,
) -> dict[str, Any]:
    s = ctx.settings
    run_dir = ctx.work / "runs" / f"{n}-{sink.kind}-{contender}-{phase}-{round_no}"
    run_dir.mkdir(parents=True)
    records = sum(ends.values()) - sum(starts.values())
    cache_mb = s.cache_mb(n)
    argv = [PY, "ok_driver.py", "--encoding", "json", "--app", APPS[contender]]
    argv += ["--sink", sink.kind, "--sink-url", sink.url, "--bootstrap", ctx.bootstrap]
    argv += ["--group", group, "--topic", topic, "--result", str(run_dir / "result.json")]
    argv += ["--stop-when-idle", str(s.idle_s), "--state-cache-mb", str(cache_mb)]
    load_before = machine.load_average()
    code, wall = run_driver(ctx, argv, run_dir / "log.txt", timeout_s=180 + records / 1000)
    try:
        result: dict[str, Any] = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        result = {}
    rss_kib = result.get("peak_rss_kib")
    joined, assigned = result.get("first_joined_at"), result.get("first_assigned_at")
    busy, batches = result.get("busy_s"), result.get("batches") or 0
    run: dict[str, Any] = {
        "keys": n,
        "sink": sink.kind,
        "contender": contender,
        "phase": phase,
        "round": round_no,
        "exit_code": code,
        "records": result.get("records"),
        "records_target": records,
        "batches": batches,
        "busy_s": None if busy is None else round(busy, 3),
        "records_per_s": None
        if not result.get("records_per_s")
        else round(result["records_per_s"]),
        "ms_per_batch": round(1000 * busy / batches, 2) if busy and batches else None,
        "peak_rss_mib": None if rss_kib is None else round(rss_kib / 1024, 1),
        "cache_mib": cache_mb if contender == "stateful" else None,
        # From the start of the assignment to its end: acquire, checkpoints, and (stateful)
        # the state sizes query and, when the partition's entries fit half the cache, loading
        # them all. Not part of records/s (it comes before the first records).
        "assignment_s": round(assigned - joined, 3) if joined and assigned else None,
        "wall_s": round(wall, 2),
        "load_average_before": load_before,
    }
    if code != 0:
        run["error"] = f"exit code {code}; see {run_dir / 'log.txt'}"
        tail = (run_dir / "log.txt").read_text()[-3000:]
        log_line(f"  FAILED {contender} {sink.kind} {n} {phase}: exit {code}\n{tail}")
    t0 = time.monotonic()
    second = phase == "flat"
    checks: dict[str, Any] = {
        "records_committed": {
            "ok": result.get("records") == records,
            "committed": result.get("records"),
            "expected": records,
        },
        "ranges": check_ranges(result.get("ranges", {}), starts, ends),
        "checkpoints": verify.checkpoints(stored_checkpoints(sink, group, topic), ends),
        "rows": check_rows(sink, n, load.expected(stateful=contender == "stateful", second=second)),
    }
    if contender == "stateful":
        checks["state"] = check_state(
            sink, group, topic, n, load.expected(stateful=True, second=second)
        )
    run["checks"] = checks
    run["correct"] = code == 0 and all(c["ok"] for c in checks.values())
    run["check_s"] = round(time.monotonic() - t0, 1)
    failed = [name for name, c in checks.items() if not c["ok"]]
    log_line(
        f"  {n:>9,} {sink.kind:10} {contender:9} {phase:5} #{round_no}: "
        f"{run['records_per_s'] or 0:>7,} rec/s, {run['ms_per_batch'] or 0:7.1f} ms/batch, "
        f"RSS {run['peak_rss_mib'] or 0:6.1f} MiB, assignment {run['assignment_s'] or 0:.2f}s, "
        f"wall {wall:.1f}s; checks {'ok' if not failed else 'FAILED ' + ','.join(failed)} "
        f"({run['check_s']}s)"
    )
    if run["correct"] and not s.keep_work:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def produce_topic(ctx: Ctx, topic: str, items: Iterable[tuple[int, str, bytes]]) -> dict[int, int]:
    t0 = time.monotonic()
    sent = produce.produce_items(ctx.bootstrap, topic, items)
    ends = produce.end_offsets(ctx.bootstrap, topic)
    took = time.monotonic() - t0
    log_line(f"  produced {sent:,} records to {topic} in {took:.1f}s ({sent / took:,.0f}/s)")
    return ends


def keys_run(ctx: Ctx, n: int) -> list[dict[str, Any]]:
    """Both passes of one key count, on every sink, both contenders."""
    s = ctx.settings
    load = state_app.Workload(n, min(s.hot_keys, n), s.hot_records)
    topic = f"okstate-{n}"
    log_line(f"keys {n:,}: cache {s.cache_mb(n)} MiB")
    produce.create_topic(ctx.bootstrap, topic)
    ends = produce_topic(ctx, topic, load.first_pass())
    zero = dict.fromkeys(ends, 0)
    runs: list[dict[str, Any]] = []
    sinks: dict[tuple[str, str], SinkRef] = {}
    groups: dict[tuple[str, str], str] = {}
    try:
        for round_no in range(1, s.repetitions_for(n) + 1):
            for kind in s.sinks:
                for contender in CONTENDERS:
                    earlier = sinks.pop((kind, contender), None)
                    if earlier is not None:
                        drop_sink(ctx, earlier)
                    name = f"okstate-{n}-{contender}-{round_no}"
                    sink = sinks[kind, contender] = new_sink(ctx, kind, name)
                    group = groups[kind, contender] = f"okstate-{n}-{kind}-{contender}-{round_no}"
                    runs.append(
                        consume(
                            ctx,
                            contender=contender,
                            sink=sink,
                            n=n,
                            phase="first",
                            round_no=round_no,
                            topic=topic,
                            group=group,
                            starts=zero,
                            ends=ends,
                            load=load,
                        )
                    )
        if n <= s.flat_max_keys:
            log_line(f"keys {n:,}: flat cost, {load.hot_records:,} records over {load.hot_keys:,}")
            more = produce_topic(ctx, topic, load.second_pass())
            for kind in s.sinks:
                for contender in CONTENDERS:
                    runs.append(
                        consume(
                            ctx,
                            contender=contender,
                            sink=sinks[kind, contender],
                            n=n,
                            phase="flat",
                            round_no=1,
                            topic=topic,
                            group=groups[kind, contender],
                            starts=ends,
                            ends=more,
                            load=load,
                        )
                    )
    finally:
        for sink in sinks.values():
            drop_sink(ctx, sink)
        delete_topic(ctx.bootstrap, topic)
    return runs


def delete_topic(bootstrap: str, topic: str) -> None:
    """Free the broker's disk (the 5M topic is about 400 MB)."""
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415 (only here)

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=60)
    except Exception as exc:
        log_line(f"  could not delete topic {topic}: {exc}")


# -- report --------------------------------------------------------------------------------------


def _pick(
    runs: list[dict[str, Any]], n: int, kind: str, contender: str, phase: str
) -> dict[str, Any] | None:
    """One contender's runs of one cell, as one: median rate and ms/batch, highest RSS."""
    found = [
        run
        for run in runs
        if (run["keys"], run["sink"], run["contender"], run["phase"]) == (n, kind, contender, phase)
    ]
    if not found:
        return None

    def median(name: str) -> Any:
        values = [run[name] for run in found if run.get(name) is not None and run["exit_code"] == 0]
        return statistics.median(values) if values else None

    rss = [run["peak_rss_mib"] for run in found if run.get("peak_rss_mib") is not None]
    rate = median("records_per_s")
    return {
        "records_per_s": None if rate is None else round(rate),
        "records_per_s_runs": [run.get("records_per_s") for run in found],
        "ms_per_batch": median("ms_per_batch"),
        "assignment_s": median("assignment_s"),
        "peak_rss_mib": max(rss) if rss else None,
        "cache_mib": found[0].get("cache_mib"),
        "correct": all(run["correct"] for run in found),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(settings: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    table: list[dict[str, Any]] = []
    flat: list[dict[str, Any]] = []
    for phase, rows in (("first", table), ("flat", flat)):
        for n in settings.keys:
            for kind in settings.sinks:
                without = _pick(runs, n, kind, "stateless", phase)
                with_ = _pick(runs, n, kind, "stateful", phase)
                if without is None and with_ is None:
                    continue
                w = with_ or {}
                o = without or {}
                rows.append(
                    {
                        "keys": n,
                        "sink": kind,
                        "without_state_rps": o.get("records_per_s"),
                        "with_state_rps": w.get("records_per_s"),
                        "without_state_rps_runs": o.get("records_per_s_runs"),
                        "with_state_rps_runs": w.get("records_per_s_runs"),
                        "ratio": _ratio(w.get("records_per_s"), o.get("records_per_s")),
                        "without_state_ms_per_batch": o.get("ms_per_batch"),
                        "with_state_ms_per_batch": w.get("ms_per_batch"),
                        "peak_rss_with_state_mib": w.get("peak_rss_mib"),
                        "peak_rss_without_state_mib": o.get("peak_rss_mib"),
                        "cache_mib": w.get("cache_mib"),
                        "with_state_assignment_s": w.get("assignment_s"),
                        # What keeping state adds to a batch: the with-state time per batch
                        # minus the without-state one (the same rows are written by both).
                        "state_extra_ms_per_batch": _minus(
                            w.get("ms_per_batch"), o.get("ms_per_batch")
                        ),
                        "correct": bool(o.get("correct")) and bool(w.get("correct")),
                    }
                )
    targets: list[dict[str, Any]] = []
    for kind in settings.sinks:
        row = next((r for r in table if r["keys"] == TARGET_RATIO_KEYS and r["sink"] == kind), None)
        if row is not None:
            targets.append(
                {
                    "target": f"ratio >= {TARGET_RATIO}x at {TARGET_RATIO_KEYS:,} keys, {kind}",
                    "value": row["ratio"],
                    "met": row["ratio"] is not None and row["ratio"] >= TARGET_RATIO,
                    "runs_per_contender": len(row.get("with_state_rps_runs") or []),
                }
            )
    for row in table:
        if row["keys"] >= settings.small_cache_from and row["cache_mib"] is not None:
            limit = row["cache_mib"] + TARGET_RSS_OVER_CACHE_MIB
            rss = row["peak_rss_with_state_mib"]
            targets.append(
                {
                    "target": f"{row['keys']:,} keys, {row['sink']}: completes with peak RSS"
                    f" <= cache + {TARGET_RSS_OVER_CACHE_MIB:.0f} MiB ({limit:.0f} MiB)",
                    "value": rss,
                    "met": bool(row["correct"] and rss is not None and rss <= limit),
                }
            )
    flatness: dict[str, Any] = {}
    for kind in settings.sinks:
        rows = [r for r in flat if r["sink"] == kind and r["with_state_rps"]]
        if len(rows) >= 2:  # noqa: PLR2004
            first, last = rows[0], rows[-1]
            flatness[kind] = {
                "smallest_keys": first["keys"],
                "largest_keys": last["keys"],
                "with_state_rps_largest_over_smallest": _ratio(
                    last["with_state_rps"], first["with_state_rps"]
                ),
                "ratio_smallest": first["ratio"],
                "ratio_largest": last["ratio"],
                "state_extra_ms_per_batch": [r["state_extra_ms_per_batch"] for r in rows],
            }
    return {"table": table, "flat": flat, "targets": targets, "flatness": flatness}


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _engine_text(engine: dict[str, Any]) -> str:
    if not engine.get("commit"):
        return "the working tree, as it was at each run (not pinned)"
    last = engine.get("last_change")
    where = f"commit {engine['commit'][:10]}"
    return f"{where} (their last change: {last[:110]})" if last else where


def _cells(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _rate(median: float | None, runs: list[float | None] | None) -> str:
    if not runs or len(runs) < 2:  # noqa: PLR2004
        return _num(median)
    return f"**{_num(median)}** ({', '.join(_num(r) for r in runs)})"


def _rates(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        _rate(r["without_state_rps"], r.get("without_state_rps_runs")),
        _rate(r["with_state_rps"], r.get("with_state_rps_runs")),
        f"{_num(r['ratio'], 2)}x",
        _num(r["without_state_ms_per_batch"], 1),
        _num(r["with_state_ms_per_batch"], 1),
    )


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    m = doc["machine"]
    out = [
        f"# offsetkeeper keyed-state benchmark ({doc['mode']} run)",
        "",
        f"Run {doc['began_at']}, took {doc['duration_s']:.0f} s. Checks (every key's count and"
        " sum, state entries, checkpoints, offset ranges):"
        f" **{'all passed' if doc['correct'] else 'FAILED'}**.",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB;"
        f" Python {m.get('python')}, offsetkeeper {m.get('offsetkeeper')}"
        f", {m.get('kafka_broker')}, {m.get('postgresql')}.",
        f"Engine measured: `consumer/`, `sinks/` at {_engine_text(doc.get('engine') or {})}.",
        f"Load: `uptime` before: `{doc['uptime'][0]}`; after: `{doc['uptime'][1]}`. Other work"
        " (tests of other sessions) shared the 2 cores during the run: the load average before"
        " each run is in state.json; rates are noisy, the ratios (same rounds) less so.",
        "",
        'Workload: one topic per key count N, 6 partitions, N records (JSON `{"k", "a"}`,'
        " about 25 bytes) over N keys, each key once (the worst case for a cache), produced once"
        " and consumed by both contenders, each with a fresh group and a fresh sink (SQLite file,"
        " PostgreSQL database). Both write one upsert row (key, count, sum) per record; *with"
        " state* keeps {count, sum} per key in keyed state (`state_key` set), *without state*"
        " writes count 1, sum = amount. Engine: `ok_driver.py` (as `offsetkeeper run` builds"
        f" it), batches of up to 2000, stop when idle {s['idle_s']} s. Rate = records / (last"
        " commit - first record): start-up, assignment (and the state load in it) and idling are"
        " not counted. Peak RSS = the consumer's VmHWM. ms/batch = busy time / batches. Key"
        f" counts below {s['repeat_below']:,} (about a second of work) run {s['repetitions']}"
        " times, alternating the contenders: **median** (each run).",
        "",
        "## Throughput, with and without keyed state",
        "",
        "| keys | sink | without state rec/s | with state rec/s | ratio | ms/batch without"
        " | ms/batch with | peak RSS with state MiB | peak RSS without MiB | cache MiB"
        " | state load at assignment s | checked |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in doc["summary"]["table"]:
        out.append(
            _cells(
                f"{r['keys']:,}",
                r["sink"],
                *_rates(r),
                _num(r["peak_rss_with_state_mib"], 1),
                _num(r["peak_rss_without_state_mib"], 1),
                str(r["cache_mib"] or "-"),
                _num(r["with_state_assignment_s"], 2),
                "ok" if r["correct"] else "FAILED",
            )
        )
    out += ["", "## Targets (issue #15)", "", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in doc["summary"]["targets"]:
        value = t["value"]
        shown = (
            "-"
            if value is None
            else (f"{value:.2f}x" if "ratio" in t["target"] else f"{value:.1f} MiB")
        )
        runs = t.get("runs_per_contender")
        if runs == 1:
            shown += " (one run each: see Notes)"
        out.append(f"| {t['target']} | {shown} | {'**yes**' if t['met'] else '**NO**'} |")
    if not doc["summary"]["targets"]:
        out.append("| (no run of the targets' key counts) | - | - |")
    out += [
        "",
        "## Flat cost: a batch costs the keys it changes, not the state's size",
        "",
        f"On top of each first pass (the sink holding N entries), {s['hot_records']:,} more"
        f" records over {s['hot_keys']:,} of the N keys (spread evenly, each"
        f" {s['hot_records'] // s['hot_keys']} times) are appended to the topic and consumed by"
        " the same group into the same sink. With state, the rate should stay flat as N grows."
        " The state load at assignment (a size query per partition, and all of a partition's"
        " entries when they fit half the cache) is start-up, shown apart.",
        "",
        "| entries in the sink (N) | sink | without state rec/s | with state rec/s | ratio |"
        " ms/batch without | ms/batch with | state's extra ms/batch (with - without) |"
        " state load at assignment s | peak RSS with state MiB | checked |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in doc["summary"]["flat"]:
        out.append(
            _cells(
                f"{r['keys']:,}",
                r["sink"],
                *_rates(r),
                _num(r["state_extra_ms_per_batch"], 1),
                _num(r["with_state_assignment_s"], 2),
                _num(r["peak_rss_with_state_mib"], 1),
                "ok" if r["correct"] else "FAILED",
            )
        )
    for kind, f in doc["summary"]["flatness"].items():
        out.append("")
        extra = ", ".join(_num(x, 1) for x in f["state_extra_ms_per_batch"])
        out.append(
            f"{kind}: with-state rate at {f['largest_keys']:,} entries /"
            f" at {f['smallest_keys']:,} = {_num(f['with_state_rps_largest_over_smallest'], 2)}x;"
            f" with/without ratio {_num(f['ratio_smallest'], 2)}x"
            f" -> {_num(f['ratio_largest'], 2)}x;"
            f" state's extra ms per batch, N ascending: {extra}."
        )
    if doc.get("notes"):
        out += ["", "## Notes", ""] + [f"- {note}" for note in doc["notes"]]
    out.append("")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def pin_engine(rev: str, work: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine the consumers import: `consumer`, `sinks` and `schemas` as committed at
    `rev`, extracted with `git archive` and put first on PYTHONPATH (other work changes the
    working tree while a run lasts; every run of one bench must measure the same engine).
    `rev` "worktree": the working tree as it is, run by run."""
    if rev == "worktree":
        return {"source": "working tree (not pinned)", "commit": None}, {}
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subject = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ci %s", sha],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = work / "engine"
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", sha, *ENGINE_DIRS],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    env = {"PYTHONPATH": str(target)}
    found = subprocess.run(
        [PY, "-c", "import consumer, sinks; print(consumer.__file__); print(sinks.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=BENCH,
        env={**os.environ, **env},
    ).stdout.split()
    if not all(Path(f).is_relative_to(target) for f in found):
        raise RuntimeError(f"the pinned engine is not the one imported: {found}")
    last_change = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %ci %s", sha, "--", *ENGINE_DIRS],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    log_line(f"engine pinned at {sha[:10]}; its last change: {last_change[:100]}")
    return {
        "source": f"git archive {sha} {' '.join(ENGINE_DIRS)}",
        "commit": sha,
        "subject": subject,
        "last_change": last_change,
    }, env


def _uptime() -> str:
    done = subprocess.run(["uptime"], check=False, capture_output=True, text=True)
    return done.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k and 100k keys only")
    parser.add_argument(
        "--keys", help="comma-separated key counts (default 10k..5M; --quick 10k,100k)"
    )
    parser.add_argument("--sinks", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--out", type=Path, help="directory for state.md and state.json")
    parser.add_argument("--small-cache-from", type=int, default=5_000_000)
    parser.add_argument("--small-cache-mb", type=int, default=64)
    parser.add_argument("--flat-max-keys", type=int, default=1_000_000)
    parser.add_argument("--hot-keys", type=int, default=state_app.HOT_KEYS)
    parser.add_argument("--hot-records", type=int, default=state_app.HOT_RECORDS)
    parser.add_argument("--idle-s", type=float)
    parser.add_argument(
        "--repetitions",
        type=int,
        help="first passes of key counts below --repeat-below: runs each (median; default 3,"
        " --quick 1): they last about a second, so one run is noise",
    )
    parser.add_argument("--repeat-below", type=int, default=600_000)
    parser.add_argument("--keep-work", action="store_true", help="keep every run's log")
    parser.add_argument(
        "--engine",
        default="HEAD",
        help="the commit whose consumer/ and sinks/ are measured (default HEAD, extracted once"
        " at the start); 'worktree': the working tree as it is at each run",
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the results")
    parser.add_argument(
        "--render", type=Path, help="only rewrite state.md (and the summary) from this state.json"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    keys: tuple[int, ...] = QUICK_KEYS if args.quick else FULL_KEYS
    if args.keys:
        keys = tuple(int(k.replace("_", "")) for k in args.keys.split(","))
    sinks = tuple(args.sinks.split(","))
    unknown = set(sinks) - {"sqlite", "postgresql"}
    if unknown:
        raise SystemExit(f"unknown sinks: {sorted(unknown)}")
    default_out = BENCH / "results" / ("quick" if args.quick else "")
    return Settings(
        quick=args.quick,
        keys=keys,
        sinks=sinks,
        out_dir=args.out or default_out,
        idle_s=args.idle_s if args.idle_s is not None else (1.0 if args.quick else 2.0),
        small_cache_from=args.small_cache_from,
        small_cache_mb=args.small_cache_mb,
        flat_max_keys=args.flat_max_keys,
        hot_keys=args.hot_keys,
        hot_records=args.hot_records,
        repetitions=args.repetitions if args.repetitions is not None else (1 if args.quick else 3),
        repeat_below=args.repeat_below,
        keep_work=args.keep_work,
    )


def render(path: Path) -> int:
    """Summarize a state.json's runs again and rewrite it and the state.md beside it."""
    doc = json.loads(path.read_text())
    fields = dict(doc["settings"])
    fields["keys"] = tuple(fields["keys"])
    fields["sinks"] = tuple(fields["sinks"])
    fields["out_dir"] = Path(fields["out_dir"])
    doc["summary"] = summarize(Settings(**fields), doc["runs"])
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (path.parent / "state.md").write_text(markdown(doc))
    log_line(f"rewrote {path} and state.md from its runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    s = settings_from(args)
    started = time.monotonic()
    began_at = datetime.now(tz=UTC)
    uptime_before = _uptime()
    log_line(
        f"{'quick' if s.quick else 'full'} run: keys {s.keys}, sinks {s.sinks}; {uptime_before}"
    )
    svc = services_mod.start(log_line)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx: Ctx | None = None
    runs: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="okstate-work-"))
    try:
        engine, engine_env = pin_engine(args.engine, work)
        ctx = Ctx(
            settings=s, bootstrap=svc.bootstrap, dsn=svc.dsn, work=work, engine_env=engine_env
        )
        for n in s.keys:
            runs.extend(keys_run(ctx, n))
        described = machine.describe(svc.dsn, None)
    finally:
        if ctx is not None:
            ctx.children.kill_all()
        log_line("stopping Kafka and PostgreSQL")
        svc.stop()
    settings_doc = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    doc: dict[str, Any] = {
        "mode": "quick" if s.quick else "full",
        "began_at": began_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "uptime": [uptime_before, _uptime()],
        "settings": settings_doc,
        "targets": {
            "ratio_at_600k": TARGET_RATIO,
            "rss_over_cache_mib": TARGET_RSS_OVER_CACHE_MIB,
        },
        "machine": described,
        "engine": engine,
        "correct": bool(runs) and all(run["correct"] for run in runs),
        "summary": summarize(s, runs),
        "runs": runs,
        "notes": list(args.note),
    }
    s.out_dir.mkdir(parents=True, exist_ok=True)
    (s.out_dir / "state.json").write_text(json.dumps(doc, indent=2) + "\n")
    (s.out_dir / "state.md").write_text(markdown(doc))
    log_line(f"wrote {s.out_dir / 'state.md'} and state.json in {time.monotonic() - started:.0f}s")
    print(markdown(doc))
    if not doc["correct"]:
        log_line(f"CORRECTNESS CHECKS FAILED (see 'checks' in state.json; logs kept in {work})")
        return 1
    if s.keep_work:
        log_line(f"logs of every run kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
