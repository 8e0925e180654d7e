"""Pieces every `offsetkeeper` sub-command shares: common flags and settings plumbing."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer._config import DecodingSettings
from consumer._topic_decoders import DecodeSettings

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


DECODING_SETTINGS = ("decode", "reader_schema", "schema_registry_url", "schema_dir")

# Settings given as repeatable KEY=VALUE flags, gathered into a dict.
_PAIR_SETTINGS = ("kafka_config", "decode", "reader_schema")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    decoding = parser.add_argument_group("decoding (README: Decoding)")
    decoding.add_argument(
        "--decode",
        action="append",
        type=_key_value,
        metavar="TOPIC=NAME",
        help="decoder for a topic, overriding the app: json, utf8, bytes, avro, avro-local "
        "(repeatable)",
    )
    decoding.add_argument(
        "--reader-schema",
        dest="reader_schema",
        action="append",
        type=_key_value,
        metavar="TOPIC=FILE.avsc",
        help="Avro schema to read a topic's records as (schema evolution; repeatable)",
    )
    decoding.add_argument(
        "--schema-registry-url", metavar="URL", help="schema registry for the avro decoder"
    )
    decoding.add_argument(
        "--schema-dir", metavar="DIR", help="writer schemas for avro-local (default schemas)"
    )


def cli_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The given flags as settings values (None for a flag not given)."""
    values = {name: getattr(args, name, None) for name in names}
    for name in _PAIR_SETTINGS:
        pairs = values.get(name)
        if pairs is not None:
            values[name] = dict(pairs)
    return values


def decode_settings(settings: DecodingSettings) -> DecodeSettings:
    registry = settings.schema_registry_url
    return DecodeSettings(
        schema_registry_url=None if registry is None else registry.get_secret_value(),
        schema_dir=settings.schema_dir,
        decode=settings.decode,
        reader_schema=settings.reader_schema,
    )
