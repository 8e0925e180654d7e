"""`offsetkeeper replay`: backfill or reprocess a chosen range without touching the live group."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

import structlog

from consumer.audit.run import count_newer_rows, recompute
from consumer.backends.confluent import ConfluentReader
from consumer.cli.common import (
    BAD_RECORD_SETTINGS,
    COMMON_SETTINGS,
    DECODING_SETTINGS,
    MIB,
    add_bad_record_arguments,
    add_common_arguments,
    add_decoding_arguments,
    bad_record_policy,
    cli_values,
    dead_letter_writer,
    decode_settings,
)
from consumer.cli.sinks import checkpoint_admin, job_store, open_sink
from consumer.core.app import App, load_app
from consumer.core.errors import ConfigError
from consumer.core.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTITIONS_STOPPED
from consumer.core.records import TopicPartition
from consumer.core.settings import ReplaySettings, load_settings
from consumer.decoding.topics import TopicDecoders
from consumer.engine.client import PartitionReader
from consumer.engine.retry import RetryPolicy
from consumer.engine.sink import Sink
from consumer.replay.job import ReplayOptions, ReplaySummary, run_replay
from consumer.replay.plan import (
    RangeRequest,
    ReplayPlan,
    default_job_id,
    request_fingerprint,
    resolve_plan,
)
from consumer.runtime.logs import configure_logging

log = structlog.get_logger("offsetkeeper.cli")


def add_replay_parser(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay a range of a topic into the sink; the live group is untouched",
    )
    add_common_arguments(replay)
    add_decoding_arguments(replay)
    add_bad_record_arguments(replay)
    replay.add_argument("--app", help="the app to run, MODULE:ATTR")
    replay.add_argument("--topic", help="the topic to replay")
    replay.add_argument(
        "--partition",
        dest="partitions",
        type=int,
        action="append",
        help="replay only this partition (repeatable; default: all)",
    )
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N")
    start.add_argument(
        "--from-timestamp",
        metavar="ISO8601",
        help="start at the first record at or after this time (UTC when no zone is given)",
    )
    start.add_argument(
        "--from-checkpoint", metavar="GROUP", help="start where GROUP's stored checkpoint is"
    )
    end = replay.add_mutually_exclusive_group()
    end.add_argument("--to-offset", type=int, metavar="M", help="stop before offset M")
    end.add_argument(
        "--to-timestamp", metavar="ISO8601", help="stop before the first record at this time"
    )
    end.add_argument(
        "--to-end",
        action="store_true",
        help="stop at the end offsets as they are when the job starts (the default)",
    )
    replay.add_argument(
        "--job-id", help="the job's id (default: derived from the request, so a rerun resumes)"
    )
    replay.add_argument(
        "--resume", action="store_true", help="require an existing job to resume (error if none)"
    )
    replay.add_argument(
        "--live-group",
        metavar="GROUP",
        help="show the overlap of the range with this group's checkpoints (with --dry-run)",
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, write nothing (with --overwrite-newer: also count the rows it "
        "would overwrite)",
    )
    replay.add_argument(
        "--overwrite-newer",
        action="store_true",
        help="upsert tables: replace rows even where the sink holds a newer write of the key "
        "(a deliberate recompute; by default a row is never replaced by an older record)",
    )
    replay.add_argument(
        "--state-from-empty",
        action="store_true",
        help="stateful apps: replay a range that starts after the log start anyway; the "
        "job's state starts empty there, so its outputs count only the replayed records",
    )
    replay.add_argument("--batch-max-records", type=int, help="records per batch, at most")
    replay.add_argument(
        "--sink-retry-deadline",
        dest="sink_retry_deadline_s",
        type=float,
        metavar="SECONDS",
        help="give up after the sink failed this long (default 120)",
    )
    replay.add_argument(
        "--backend", choices=["confluent", "aiokafka"], help="Kafka client (default confluent)"
    )
    replay.set_defaults(handler=lambda args: replay_command(args, sys.stdout))


def replay_command(args: argparse.Namespace, out: TextIO) -> int:
    interrupted = _interruptible()
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    request = RangeRequest(
        from_offset=args.from_offset,
        from_timestamp=args.from_timestamp,
        from_checkpoint=args.from_checkpoint,
        to_offset=args.to_offset,
        to_timestamp=args.to_timestamp,
    )
    app = load_app(settings.app)
    decoders = TopicDecoders(app, decode_settings(settings))
    decoders.check([settings.topic])  # a bad decoder setting fails before anything is read
    fingerprint = request_fingerprint(settings.topic, settings.partitions, settings.app, request)
    if args.overwrite_newer:  # another job than the guarded replay of the same range
        fingerprint["overwrite_newer"] = True
    job_id = settings.job_id or default_job_id(fingerprint)
    dead_letters = dead_letter_writer(settings, group=f"replay-{job_id}", topics=[settings.topic])
    sink = open_sink(settings.sink.get_secret_value())
    reader, resolve = range_reader(settings, job_id)
    try:
        if args.dry_run:
            checkpoint_admin(sink).open_existing()
        else:
            sink.open(app.tables)
        stored = job_store(sink).load_job(job_id)
        plan = _plan(args, settings, sink, reader, stored, request=request, fingerprint=fingerprint)
        if args.dry_run:
            live_group = args.live_group or args.from_checkpoint
            _print_plan(out, plan, sink, live_group, stored is not None)
            if args.overwrite_newer:
                _print_overwrites(out, app, reader, sink, plan, decoders, resolve)
            return EXIT_OK
        if app.state is not None and stored is None and not args.state_from_empty:
            _refuse_partial_state(reader, plan)  # (a resumed job was allowed when it began)
        if stored is None:
            plan = ReplayPlan.from_document(job_store(sink).create_job(job_id, plan.to_document()))
        ranges = {r.partition: (r.start, r.end) for r in plan.ranges}
        log.info(
            "replay_starting", job=job_id, topic=plan.topic, records=plan.records, ranges=ranges
        )
        if dead_letters is not None:
            dead_letters.prepare([settings.topic])
        summary = run_replay(
            app,
            reader,
            sink,
            plan,
            options=_options(settings, resolve, overwrite_newer=args.overwrite_newer),
            should_stop=lambda: bool(interrupted),
            decoders=decoders,
            dead_letters=dead_letters,
        )
    finally:
        reader.close()
        sink.close()
        if dead_letters is not None:
            dead_letters.close()
    return _report(out, summary, interrupted=bool(interrupted))


def _refuse_partial_state(reader: PartitionReader, plan: ReplayPlan) -> None:
    """A stateful app's replay keeps its state in the job's own group, which starts empty:
    from the middle of a partition its outputs would count only the replayed records. That
    is refused unless asked for (`--state-from-empty`)."""
    for partition_range in plan.ranges:
        tp = TopicPartition(plan.topic, partition_range.partition)
        log_start = reader.watermarks(tp)[0]
        if partition_range.start > log_start:
            raise ConfigError(
                "the app keeps state, and a replay's state starts empty: from an offset after "
                "the log start its outputs would count only the replayed records. Replay from "
                "the log start (e.g. --from-timestamp 1970-01-01), or pass --state-from-empty",
                topic=plan.topic,
                partition=partition_range.partition,
                start=partition_range.start,
                log_start=log_start,
            )


def _print_overwrites(  # noqa: PLR0917 - the dry run's whole context
    out: TextIO,
    app: App,
    reader: PartitionReader,
    sink: Sink,
    plan: ReplayPlan,
    decoders: TopicDecoders,
    resolve: Callable[[Any], Any] | None,
) -> None:
    """Recompute the range in memory and count the stored rows that are newer than the
    replay's write of their key: what --overwrite-newer replaces (and the guard would keep)."""
    memory, _letters, _records = recompute(
        app, reader, sink, plan, decoders=decoders, resolve=resolve
    )
    counts = count_newer_rows(memory, sink)
    total = sum(counts.values())
    out.write(f"would overwrite {total} row(s) holding a newer write than the replay's:\n")
    for table, count in sorted(counts.items()):
        out.write(f"  {table}: {count}\n")


