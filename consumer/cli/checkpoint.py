"""`offsetkeeper checkpoint ...`: inspect, export, import, migrate, adopt, verify and reset
stored checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

from consumer.backends.confluent import ConfluentReader
from consumer.checkpoints.model import CURRENT_FORMAT_VERSION, Checkpoint
from consumer.cli.checkpoint_tools import (
    audit,
    check_offsets_in_log,
    export_document,
    offsets_to_checkpoints,
    parse_export,
    read_json_file,
    read_offsets_file,
    refuse_live_group,
    store_checkpoints,
)
from consumer.cli.common import COMMON_SETTINGS, add_common_arguments, cli_values
from consumer.cli.data_checks import DataFileVerifier, report_data_files
from consumer.cli.sinks import checkpoint_admin, open_sink
from consumer.cli.state_tools import (
    StateUpgrade,
    blob_cleared,
    export_entries,
    parse_entries,
    plan_state_upgrade,
    replacing_changes,
    state_sizes,
)
from consumer.core.app import StateSchema, load_app
from consumer.core.errors import ConfigError, KafkaError
from consumer.core.exit_codes import EXIT_OK, EXIT_PROBLEMS_FOUND
from consumer.core.records import TopicPartition
from consumer.core.settings import CheckpointSettings, CommonSettings, load_settings
from consumer.core.urls import mask_url
from consumer.engine.sink import Sink, StateEntry
from consumer.replay.plan import at_time_or_end, check_in_log
from consumer.runtime.logs import configure_logging

log = structlog.get_logger("offsetkeeper.cli")

_PAST = {"import": "imported", "adopt": "adopted", "reset": "reset"}


def add_checkpoint_parser(commands: Any) -> None:
    checkpoint = commands.add_parser("checkpoint", help="inspect and manage stored checkpoints")
    sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True)

    def command(
        name: str, help_text: str, handler: Callable[..., int], *, group: bool = True
    ) -> Any:
        parser = sub.add_parser(name, help=help_text)
        add_common_arguments(parser)
        if group:
            parser.add_argument("--group", help="consumer group id")
        parser.set_defaults(handler=lambda args: handler(args, sys.stdout))
        return parser

    show = command("show", "stored checkpoints, format, epoch, state size and lag", checkpoint_show)
    show.add_argument("--format", dest="output_format", choices=["table", "json"], default="table")

    export = command("export", "write the group's checkpoints as JSON", checkpoint_export)
    export.add_argument("--output", type=Path, help="file to write (default: stdout)")

    import_ = command(
        "import", "store checkpoints from an export (not for a live group)", checkpoint_import
    )
    import_.add_argument("--input", type=Path, required=True, help="a file written by export")
    import_.add_argument("--dry-run", action="store_true", help="print the change, write nothing")

    migrate = command(
        "migrate",
        "rewrite every stored checkpoint in the current format",
        checkpoint_migrate,
        group=False,
    )
    migrate.add_argument("--dry-run", action="store_true", help="print what would change")
    migrate.add_argument("--backup", type=Path, help="where to write the backup (default: named)")
    migrate.add_argument(
        "--app",
        metavar="MODULE:APP",
        help="also split format-2 state blobs and upgrade every state entry to this app's "
        "state version now (the groups must be stopped); without it both happen lazily",
    )

    adopt = command("adopt", "take over offsets from another consumer", checkpoint_adopt)
    adopt.add_argument(
        "--from",
        dest="source",
        nargs=2,
        required=True,
        metavar=("KIND", "SOURCE"),
        help="kafka-group GROUP | spark-checkpoint DIR | offsets-file FILE",
    )
    adopt.add_argument(
        "--topic", dest="topics", action="append", help="only this topic (repeatable)"
    )
    adopt.add_argument(
        "--spark-source", type=int, help="index of the Kafka source in a Spark query"
    )
    adopt.add_argument("--dry-run", action="store_true", help="print the change, write nothing")

    verify = command(
        "verify",
        "report checkpoints that no longer fit their partition's log, and (file sink) data "
        "files that do not match their recorded checksums",
        checkpoint_verify,
    )
    verify.add_argument(
        "--require-checksums",
        action="store_true",
        help="file sink: count data files with no checksum recorded (committed by a version "
        "before checksums) as problems",
    )

    reset = command("reset", "move a group's checkpoints (not for a live group)", checkpoint_reset)
    reset.add_argument("--topic", required=True, help="the topic whose checkpoints move")
    reset.add_argument(
        "--partition",
        dest="partitions",
        type=int,
        action="append",
        help="only this partition (repeatable; default: all)",
    )
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-offset", type=int, metavar="N", help="next offset to read: N")
    target.add_argument(
        "--to-timestamp", metavar="ISO8601", help="the first record at or after this time"
    )
    target.add_argument("--to-earliest", action="store_true", help="the start of the log")
    target.add_argument("--to-latest", action="store_true", help="the end of the log")
    reset.add_argument("--dry-run", action="store_true", help="print the change, write nothing")


def _settings(args: argparse.Namespace, *, group: bool = True) -> CommonSettings:
    names = (*COMMON_SETTINGS, "group") if group else COMMON_SETTINGS
    settings = load_settings(
        CheckpointSettings if group else CommonSettings, cli_values(args, names), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _group(settings: CommonSettings) -> str:
    if not isinstance(settings, CheckpointSettings):
        raise ConfigError("--group is required")
    return settings.group


def _reader(settings: CommonSettings, purpose: str) -> ConfluentReader:
    return ConfluentReader(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"offsetkeeper-{purpose}",
        client_config=settings.kafka_config,
    )


def _open(settings: CommonSettings, *, write: bool) -> Sink:
    sink = open_sink(settings.sink.get_secret_value())
    if write:
        sink.open(())
    else:
        checkpoint_admin(sink).open_existing()
    return sink


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    lines = [list(header)] + [["?" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _end_offsets(
    settings: CommonSettings, group: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int | None]:
    """Each partition's end offset; None where the broker did not say (logged)."""
    reader = _reader(settings, f"inspect-{group}")
    ends: dict[TopicPartition, int | None] = {}
    try:
        for tp in partitions:
            try:
                ends[tp] = reader.watermarks(tp, timeout_s=10.0)[1]
            except KafkaError as exc:
                log.warning(
                    "end_offset_unknown", topic=tp.topic, partition=tp.partition, error=str(exc)
                )
                ends[tp] = None
    finally:
        reader.close()
    return ends


