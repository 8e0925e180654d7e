"""Pieces every `offsetkeeper` sub-command shares: common flags and settings plumbing."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer.core.settings import ConsumingSettings, DecodingSettings
from consumer.deadletters.writer import KafkaDeadLetterWriter
from consumer.decoding.topics import DecodeSettings
from consumer.engine.batch import BadRecordPolicy

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
BAD_RECORD_SETTINGS = (
    "on_bad_record",
    "dead_letter_topic",
    "bad_record_retries",
    "bad_record_backoff_s",
    "bad_record_max_backoff_s",
    "on_data_loss",
    "state_cache_mb",
)

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


def add_bad_record_arguments(parser: argparse.ArgumentParser) -> None:
    bad = parser.add_argument_group("bad records (README: Bad records and dead letters)")
    bad.add_argument(
        "--on-bad-record",
        choices=["stop", "dead-letter"],
        help="after the retries: stop the partition at the record (default), or send it to the "
        "dead-letter topic and go on",
    )
    bad.add_argument(
        "--dead-letter-topic",
        metavar="NAME",
        help="dead-letter topic; {group} and {topic} are filled in (default {group}.dlq)",
    )
    bad.add_argument(
        "--bad-record-retries",
        type=int,
        metavar="N",
        help="attempts after the first before a record counts as bad (default 2)",
    )
    bad.add_argument(
        "--bad-record-backoff",
        dest="bad_record_backoff_s",
        type=float,
        metavar="SECONDS",
        help="pause before the first retry, doubling after each (default 0.2)",
    )
    bad.add_argument(
        "--bad-record-max-backoff",
        dest="bad_record_max_backoff_s",
        type=float,
        metavar="SECONDS",
        help="longest pause between retries (default 5)",
    )
    bad.add_argument(
        "--state-cache-mb",
        type=int,
        metavar="MB",
        help="stateful apps: memory for cached state entries; the rest is read from the sink "
        "(default 256)",
    )
    bad.add_argument(
        "--on-data-loss",
        choices=["stop", "skip"],
        help="records deleted from the log before they were read: stop the partition "
        "(default, exit code 2) or skip them with a records_lost event and metric",
    )


MIB = 1024 * 1024


def bad_record_policy(settings: ConsumingSettings) -> BadRecordPolicy:
    return BadRecordPolicy(
        action=settings.on_bad_record,
        retries=settings.bad_record_retries,
        backoff_s=settings.bad_record_backoff_s,
        max_backoff_s=settings.bad_record_max_backoff_s,
    )


def dead_letter_writer(
    settings: ConsumingSettings, *, group: str, topics: Sequence[str]
) -> KafkaDeadLetterWriter | None:
    """The writer the dead-letter policy needs (None under "stop"); a bad topic template fails
    here, before the broker is asked anything."""
    if settings.on_bad_record != "dead-letter":
        return None
    writer = KafkaDeadLetterWriter(
        bootstrap_servers=settings.bootstrap_servers,
        group=group,
        topic_template=settings.dead_letter_topic,
        client_config=settings.kafka_config,
    )
    for topic in topics:
        writer.topic_for(topic)
    return writer