def _options(
    settings: ReplaySettings, resolve: Callable[[Any], Any] | None, *, overwrite_newer: bool
) -> ReplayOptions:
    return ReplayOptions(
        batch_max_records=settings.batch_max_records,
        poll_timeout_s=settings.poll_timeout_s,
        retry=RetryPolicy(deadline_s=settings.sink_retry_deadline_s),
        bad_records=bad_record_policy(settings),
        on_data_loss=settings.on_data_loss,
        resolve_awaitable=resolve,
        state_cache_bytes=settings.state_cache_mb * MIB,
        overwrite_newer=overwrite_newer,
    )


def _interruptible() -> list[int]:
    """The first SIGTERM/SIGINT asks the replay to stop after its batch in hand (the list
    gets the signal); a second one exits at once (the open transaction is never committed)."""
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if interrupted:
            raise SystemExit(128 + signum)
        interrupted.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return interrupted


def _settings(args: argparse.Namespace) -> ReplaySettings:
    names = (
        *COMMON_SETTINGS,
        "app",
        "topic",
        "partitions",
        "job_id",
        "batch_max_records",
        "backend",
        "sink_retry_deadline_s",
        *DECODING_SETTINGS,
        *BAD_RECORD_SETTINGS,
    )
    return load_settings(ReplaySettings, cli_values(args, names), args.config)