def checkpoint_show(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group = _group(settings)
    sink_url = settings.sink.get_secret_value()
    sink = _open(settings, write=False)
    try:
        checkpoints = sink.load_checkpoints(group)
        sizes = state_sizes(sink, group)
    finally:
        sink.close()
    ends = _end_offsets(settings, group, checkpoints)
    rows = []
    for tp in sorted(checkpoints):
        checkpoint = checkpoints[tp]
        end = ends.get(tp)
        rows.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "next_offset": checkpoint.next_offset,
                "end_offset": end,
                "lag": None if end is None else max(end - checkpoint.next_offset, 0),
                "format": checkpoint.read_from_format,
                "epoch": checkpoint.epoch,
                "state_entries": sizes.get(tp, (0, 0))[0],
                "state_entry_bytes": sizes.get(tp, (0, 0))[1],
                "state_blob_bytes": 0 if checkpoint.state is None else len(checkpoint.state),
                "state_version": checkpoint.state_version,
                "updated_at": checkpoint.updated_at.isoformat(),
            }
        )
    if args.output_format == "json":
        json.dump({"group": group, "sink": mask_url(sink_url), "checkpoints": rows}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"group {group} in {mask_url(sink_url)}: {len(rows)} partition(s)\n")
    header = (
        "topic",
        "partition",
        "next_offset",
        "end_offset",
        "lag",
        "format",
        "epoch",
        "state_entries",
        "state_entry_bytes",
        "updated_at",
    )
    _table(out, header, [[r[h] for h in header] for r in rows])
    return EXIT_OK


