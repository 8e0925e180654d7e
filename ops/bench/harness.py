"""The benchmark: one command, its own broker and database, every contender on the same data.

Run it through `ops/bench/run [--quick]` (see ops/bench/README.md). Phases:

1. start Kafka and PostgreSQL on free ports (stopped by PID at the end, whatever happens);
2. produce the workload once per encoding (JSON, Avro) into 6-partition topics;
3. throughput: each contender consumes each topic from the start, in rounds (round 1 runs
   every contender once, then round 2, ...) so that drifting background load spreads evenly;
   each run is one process, whose peak RSS comes from wait4(); the first run of every contender
   (every run in --quick) is then checked row by row;
4. latency: each contender follows a fresh topic fed at a fixed moderate rate;
5. recovery: an offsetkeeper consumer is killed with SIGKILL while a stream flows, a replacement
   is started at once, and the time to its first committed batch is taken;
6. (--profile) cProfile of offsetkeeper into PostgreSQL and into the null sink;
7. the Markdown table and the JSON file, with the machine description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine
import ok_app
import produce
import profile_report
import psycopg
import report
import services as services_mod
import verify
import workload
from timing import peak_rss_kib

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
PEER_PY = str(BENCH / ".venv-peer" / "bin" / "python")
OK_CLI = str(REPO / ".venv" / "bin" / "offsetkeeper")
PG_KINDS = ("postgresql", "split", "kafka-offsets")
# --quick follows the stream with these only (each latency run costs a group join and a stream)
QUICK_LATENCY = frozenset({"limit", "ok-postgresql", "handwritten", "peer-quixstreams"})
# The commit intervals (--commit-interval) the cadence phase follows the stream with.
CADENCE_INTERVALS_S = (0.0, 0.1, 0.5, 1.0)


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    kind: str  # limit | ok | ok-cli | handwritten | peer
    sink: str | None = None  # ok: sqlite | postgresql | null | split | kafka-offsets
    backend: str = "confluent"
    # The first run only consumes this many records (None: all); for a contender too slow to
    # consume the whole workload in the time budget. Its rate is then over that prefix.
    max_records: int | None = None
    # Secondary contenders run once per encoding; primary ones (the targets' terms) run
    # Settings.repetitions times.
    primary: bool = False
    # The encodings it runs (None: every one) and extra arguments of its command.
    encodings: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()

    @property
    def uses_pg(self) -> bool:
        return self.kind in ("handwritten", "peer") or self.sink in PG_KINDS

    @property
    def offsetkeeper(self) -> bool:
        return self.kind in ("ok", "ok-cli")


@dataclass
class Settings:
    quick: bool
    records: int
    repetitions: int
    handwritten_records: int | None
    latency_rate: int
    latency_seconds: int
    recovery_trials: int
    recovery_session_timeout_ms: int
    idle_s: float
    out_dir: Path
    profile: bool
    only: tuple[str, ...] = ()
    encodings: tuple[str, ...] = ("json", "avro")


class Children:
    """Every contender process this harness starts, so that none outlives it (killed by PID)."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen[bytes]] = set()

    def start(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("w") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=BENCH,
                env={**os.environ, **(env or {})},
            )
        self._live.add(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self._live.discard(process)

    def kill_all(self) -> None:
        for process in list(self._live):
            self.kill(process)


@dataclass
class Context:
    settings: Settings
    bootstrap: str
    dsn: str
    work: Path
    log: Callable[[str], None]
    children: Children = field(default_factory=Children)
    ends: dict[str, dict[int, int]] = field(default_factory=dict)
    expected: dict[str, workload.Expected] = field(default_factory=dict)


def log_line(message: str) -> None:
    stamp = datetime.now(tz=UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------------


def run_process(
    ctx: Context,
    argv: list[str],
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> tuple[int, float | None, float]:
    """Run one contender process; returns (exit code, peak RSS in MiB, wall seconds). The peak
    RSS is the process's VmHWM, sampled from /proc every 50 ms (the contenders also report
    their own at exit, which is preferred; see timing.py)."""
    started = time.monotonic()
    process = ctx.children.start(argv, log_path, env)
    deadline = started + timeout_s
    peak: int | None = None
    while process.poll() is None:
        sample = peak_rss_kib(process.pid)
        if sample is not None:
            peak = max(peak or 0, sample)
        if time.monotonic() > deadline:
            log_line(f"  timeout after {timeout_s:.0f}s: killing pid {process.pid}")
            break
        time.sleep(0.05)
    ctx.children.kill(process)
    code = process.returncode
    return code, None if peak is None else peak / 1024.0, time.monotonic() - started


def reset_pg(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as db:
        for table in (
            workload.TABLE,
            "offsetkeeper_checkpoints",
            "offsetkeeper_leases",
            "offsetkeeper_replay_jobs",
        ):
            db.execute(f"DROP TABLE IF EXISTS {table}")  # type: ignore[arg-type]


def command(
    ctx: Context,
    contender: Contender,
    *,
    encoding: str,
    topic: str,
    group: str,
    result: Path,
    records: int,
    sqlite_path: Path | None,
    latency: bool = False,
    extra: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The contender's command line. With `latency`, it also stops by itself after `records`
    (offsetkeeper: once that many are committed); otherwise offsetkeeper stops when idle."""
    common = ["--encoding", encoding, "--bootstrap", ctx.bootstrap, "--group", group]
    common += ["--topic", topic, "--result", str(result)]
    common += ["--latency"] if latency else []
    counted = ["--records", str(records)]
    url = f"sqlite:///{sqlite_path}" if contender.sink == "sqlite" else ctx.dsn
    idle = ["--stop-when-idle", str(ctx.settings.idle_s)]
    if contender.kind == "limit":
        return [PY, "limit.py", *common, *counted, *contender.args], {}
    if contender.kind == "handwritten":
        return [PY, "handwritten.py", *common, "--dsn", ctx.dsn, *counted], {}
    if contender.kind == "peer":
        state = ["--state-dir", str(result.parent / "quix-state")]
        return [PEER_PY, "peer_quix.py", *common, "--dsn", ctx.dsn, *counted, *state], {}
    if contender.kind == "ok-cli":
        argv = [OK_CLI, "run", "--app", f"ok_app:{encoding}_app", "--bootstrap-servers"]
        argv += [ctx.bootstrap, "--group", group, "--topic", topic, "--sink", url, *idle]
        argv += ["--log-format", "json", "--backend", contender.backend, *contender.args]
        if encoding == "avro":
            argv += ["--schema-dir", str(ok_app.write_schema_dir(result.parent / "schemas"))]
        return argv, {"PYTHONPATH": str(BENCH)}
    argv = [PY, "ok_driver.py", *common, "--sink", str(contender.sink), *extra]
    argv += ["--stop-after-records", str(records)] if latency else idle
    if contender.sink != "null":
        argv += ["--sink-url", url]
    return argv, {}


def cli_result(log_path: Path) -> dict[str, Any]:
    """`offsetkeeper run` reports its own rate in the `consumer_stopped` JSON log event; with
    `--workers N`, each worker does: their records over the longest busy window."""
    stopped = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "consumer_stopped":
                stopped.append(event)
    if not stopped:
        return {"records": 0, "busy_s": None, "records_per_s": None}
    records = sum(event["records"] for event in stopped)
    busy = max(event["busy_s"] or 0 for event in stopped)
    return {
        "records": records,
        "busy_s": busy,
        "records_per_s": round(records / busy, 1) if busy else None,
        "batches": sum(event["batches"] for event in stopped),
        "workers": len(stopped),
    }


# -- phase: throughput -------------------------------------------------------------------------


def throughput_run(
    ctx: Context, contender: Contender, encoding: str, round_no: int, check: bool
) -> dict[str, Any]:
    s = ctx.settings
    topic = f"bench-{encoding}"
    group = f"okbench-{contender.name}-{encoding}-{round_no}"
    run_dir = ctx.work / "runs" / f"{contender.name}-{encoding}-{round_no}"
    run_dir.mkdir(parents=True)
    sqlite_path = run_dir / "sink.db" if contender.sink == "sqlite" else None
    records = s.records if contender.max_records is None else min(s.records, contender.max_records)
    if contender.uses_pg:
        reset_pg(ctx.dsn)
    argv, env = command(
        ctx,
        contender,
        encoding=encoding,
        topic=topic,
        group=group,
        result=run_dir / "result.json",
        records=records,
        sqlite_path=sqlite_path,
    )
    code, sampled_rss, wall = run_process(
        ctx, argv, run_dir / "log.txt", timeout_s=max(300.0, records / 500), env=env
    )
    if contender.kind == "ok-cli":
        result = cli_result(run_dir / "log.txt")
    else:
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError):
            result = {"records": 0, "records_per_s": None}
    own = result.get("peak_rss_kib")
    rss = own / 1024.0 if own else sampled_rss
    run = {
        "round": round_no,
        "exit_code": code,
        "records": result.get("records"),
        "busy_s": result.get("busy_s"),
        "records_per_s": result.get("records_per_s"),
        "peak_rss_mib": None if rss is None else round(rss, 1),
        "wall_s": round(wall, 2),
        "records_target": records,
    }
    if code != 0:
        run["error"] = f"exit code {code}; see {run_dir / 'log.txt'}"
        tail = (run_dir / "log.txt").read_text()[-3000:]
        log_line(f"  FAILED {contender.name} {encoding}: exit {code}\n{tail}")
    if check:
        run["checks"] = checks(
            ctx,
            contender,
            encoding=encoding,
            group=group,
            topic=topic,
            result=result,
            sqlite_path=sqlite_path,
            records=records,
        )
    if sqlite_path is not None:
        shutil.rmtree(run_dir / "sink.db", ignore_errors=True)
        for leftover in run_dir.glob("sink.db*"):
            leftover.unlink()
    return run


def checks(
    ctx: Context,
    contender: Contender,
    *,
    encoding: str,
    group: str,
    topic: str,
    result: dict[str, Any],
    sqlite_path: Path | None,
    records: int,
) -> dict[str, Any]:
    """Row-by-row checks of one run; a contender that consumed a prefix is checked on count."""
    out: dict[str, Any] = {}
    ends = ctx.ends[topic]
    complete = records >= ctx.settings.records
    if contender.offsetkeeper:
        # Exactly once: the engine committed every record once, no more, no fewer.
        out["records_committed"] = {
            "ok": result.get("records") == sum(ends.values()),
            "committed": result.get("records"),
            "expected": sum(ends.values()),
        }
    else:
        out["records_seen"] = {
            "ok": (result.get("records") or 0) >= records,
            "seen": result.get("records"),
            "expected": records,
        }
    if contender.kind == "ok":
        out["ranges"] = verify.ranges(result.get("ranges", {}), ends)
    if not complete or contender.kind == "limit" or contender.sink == "null":
        return out
    expected = ctx.expected[encoding]
    if contender.sink == "sqlite" and sqlite_path is not None:
        out["rows"] = verify.sqlite_rows(sqlite_path, expected)
        out["checkpoints"] = verify.checkpoints(
            verify.sqlite_checkpoints(sqlite_path, group, topic), ends
        )
        return out
    out["rows"] = verify.pg_rows(ctx.dsn, expected)
    if contender.offsetkeeper and contender.sink != "kafka-offsets":
        out["checkpoints"] = verify.checkpoints(verify.pg_checkpoints(ctx.dsn, group, topic), ends)
    return out


def throughput(ctx: Context, contenders: list[Contender]) -> dict[str, Any]:
    s = ctx.settings
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {} for c in contenders}
    for round_no in range(1, s.repetitions + 1):
        for encoding in s.encodings:
            for contender in contenders:
                reps = s.repetitions if contender.primary else 1
                if round_no > reps or encoding not in (contender.encodings or (encoding,)):
                    continue
                check = s.quick or round_no == 1
                run = throughput_run(ctx, contender, encoding, round_no, check)
                runs[contender.name].setdefault(encoding, []).append(run)
                rate = run["records_per_s"]
                ok = all(c.get("ok") for c in run.get("checks", {}).values())
                log_line(
                    f"  round {round_no} {encoding:4} {contender.name:28} "
                    f"{(rate or 0):>10,.0f} rec/s  rss {run['peak_rss_mib'] or 0:6.1f} MiB"
                    + ("" if "checks" not in run else ("  checks ok" if ok else "  CHECKS FAILED"))
                )
    return runs


# -- phase: latency ------------------------------------------------------------------------------


def latency(ctx: Context, contenders: list[Contender]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for contender in contenders:
        results[contender.name] = _latency_run(ctx, contender, contender.name)
        log_line(f"  latency {contender.name:28} " + report.latency_text(results[contender.name]))
    return results


def cadence(ctx: Context, contenders: list[Contender]) -> dict[str, Any]:
    """offsetkeeper -> PostgreSQL following the same stream with each commit interval: how
    latency and the number of commits trade against each other."""
    pg = next((c for c in contenders if c.name == "ok-postgresql"), None)
    results: dict[str, Any] = {}
    if pg is None:
        return results
    for interval in CADENCE_INTERVALS_S:
        name = f"interval-{interval:g}s"
        extra = ("--commit-interval", str(interval))
        results[name] = {"commit_interval_s": interval, **_latency_run(ctx, pg, name, extra)}
        log_line(f"  cadence {name:28} " + report.cadence_text(results[name]))
    return results


def _latency_run(
    ctx: Context, contender: Contender, name: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One contender following a fresh topic fed at the latency rate."""
    s = ctx.settings
    total = s.latency_rate * s.latency_seconds
    topic = f"lat-{name}"
    group = f"okbench-lat-{name}"
    run_dir = ctx.work / "latency" / name
    run_dir.mkdir(parents=True)
    produce.create_topic(ctx.bootstrap, topic)
    if contender.uses_pg:
        reset_pg(ctx.dsn)
    sqlite_path = run_dir / "sink.db" if contender.sink == "sqlite" else None
    argv, env = command(
        ctx,
        contender,
        encoding="json",
        topic=topic,
        group=group,
        result=run_dir / "result.json",
        records=total,
        sqlite_path=sqlite_path,
        latency=True,
        extra=extra,
    )
    process = ctx.children.start(argv, run_dir / "log.txt", env)
    try:
        produce.wait_group_ready(ctx.bootstrap, group, timeout_s=90)
        time.sleep(1.0)
        producer = produce.RateProducer(ctx.bootstrap, topic, "json", s.latency_rate, total)
        producer.start()
        producer.join()
        code = process.wait(timeout=120)
    except (TimeoutError, subprocess.TimeoutExpired) as exc:
        ctx.children.kill(process)
        log_line(f"  latency {name}: {exc}")
        return {"error": str(exc)}
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        result = {}
    samples = sorted(result.get("latencies_ms") or [])
    batches = result.get("batches") or 0
    return {
        "exit_code": code,
        "rate_per_s": s.latency_rate,
        "records_sent": total,
        "records_measured": len(samples),
        "batches": batches,
        "records_per_batch": round(result.get("records", 0) / batches, 1) if batches else None,
        **report.percentiles(samples),
    }


# -- phase: recovery -----------------------------------------------------------------------------


def _wait_file(path: Path, timeout_s: float, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        if process.poll() is not None:
            raise RuntimeError(f"consumer exited ({process.returncode}) before its first commit")
        time.sleep(0.02)
    raise TimeoutError(f"no first commit within {timeout_s}s")


def recovery_trial(ctx: Context, mode: str, trial: int) -> dict[str, Any]:
    s = ctx.settings
    name = f"rec-{mode}-{trial}"
    run_dir = ctx.work / "recovery" / name
    run_dir.mkdir(parents=True)
    topic, group = name, f"okbench-{name}"
    produce.create_topic(ctx.bootstrap, topic)
    reset_pg(ctx.dsn)
    kafka = [f"session.timeout.ms={s.recovery_session_timeout_ms}"]
    if mode == "static":
        kafka.append("group.instance.id=okbench-recovery-member")
    extra = tuple(arg for item in kafka for arg in ("-X", item))
    contender = Contender("ok-postgresql", "", "ok", "postgresql")

    def start(tag: str) -> subprocess.Popen[bytes]:
        argv, _env = command(
            ctx,
            contender,
            encoding="json",
            topic=topic,
            group=group,
            result=run_dir / f"{tag}.json",
            records=0,
            sqlite_path=None,
            extra=(*extra, "--first-commit-file", str(run_dir / f"{tag}.first")),
        )
        return ctx.children.start(argv, run_dir / f"{tag}.log")

    producer = produce.RateProducer(
        ctx.bootstrap, topic, "json", s.latency_rate, s.latency_rate * 600
    )
    producer.start()
    first = start("a")
    replacement: subprocess.Popen[bytes] | None = None
    try:
        _wait_file(run_dir / "a.first", 90, first)
        time.sleep(2.0)  # steady state: several batches committed
        killed_at = time.time()
        ctx.children.kill(first)  # SIGKILL, by PID
        replacement = start("b")
        committed = _wait_file(run_dir / "b.first", 120, replacement)
        recovery_s = committed["first_commit_at"] - killed_at
        time.sleep(1.0)
        producer.stop()
        producer.join()
        code = replacement.wait(timeout=180)
    finally:
        producer.stop()
        for process in (first, replacement):
            if process is not None:
                ctx.children.kill(process)
    b = json.loads((run_dir / "b.json").read_text())
    ends = produce.end_offsets(ctx.bootstrap, topic)
    expected = workload.expected(producer.sent, "json")
    out = {
        "mode": mode,
        "recovery_s": round(recovery_s, 3),
        "replacement_assigned_after_s": (
            round(b["first_assigned_at"] - killed_at, 3) if b.get("first_assigned_at") else None
        ),
        "replacement_exit_code": code,
        "records_sent": producer.sent,
        "checks": {
            "rows": verify.pg_rows(ctx.dsn, expected),
            "checkpoints": verify.checkpoints(verify.pg_checkpoints(ctx.dsn, group, topic), ends),
        },
    }
    log_line(
        f"  recovery {mode} #{trial}: {out['recovery_s']:.2f}s to the replacement's first "
        f"commit; rows {'ok' if out['checks']['rows']['ok'] else 'WRONG'}"
    )
    return out


def recovery(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    modes = ("static",) if s.quick else ("dynamic", "static")
    trials = [
        recovery_trial(ctx, mode, t) for mode in modes for t in range(1, s.recovery_trials + 1)
    ]
    return {
        "session_timeout_ms": s.recovery_session_timeout_ms,
        "stream_rate_per_s": s.latency_rate,
        "trials": trials,
    }


# -- phase: profile ------------------------------------------------------------------------------


def profile(ctx: Context) -> dict[str, Any]:
    """cProfile one JSON run into PostgreSQL and one into the null sink."""
    out: dict[str, Any] = {}
    for sink in ("postgresql", "null"):
        contender = Contender(f"ok-{sink}", "", "ok", sink)
        run_dir = ctx.work / "profile" / sink
        run_dir.mkdir(parents=True)
        if contender.uses_pg:
            reset_pg(ctx.dsn)
        stats = run_dir / "engine.pstats"
        argv, env = command(
            ctx,
            contender,
            encoding="json",
            topic="bench-json",
            group=f"okbench-profile-{sink}",
            result=run_dir / "result.json",
            records=ctx.settings.records,
            sqlite_path=None,
            extra=("--profile", str(stats)),
        )
        code, _rss, _wall = run_process(ctx, argv, run_dir / "log.txt", timeout_s=1800, env=env)
        if code != 0 or not stats.exists():
            out[contender.name] = {"error": f"exit code {code}"}
            continue
        ctx.settings.out_dir.mkdir(parents=True, exist_ok=True)
        out[contender.name] = profile_report.analyze(
            stats, ctx.settings.records, ctx.settings.out_dir / f"profile-{contender.name}.txt"
        )
        log_line(f"  profiled {contender.name}: engine.run {out[contender.name]['total_s']} s")
    return out


# -- main ----------------------------------------------------------------------------------------


def aiokafka_available() -> bool:
    done = subprocess.run([OK_CLI, "run", "--help"], check=False, capture_output=True, text=True)
    return "--backend" in done.stdout and "aiokafka" in done.stdout


def contenders_for(s: Settings, with_aiokafka: bool) -> list[Contender]:
    """Primary contenders (the terms of the targets) run every repetition; the rest once."""
    c = Contender
    found = [
        c("limit", "limit: bare confluent-kafka consumer, decode only", "limit", primary=True),
        c(
            "limit-msgspec",
            "bare consumer decoding JSON with msgspec (offsetkeeper's JSON decoder)",
            "limit",
            primary=True,
            encodings=("json",),
            args=("--json-decoder", "msgspec"),
        ),
        c(
            "ok-postgresql",
            "offsetkeeper -> PostgreSQL (exactly-once)",
            "ok",
            "postgresql",
            primary=True,
        ),
        c(
            "ok-split-postgresql",
            "offsetkeeper -> PostgreSQL, offsets in a 2nd transaction",
            "ok",
            "split",
            primary=True,
        ),
        c(
            "ok-kafka-offsets-postgresql",
            "offsetkeeper -> PostgreSQL, offsets only in Kafka",
            "ok",
            "kafka-offsets",
        ),
        c("ok-sqlite", "offsetkeeper -> SQLite (exactly-once)", "ok", "sqlite"),
        c("ok-null", "offsetkeeper -> null sink", "ok", "null"),
        c(
            "handwritten",
            "hand-written: INSERT per record, commit per batch",
            "handwritten",
            max_records=s.handwritten_records,
            primary=True,
        ),
        c(
            "peer-quixstreams",
            f"Quix Streams {peer_version()} -> PostgreSQLSink",
            "peer",
            primary=True,
        ),
    ]
    found.append(
        c(
            "ok-workers2-postgresql",
            "offsetkeeper --workers 2 (CLI) -> PostgreSQL",
            "ok-cli",
            "postgresql",
            encodings=("json",),
            args=("--workers", "2"),
        )
    )
    if with_aiokafka:
        found[7:7] = [
            c(
                "ok-aiokafka-postgresql",
                "offsetkeeper (aiokafka backend, CLI) -> PostgreSQL",
                "ok-cli",
                "postgresql",
                backend="aiokafka",
            ),
            c(
                "ok-aiokafka-sqlite",
                "offsetkeeper (aiokafka backend, CLI) -> SQLite",
                "ok-cli",
                "sqlite",
                backend="aiokafka",
            ),
        ]
    if s.only:
        found = [x for x in found if x.name in s.only]
    return found


def peer_version() -> str:
    done = subprocess.run(
        [PEER_PY, "-c", "import importlib.metadata as m; print(m.version('quixstreams'))"],
        check=False,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            quick=True,
            records=20_000,
            repetitions=1,
            handwritten_records=None,
            latency_rate=1000,
            latency_seconds=4,
            recovery_trials=1,
            recovery_session_timeout_ms=6000,
            idle_s=1.0,
            out_dir=args.out or BENCH / "results" / "quick",
            profile=args.profile,
        )
    else:
        s = Settings(
            quick=False,
            records=1_000_000,
            repetitions=3,
            handwritten_records=100_000,
            latency_rate=2000,
            latency_seconds=10,
            recovery_trials=2,
            recovery_session_timeout_ms=10_000,
            idle_s=2.0,
            out_dir=args.out or BENCH / "results",
            profile=args.profile,
        )
    for name in (
        "records",
        "repetitions",
        "handwritten_records",
        "latency_rate",
        "latency_seconds",
        "recovery_trials",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if args.only:
        s.only = tuple(args.only.split(","))
    if args.encodings:
        s.encodings = tuple(args.encodings.split(","))
    return s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20k records, one run each, every result checked row by row",
    )
    parser.add_argument("--out", type=Path, help="directory for bench.md and bench.json")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile offsetkeeper (cProfile) into PostgreSQL and null",
    )
    parser.add_argument("--records", type=int)
    parser.add_argument("--repetitions", type=int)
    parser.add_argument("--handwritten-records", type=int)
    parser.add_argument("--latency-rate", type=int)
    parser.add_argument("--latency-seconds", type=int)
    parser.add_argument("--recovery-trials", type=int)
    parser.add_argument("--only", help="comma-separated contender names")
    parser.add_argument("--encodings", help="json,avro (default both)")
    parser.add_argument("--keep-work", action="store_true", help="keep every run's log")
    parser.add_argument(
        "--skip", default="", help="comma-separated phases: latency,cadence,recovery"
    )
    return parser.parse_args(argv)


def produce_workload(ctx: Context) -> None:
    for encoding in ctx.settings.encodings:
        topic = f"bench-{encoding}"
        produce.create_topic(ctx.bootstrap, topic)
        t0 = time.monotonic()
        produce.produce_all(ctx.bootstrap, topic, ctx.settings.records, encoding)
        ctx.ends[topic] = produce.end_offsets(ctx.bootstrap, topic)
        ctx.expected[encoding] = workload.expected(ctx.settings.records, encoding)
        log_line(
            f"produced {sum(ctx.ends[topic].values()):,} {encoding} records to {topic} "
            f"in {time.monotonic() - t0:.1f}s (per partition {ctx.ends[topic]})"
        )


def phases(ctx: Context, skip: set[str]) -> dict[str, Any]:
    s = ctx.settings
    with_aiokafka = aiokafka_available()
    log_line(f"aiokafka backend in `offsetkeeper run --help`: {with_aiokafka}")
    contenders = contenders_for(s, with_aiokafka)
    produce_workload(ctx)
    log_line("phase: throughput")
    found: dict[str, Any] = {
        "contenders": contenders,
        "aiokafka": with_aiokafka,
        "runs": throughput(ctx, contenders),
        "latency": {},
        "cadence": {},
        "recovery": {},
        "profiles": {},
    }
    if "latency" not in skip:
        log_line(f"phase: latency ({s.latency_rate}/s for {s.latency_seconds}s, JSON)")
        wanted = (
            QUICK_LATENCY
            if s.quick
            else {c.name for c in contenders if c.kind != "ok-cli" and c.name != "limit-msgspec"}
        )
        found["latency"] = latency(ctx, [c for c in contenders if c.name in wanted])
    if "cadence" not in skip and not s.quick:
        log_line(f"phase: commit cadence ({s.latency_rate}/s, offsetkeeper -> PostgreSQL)")
        found["cadence"] = cadence(ctx, contenders)
    if "recovery" not in skip:
        log_line("phase: recovery after kill -9 (offsetkeeper -> PostgreSQL)")
        found["recovery"] = recovery(ctx)
    if s.profile:
        log_line("phase: profile")
        found["profiles"] = profile(ctx)
    found["machine"] = machine.describe(ctx.dsn, peer_version())
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    started = time.monotonic()
    began_at = datetime.now(tz=UTC)
    load_before = machine.load_average()
    log_line(
        f"{'quick' if s.quick else 'full'} run: {s.records:,} records x {s.encodings}, "
        f"{s.repetitions} repetition(s); load average {load_before}"
    )
    svc = services_mod.start(log_line)
    # Stop the servers on SIGTERM too (SIGINT raises KeyboardInterrupt, handled by finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx: Context | None = None
    try:
        work = Path(tempfile.mkdtemp(prefix="okbench-work-"))
        work.chmod(0o755)
        ctx = Context(settings=s, bootstrap=svc.bootstrap, dsn=svc.dsn, work=work, log=log_line)
        found = phases(ctx, set(filter(None, args.skip.split(","))))
    finally:
        if ctx is not None:
            ctx.children.kill_all()
        log_line("stopping Kafka and PostgreSQL")
        svc.stop()
    doc = report.build(
        settings=s,
        contenders=found["contenders"],
        runs=found["runs"],
        latency=found["latency"],
        cadence=found["cadence"],
        recovery=found["recovery"],
        profiles=found["profiles"],
        machine=found["machine"],
        began_at=began_at,
        duration_s=time.monotonic() - started,
        load=(load_before, machine.load_average()),
        aiokafka=found["aiokafka"],
    )
    written = report.write_results(doc, s.out_dir)  # bench.json, bench.md and the charts
    log_line(
        f"wrote {', '.join(p.name for p in written)} into {s.out_dir} "
        f"in {time.monotonic() - started:.0f}s"
    )
    print(report.markdown(doc))
    if not doc["correct"]:
        log_line(f"CORRECTNESS CHECKS FAILED (see 'checks' in bench.json; logs kept in {work})")
        return 1
    if args.keep_work:
        log_line(f"logs and results of every run kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
