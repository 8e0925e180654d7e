"""`offsetkeeper checkpoint ...`: inspect stored checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import structlog

from consumer._cli_common import COMMON_SETTINGS, add_common_arguments, cli_values
from consumer._config import CheckpointSettings, load_settings
from consumer._confluent import ConfluentBackend
from consumer._errors import KafkaError
from consumer._logging import configure_logging
from consumer._records import TopicPartition
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


def checkpoint_show(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings(
        CheckpointSettings, cli_values(args, (*COMMON_SETTINGS, "group")), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    sink_url = settings.sink.get_secret_value()
    sink = open_sink(sink_url)
    sink.open(())
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
