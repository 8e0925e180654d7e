"""Pieces every `offsetkeeper` sub-command shares: common flags and settings plumbing."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMMON_SETTINGS = ("bootstrap_servers", "sink", "kafka_config", "log_level", "log_format")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (env OFFSETKEEPER_CONFIG)")
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (default 127.0.0.1:9092)"
    )
    parser.add_argument("--sink", help="sink URL, e.g. sqlite:///out.db or postgresql://...")
    parser.add_argument(
        "-X",
        "--kafka-config",
        dest="kafka_config",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="raw librdkafka setting, repeatable (e.g. -X session.timeout.ms=10000)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])


def cli_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The given flags as settings values (None for a flag not given)."""
    values = {name: getattr(args, name, None) for name in names}
    pairs = values.get("kafka_config")
    if pairs is not None:
        values["kafka_config"] = dict(pairs)
    return values