def checkpoint_export(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group = _group(settings)
    sink = _open(settings, write=False)
    try:
        checkpoints = sorted(sink.load_checkpoints(group).values(), key=lambda c: c.topic_partition)
        entries = export_entries(sink, group, [cp.topic_partition for cp in checkpoints])
        document = export_document(
            checkpoints, source=mask_url(sink.description), state_entries=entries
        )
    finally:
        sink.close()
    text = json.dumps(document, indent=2) + "\n"
    if args.output is None:
        out.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        out.write(
            f"exported {len(checkpoints)} checkpoint(s) and {len(entries)} state entries of "
            f"group {group} to {args.output}\n"
        )
    return EXIT_OK


def checkpoint_import(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group = _group(settings)
    document = read_json_file(args.input, "export file")
    checkpoints = parse_export(document, path=str(args.input))
    entries = parse_entries(document, path=str(args.input), group=group)
    reader = _reader(settings, f"import-{group}")
    try:
        refuse_live_group(reader, group, "import checkpoints")
        check_offsets_in_log(reader, {cp.topic_partition: cp.next_offset for cp in checkpoints})
    finally:
        reader.close()
    return _apply(
        settings, group, checkpoints, out, dry_run=args.dry_run, verb="import", entries=entries
    )


def _apply(
    settings: CommonSettings,
    group: str,
    checkpoints: list[Checkpoint],
    out: TextIO,
    *,
    dry_run: bool,
    verb: str,
    entries: Mapping[TopicPartition, list[StateEntry]] | None = None,
) -> int:
    """Store `checkpoints`; an import also replaces the partitions' keyed state by `entries`,
    while reset and adopt keep the state (a format-2 blob included)."""
    done = _PAST[verb]
    sink = _open(settings, write=not dry_run)
    try:
        current = sink.load_checkpoints(group)
        if entries is None:  # keep a blob not yet split, as the entries are kept
            checkpoints = [_keeping_blob(cp, current.get(cp.topic_partition)) for cp in checkpoints]
        action = f"would {verb}" if dry_run else done
        out.write(f"group {group}: {action} {len(checkpoints)} checkpoint(s)\n")
        for cp in sorted(checkpoints, key=lambda c: c.topic_partition):
            before = (
                current[cp.topic_partition].next_offset if cp.topic_partition in current else "-"
            )
            out.write(f"  {cp.topic}[{cp.partition}]: {before} -> {cp.next_offset}\n")
        changes = (
            []
            if entries is None
            else replacing_changes(sink, group, entries, [cp.topic_partition for cp in checkpoints])
        )
        if entries is not None:
            out.write(f"  state: {sum(len(e) for e in entries.values())} entries\n")
        if not dry_run:
            store_checkpoints(sink, group, checkpoints, changes)
            log.info(
                f"checkpoints_{done}",
                group=group,
                offsets={str(cp.topic_partition): cp.next_offset for cp in checkpoints},
            )
    finally:
        sink.close()
    return EXIT_OK


def _keeping_blob(checkpoint: Checkpoint, stored: Checkpoint | None) -> Checkpoint:
    if stored is None or stored.state is None:
        return checkpoint
    return replace(checkpoint, state=stored.state, state_version=stored.state_version)


def checkpoint_migrate(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args, group=False)
    schema = _state_schema(args.app) if args.app else None
    sink = _open(settings, write=not args.dry_run)
    try:
        groups = checkpoint_admin(sink).checkpoint_groups()
        if schema is not None and not args.dry_run:
            _refuse_live_groups(settings, groups)
        upgrades = {} if schema is None else _plan_state_upgrades(sink, groups, schema)
        if args.dry_run:
            older = checkpoint_admin(sink).migrate_checkpoints(dry_run=True)
            _report_migration(out, older, upgrades, dry_run=True)
            return EXIT_OK
        backup = _write_backup(sink, groups, args.backup)
        out.write(f"backup of group(s) {', '.join(groups) or '-'} written to {backup}\n")
        older = checkpoint_admin(sink).migrate_checkpoints()
        for group, (checkpoints, planned) in upgrades.items():
            store_checkpoints(
                sink,
                group,
                [blob_cleared(checkpoints[u.partition]) for u in planned],
                [change for u in planned for change in u.changes],
            )
        _report_migration(out, older, upgrades, dry_run=False)
        log.info("checkpoints_migrated", rewritten=len(older), backup=str(backup))
    finally:
        sink.close()
    return EXIT_OK


_Upgrades = dict[str, tuple[dict[TopicPartition, Checkpoint], list[StateUpgrade]]]


def _state_schema(reference: str) -> StateSchema:
    app = load_app(reference)
    if app.state is None:
        raise ConfigError("--app names an app without state: there is no state to upgrade")
    return app.state


def _refuse_live_groups(settings: CommonSettings, groups: Sequence[str]) -> None:
    reader = _reader(settings, "migrate")
    try:
        for group in groups:
            refuse_live_group(reader, group, "upgrade its state")
    finally:
        reader.close()


def _plan_state_upgrades(sink: Sink, groups: Sequence[str], schema: StateSchema) -> _Upgrades:
    """Per group, its checkpoints and the partitions whose state changes (blobs to split,
    entries to upgrade to the app's state version)."""
    upgrades: _Upgrades = {}
    for group in groups:
        checkpoints = sink.load_checkpoints(group)
        planned = [plan_state_upgrade(sink, group, cp, schema) for cp in checkpoints.values()]
        planned = [u for u in planned if u.changes]
        if planned:
            upgrades[group] = (checkpoints, planned)
    return upgrades


def _write_backup(sink: Sink, groups: Sequence[str], chosen: Path | None) -> Path:
    """An export of every group's checkpoints and state entries, before anything changes."""
    checkpoints = [cp for group in groups for cp in sink.load_checkpoints(group).values()]
    entries = [
        {"group": group, **entry}
        for group in groups
        for entry in export_entries(
            sink, group, [cp.topic_partition for cp in checkpoints if cp.group == group]
        )
    ]
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = chosen or Path(f"offsetkeeper-checkpoints-backup-{stamp}.json")
    document = export_document(
        checkpoints, source=mask_url(sink.description), state_entries=entries
    )
    backup.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return backup


def _report_migration(
    out: TextIO, older: Sequence[Checkpoint], upgrades: _Upgrades, *, dry_run: bool
) -> None:
    if dry_run:
        out.write(
            f"dry run: {len(older)} checkpoint(s) would be rewritten "
            f"in format v{CURRENT_FORMAT_VERSION}\n"
        )
    else:
        out.write(f"migrated {len(older)} checkpoint(s) to format v{CURRENT_FORMAT_VERSION}\n")
    for cp in older:
        out.write(
            f"  {cp.group} {cp.topic}[{cp.partition}] next_offset {cp.next_offset}: "
            f"v{cp.read_from_format} -> v{CURRENT_FORMAT_VERSION}\n"
        )
    verb = "would be" if dry_run else "were"
    for group, (_checkpoints, planned) in upgrades.items():
        for u in planned:
            out.write(
                f"  {group} {u.partition.topic}[{u.partition.partition}] state: "
                f"{u.blob_entries} entries {verb} split from a format-2 blob, "
                f"{u.upgraded} {verb} upgraded\n"
            )


def checkpoint_adopt(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group = _group(settings)
    kind, source = args.source
    # A file source is read, and refused if it is bad, before Kafka is asked anything.
    offsets = None if kind == "kafka-group" else _offsets_from_file(kind, source, args)
    reader = _reader(settings, f"adopt-{group}")
    try:
        if offsets is None:
            offsets = reader.committed_offsets(source)
        if args.topics:
            offsets = {tp: o for tp, o in offsets.items() if tp.topic in set(args.topics)}
        if not offsets:
            raise ConfigError("the source has no offsets to adopt", kind=kind, source=source)
        refuse_live_group(reader, group, "adopt offsets")
        check_offsets_in_log(reader, offsets)
    finally:
        reader.close()
    return _apply(
        settings,
        group,
        offsets_to_checkpoints(group, offsets),
        out,
        dry_run=args.dry_run,
        verb="adopt",
    )


def _offsets_from_file(
    kind: str, source: str, args: argparse.Namespace
) -> dict[TopicPartition, int]:
    if kind == "spark-checkpoint":
        from consumer.checkpoints.spark import read_spark_kafka_offsets  # noqa: PLC0415

        spark = read_spark_kafka_offsets(Path(source), source_index=args.spark_source)
        return {TopicPartition(t, p): o for t, ps in spark.items() for p, o in ps.items()}
    if kind == "offsets-file":
        return read_offsets_file(Path(source))
    raise ConfigError(
        "unknown adopt source", kind=kind, known=["kafka-group", "spark-checkpoint", "offsets-file"]
    )


def checkpoint_verify(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group = _group(settings)
    sink = _open(settings, write=False)
    try:
        checkpoints = sink.load_checkpoints(group)
        file_problems = _verify_data_files(sink, group, out, args.require_checksums)
    finally:
        sink.close()
    reader = _reader(settings, f"verify-{group}")
    try:
        problems = audit(reader, checkpoints)
    finally:
        reader.close()
    if not problems:
        out.write(f"group {group}: {len(checkpoints)} checkpoint(s), all within their logs\n")
        return EXIT_PROBLEMS_FOUND if file_problems else EXIT_OK
    out.write(
        f"group {group}: {len(problems)} of {len(checkpoints)} checkpoint(s) "
        "do not fit their logs\n"
    )
    for problem in problems:
        tp = problem.partition
        out.write(
            f"  {tp.topic}[{tp.partition}] next_offset {problem.next_offset} "
            f"(log {problem.log_start}..{problem.log_end}): {problem.problem}\n"
        )
        log.error(
            "checkpoint_integrity_problem",
            topic=tp.topic,
            partition=tp.partition,
            offset=problem.next_offset,
            log_start=problem.log_start,
            log_end=problem.log_end,
            problem=problem.problem,
        )
    return EXIT_PROBLEMS_FOUND


def _verify_data_files(sink: Sink, group: str, out: TextIO, require_checksums: bool) -> int:
    """The file sink's data files against their recorded checksums; the problems found."""
    if not isinstance(sink, DataFileVerifier):
        if require_checksums:
            raise ConfigError("--require-checksums: this sink keeps no checksums of data files")
        return 0
    reports = sink.verify_data_files(group)
    return report_data_files(out, group, reports, require_checksums=require_checksums)


def checkpoint_reset(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    group, topic = _group(settings), args.topic
    reader = _reader(settings, f"reset-{group}")
    try:
        refuse_live_group(reader, group, "reset its checkpoints")
        existing = reader.partitions(topic)
        chosen = sorted(set(args.partitions)) if args.partitions else existing
        unknown = [p for p in chosen if p not in existing]
        if unknown:
            raise ConfigError("unknown partition", topic=topic, partition=unknown[0])
        tps = [TopicPartition(topic, p) for p in chosen]
        logs = {tp: reader.watermarks(tp) for tp in tps}
        if args.to_offset is not None:
            check_in_log(tps, logs, args.to_offset, "--to-offset")
            targets = {tp: args.to_offset for tp in tps}
        elif args.to_timestamp is not None:
            targets = at_time_or_end(reader, tps, logs, args.to_timestamp)[0]
        else:
            targets = {tp: logs[tp][0] if args.to_earliest else logs[tp][1] for tp in tps}
    finally:
        reader.close()
    return _apply(
        settings,
        group,
        offsets_to_checkpoints(group, targets),
        out,
        dry_run=args.dry_run,
        verb="reset",
    )