def _plan(
    args: argparse.Namespace,
    settings: ReplaySettings,
    sink: Sink,
    reader: PartitionReader,
    stored: str | None,
    *,
    request: RangeRequest,
    fingerprint: dict[str, Any],
) -> ReplayPlan:
    """The job's stored plan (which must be for the same request), or a new one."""
    job_id = settings.job_id or default_job_id(fingerprint)
    if stored is not None:
        plan = ReplayPlan.from_document(stored)
        if plan.request != fingerprint:
            raise ConfigError(
                "this job id belongs to a different replay; choose another --job-id",
                job=job_id,
                stored_request=plan.request,
            )
        return plan
    if args.resume:
        raise ConfigError("unknown job id: nothing to resume", job=job_id)
    return resolve_plan(
        reader,
        sink,
        job_id=job_id,
        topic=settings.topic,
        partitions=settings.partitions,
        request=request,
        fingerprint=fingerprint,
        allow_data_loss=settings.on_data_loss == "skip",
    )


def range_reader(
    settings: ReplaySettings, job_id: str
) -> tuple[PartitionReader, Callable[[Any], Any] | None]:
    """The reader, and how an async processor's result is awaited with it (None: it cannot)."""
    if settings.backend == "aiokafka":
        from consumer.backends.aiokafka import AiokafkaReader  # noqa: PLC0415 - loaded only when chosen

        reader = AiokafkaReader(
            bootstrap_servers=settings.bootstrap_servers, client_config=settings.kafka_config
        )
        return reader, reader.resolve
    confluent = ConfluentReader(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"offsetkeeper-replay-{job_id}",
        client_config=settings.kafka_config,
    )
    return confluent, None


def _print_plan(
    out: TextIO, plan: ReplayPlan, sink: Sink, live_group: str | None, stored: bool
) -> None:
    live = (
        sink.load_checkpoints(
            live_group, [TopicPartition(plan.topic, r.partition) for r in plan.ranges]
        )
        if live_group
        else {}
    )
    done = sink.load_checkpoints(f"replay:{plan.job_id}")
    state = "stored job, would resume" if stored else "new job"
    out.write(
        f"replay job {plan.job_id} on topic {plan.topic} ({state}; dry run: nothing written)\n"
    )
    header = ["partition", "start", "end", "records", "job_checkpoint"]
    if live_group:
        header += [f"{live_group}_checkpoint", "already_processed_by_live_group"]
    lines = [header]
    for r in plan.ranges:
        tp = TopicPartition(plan.topic, r.partition)
        job_at = done[tp].next_offset if tp in done else None
        line = [
            str(r.partition),
            str(r.start),
            str(r.end),
            str(r.records),
            "-" if job_at is None else str(job_at),
        ]
        if live_group:
            live_at = live[tp].next_offset if tp in live else None
            overlap = 0 if live_at is None else max(min(r.end, live_at) - r.start, 0)
            line += ["-" if live_at is None else str(live_at), str(overlap)]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
    out.write(f"total records: {plan.records}\n")


def _report(out: TextIO, summary: ReplaySummary, *, interrupted: bool) -> int:
    if summary.already_complete:
        out.write(
            f"replay job {summary.job_id} is already complete; nothing to do "
            "(use a new --job-id to replay the range again)\n"
        )
        return EXIT_OK
    if summary.resumed_from:
        out.write(f"resumed job {summary.job_id} from offsets {summary.resumed_from}\n")
    out.write(
        f"replay job {summary.job_id}: {summary.records} records, {summary.rows} rows written "
        f"in {summary.duration_s:.1f}s ({summary.rate_per_s:,.0f} records/s)"
        + (f", {summary.dead_lettered} dead-lettered" if summary.dead_lettered else "")
        + "\n"
    )
    log.info(
        "replay_finished",
        job=summary.job_id,
        records=summary.records,
        rows=summary.rows,
        duration_s=round(summary.duration_s, 3),
        rate_per_s=round(summary.rate_per_s, 1),
        stopped_partitions=sorted(summary.stopped),
        dead_lettered=summary.dead_lettered,
        interrupted=interrupted,
    )
    if summary.stopped:
        for partition, error in sorted(summary.stopped.items()):
            out.write(f"partition {partition} stopped: {error}\n")
        return EXIT_PARTITIONS_STOPPED
    if interrupted:
        out.write(f"interrupted; run again with --job-id {summary.job_id} to resume\n")
        return EXIT_INTERRUPTED
    return EXIT_OK
