"""`offsetkeeper checkpoint ...`: inspect and move stored checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from consumer._checkpoint import Checkpoint
from consumer._cli_common import COMMON_SETTINGS, add_common_arguments, cli_values
from consumer._config import CheckpointSettings, load_settings
from consumer._confluent import ConfluentBackend, ConfluentReader
from consumer._errors import ConfigError, KafkaError
from consumer._logging import configure_logging
from consumer._records import TopicPartition
from consumer._replay import at_time_or_end, check_in_log
from sinks import mask_url, open_sink

log = structlog.get_logger("offsetkeeper.cli")


def add_checkpoint_parser(commands: Any) -> None:
    checkpoint = commands.add_parser("checkpoint", help="inspect stored checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    show = checkpoint_commands.add_parser("show", help="stored checkpoints and lag per partition")
    add_common_arguments(show)
    show.add_argument("--group", help="consumer group id")
    show.add_argument("--format", dest="output_format", choices=["table", "json"], default="table")
    show.set_defaults(handler=lambda args: checkpoint_show(args, sys.stdout))

    reset = checkpoint_commands.add_parser(
        "reset",
        help="move a group's stored checkpoints (refused while the group has active members)",
    )
    add_common_arguments(reset)
    reset.add_argument("--group", help="consumer group id")
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
    reset.set_defaults(handler=lambda args: checkpoint_reset(args, sys.stdout))


def checkpoint_reset(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings(
        CheckpointSettings, cli_values(args, (*COMMON_SETTINGS, "group")), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    group, topic = settings.group, args.topic
    reader = ConfluentReader(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"offsetkeeper-reset-{group}",
        client_config=settings.kafka_config,
    )
    sink = open_sink(settings.sink.get_secret_value())
    try:
        members = reader.group_members(group)
        if members:
            # Same rule as kafka-consumer-groups --reset-offsets: never move a live group.
            raise ConfigError(
                "the group has active members; stop them before resetting its checkpoints",
                group=group,
                members=members,
            )
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
        if args.dry_run:
            sink.open_existing()
        else:
            sink.open(())
        current = sink.load_checkpoints(group, tps)
        verb = "would move" if args.dry_run else "moved"
        out.write(f"group {group}, topic {topic}: {verb} {len(tps)} checkpoint(s)\n")
        for tp in tps:
            before = current[tp].next_offset if tp in current else "-"
            out.write(f"  partition {tp.partition}: {before} -> {targets[tp]}\n")
        if args.dry_run:
            return 0
        # A new epoch fences any zombie of the group still holding these partitions.
        epochs = sink.acquire(group, tps)
        now = datetime.now(tz=UTC)
        sink.begin()
        try:
            sink.save_checkpoints(
                group,
                [Checkpoint(group, tp.topic, tp.partition, targets[tp], now) for tp in tps],
                epochs,
            )
            sink.commit()
        except BaseException:
            sink.rollback()
            raise
        log.info(
            "checkpoints_reset",
            group=group,
            topic=topic,
            offsets={tp.partition: targets[tp] for tp in tps},
        )
        return 0
    finally:
        reader.close()
        sink.close()


def checkpoint_show(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings(
        CheckpointSettings, cli_values(args, (*COMMON_SETTINGS, "group")), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    sink_url = settings.sink.get_secret_value()
    sink = open_sink(sink_url)
    sink.open_existing()
    try:
        checkpoints = sink.load_checkpoints(settings.group)
    finally:
        sink.close()
    ends: dict[TopicPartition, int | None] = {}
    backend = ConfluentBackend(
        bootstrap_servers=settings.bootstrap_servers,
        group=f"{settings.group}.offsetkeeper-inspect",
        client_config={"socket.timeout.ms": "10000", **settings.kafka_config},
    )
    try:
        for tp in checkpoints:
            try:
                ends[tp] = backend.watermarks(tp, timeout_s=10.0)[1]
            except KafkaError as exc:
                log.warning(
                    "end_offset_unknown", topic=tp.topic, partition=tp.partition, error=str(exc)
                )
                ends[tp] = None
    finally:
        backend.close()
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
                "updated_at": checkpoint.updated_at.isoformat(),
            }
        )
    if args.output_format == "json":
        json.dump(
            {"group": settings.group, "sink": mask_url(sink_url), "checkpoints": rows},
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    out.write(f"group {settings.group} in {mask_url(sink_url)}: {len(rows)} partition(s)\n")
    header = ("topic", "partition", "next_offset", "end_offset", "lag", "updated_at")
    table = [header] + [tuple("?" if r[h] is None else str(r[h]) for h in header) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            + "\n"
        )
    return 0
