"""Value decoders, chosen by name in the app. A failure is a `DecodeError` naming the record.

`json`, `utf8` and `bytes` need no options. `avro` (Confluent framing, a schema registry) and
`avro-local` (single-object encoding, a directory of .avsc files) are in `consumer.decoding.avro`; a
problem with their options is a `ConfigError` when the decoder is built, before any record.
A `None` value (a tombstone) decodes to None whatever the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from consumer.core.errors import ConfigError, DecodeError
from consumer.decoding.avro import (
    LocalAvroDecoder,
    ReaderSchema,
    RegistryAvroDecoder,
    SchemaRegistryClient,
    load_schema_dir,
)
from consumer.decoding.avro_limits import DEFAULT_MAX_NESTING_DEPTH

Decoder = Callable[[bytes | None], Any]


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """What the Avro decoders need; the others ignore it."""

    schema_registry_url: str | None = None  # for "avro"
    schema_dir: Path | None = None  # for "avro-local"
    # An .avsc file: the schema records are read AS (Avro schema resolution); None: as written.
    reader_schema: Path | None = None
    registry_timeout_s: float = 10.0
    # Values nesting deeper (records, arrays, maps) are DecodeErrors, refused before fastavro
    # reads them: its C reader would overflow the stack (consumer.decoding.avro_limits).
    max_nesting_depth: int = DEFAULT_MAX_NESTING_DEPTH


# msgspec decodes JSON about three times faster than json.loads, and gives the same value for
# every document it accepts (integers of any size included). Whatever it refuses (NaN and
# Infinity, lone surrogates, a BOM, UTF-16, invalid documents) goes to json.loads, which
# decides exactly as it always did.
_FAST_JSON = msgspec.json.Decoder()
_FAST_JSON_REFUSED = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def _decode_json(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return _FAST_JSON.decode(value)
    except _FAST_JSON_REFUSED:
        pass
    try:
        return json.loads(value)
    except ValueError as exc:  # invalid JSON or UTF-8, or an integer past 4300 digits
        raise DecodeError(f"value is not valid JSON: {exc}") from exc
    except RecursionError:  # json's parser recurses once per level of nesting
        raise DecodeError(
            "value nests deeper than Python's recursion limit", field="nesting depth"
        ) from None


def _decode_utf8(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not valid UTF-8: {exc}") from exc


def _decode_bytes(value: bytes | None) -> Any:
    return value


def _registry_avro(options: DecodeOptions) -> Decoder:
    if not options.schema_registry_url:
        raise ConfigError(
            "decoder avro needs a schema registry URL (--schema-registry-url)",
            setting="schema_registry_url",
        )
    registry = SchemaRegistryClient(
        options.schema_registry_url, timeout_s=options.registry_timeout_s
    )
    return RegistryAvroDecoder(
        registry, _reader_schema(options), max_nesting_depth=options.max_nesting_depth
    )


def _local_avro(options: DecodeOptions) -> Decoder:
    if options.schema_dir is None:
        raise ConfigError(
            "decoder avro-local needs a schema directory (--schema-dir)", setting="schema_dir"
        )
    schemas = load_schema_dir(options.schema_dir)
    return LocalAvroDecoder(
        options.schema_dir,
        schemas,
        _reader_schema(options),
        max_nesting_depth=options.max_nesting_depth,
    )


def _reader_schema(options: DecodeOptions) -> ReaderSchema | None:
    return None if options.reader_schema is None else ReaderSchema.load(options.reader_schema)


_PLAIN_DECODERS: dict[str, Decoder] = {
    "json": _decode_json,
    "utf8": _decode_utf8,
    "bytes": _decode_bytes,
}
_AVRO_DECODERS: dict[str, Callable[[DecodeOptions], Decoder]] = {
    "avro": _registry_avro,
    "avro-local": _local_avro,
}
DECODER_NAMES = ("json", "utf8", "bytes", "avro", "avro-local")


def decoder_for(name: str, options: DecodeOptions | None = None) -> Decoder:
    """The decoder called `name`; Avro decoders are built (schemas loaded) here."""
    plain = _PLAIN_DECODERS.get(name)
    if plain is not None:
        return plain
    build = _AVRO_DECODERS.get(name)
    if build is None:
        raise ConfigError("unknown decoder", decode=name, known=sorted(DECODER_NAMES))
    return build(options or DecodeOptions())
