"""Avro values: the two framings, writer schema lookup, resolution to a reader schema.

Two framings put a reference to the writer schema in front of the Avro binary body:

- Confluent wire format (decoder `avro`): byte 0x00, a 4-byte big-endian schema id, the body.
  Writer schemas come from a Confluent-compatible schema registry (`GET /schemas/ids/{id}`).
- Avro single-object encoding (decoder `avro-local`): bytes 0xC3 0x01, the 8-byte
  little-endian CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, the body.
  Writer schemas are the `*.avsc` files of a directory, looked up by fingerprint. The same
  decoder also reads Confluent framing for files named `NAME.ID.avsc` (id ID), so a topic
  written through a registry can be read (replayed, tested) offline with exported schemas.

With a reader schema, every record is resolved from its writer schema to the reader schema
(Avro schema resolution: added fields take their defaults, removed fields are skipped, int is
promoted to long, float or double, ...). Without one, records are read as written.

Writer schemas are parsed once (per id or per file) and kept with their reader schema as a
`_Plan`, so decoding a record does no HTTP and no schema parsing. Values of a writer schema
that could nest past `max_nesting_depth` (a recursive one), or hold arrays of items that take
no bytes, are checked before fastavro reads them (`avro_limits`): its C reader would overflow
the stack, or make millions of items out of a few bytes. A record that cannot be
decoded is a `DecodeError`; a registry that cannot be asked (unreachable, timing out, 5xx) is a
`SchemaRegistryError`, which the engine retries instead of blaming the record.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any

import fastavro
import structlog
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form

from consumer.core.errors import ConfigError, DecodeError, SchemaRegistryError
from consumer.decoding.avro_limits import (
    DEFAULT_MAX_NESTING_DEPTH,
    ValueGuard,
    check_max_nesting_depth,
    guard_for,
)

log = structlog.get_logger("offsetkeeper.avro")

# A parsed schema as fastavro.parse_schema returns it (a dict for named types, a list for a
# union, a str for a primitive).
ParsedSchema = Any
# A schema as a user gives it: JSON text, a primitive's name, or the decoded JSON.
SchemaSource = str | Mapping[str, Any] | list[Any]

CONFLUENT_MAGIC = 0x00
CONFLUENT_HEADER_SIZE = 5
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER_SIZE = 10
REGISTRY_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# An unknown schema id is asked for again after this long (it may have been registered since).
_UNKNOWN_ID_RETRY_S = 30.0
# How many unknown schema ids are remembered (the most recently met): a stream of random ids
# must not fill memory. An id pushed out is asked for again when it comes back.
_UNKNOWN_IDS_KEPT = 1024
_ID_IN_FILE_NAME = re.compile(r"\.(\d+)$")


# --- schemas -------------------------------------------------------------------------------


def parse_schema(schema: SchemaSource) -> ParsedSchema:
    """Parse a schema given as JSON text, a primitive type's name, or decoded JSON."""
    source: Any = dict(schema) if isinstance(schema, Mapping) else schema
    # JSON text starts with one of these; anything else is a bare type name ("null", "long").
    if isinstance(source, str) and source.lstrip()[:1] in ("{", "[", '"'):
        source = json.loads(source)
    return fastavro.parse_schema(source)


def schema_fingerprint(schema: ParsedSchema) -> bytes:
    """The CRC-64-AVRO fingerprint of the parsing canonical form, as single-object encoding
    puts it on the wire (8 bytes, little-endian)."""
    return _canonical_fingerprint(to_parsing_canonical_form(schema))


@functools.lru_cache(maxsize=1024)
def _canonical_fingerprint(canonical_form: str) -> bytes:
    # fastavro's CRC-64 is pure Python (~0.5 ms a schema), too slow for every encoded value.
    # It gives the fingerprint's bytes in wire order, as hex.
    return bytes.fromhex(fingerprint(canonical_form, "CRC-64-AVRO"))


def schema_name(schema: ParsedSchema) -> str:
    """A schema's full name (named types) or its type (primitives, unions, arrays, maps)."""
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return "union"
    return str(schema)


def load_schema_file(path: Path, *, setting: str) -> ParsedSchema:
    """Read and parse an .avsc file; any problem is a `ConfigError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read Avro schema file: {exc}", setting=setting, path=str(path)
        ) from exc
    try:
        return parse_schema(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"Avro schema file is not JSON: {exc}", setting=setting, path=str(path)
        ) from exc
    except Exception as exc:  # fastavro raises SchemaParseException, ValueError, TypeError...
        raise ConfigError(
            f"Avro schema file is not a valid schema: {exc}", setting=setting, path=str(path)
        ) from exc


# --- encoding (for producers and tests) ----------------------------------------------------


def _body(schema: ParsedSchema, value: Any, header: bytes) -> bytes:
    out = io.BytesIO()
    out.write(header)
    fastavro.schemaless_writer(out, schema, value)
    return out.getvalue()


def encode_confluent(schema: SchemaSource, schema_id: int, value: Any) -> bytes:
    """`value` in Confluent wire format: 0x00, `schema_id` (4 bytes, big-endian), Avro body."""
    if not 0 <= schema_id < 2**32:
        raise ValueError(f"schema id {schema_id} does not fit in 4 bytes")
    header = bytes([CONFLUENT_MAGIC]) + schema_id.to_bytes(4, "big")
    return _body(_parsed(schema), value, header)


def encode_single_object(schema: SchemaSource, value: Any) -> bytes:
    """`value` in Avro single-object encoding: 0xC3 0x01, the schema's fingerprint, Avro body."""
    parsed = _parsed(schema)
    return _body(parsed, value, SINGLE_OBJECT_MAGIC + schema_fingerprint(parsed))


def _parsed(schema: SchemaSource) -> ParsedSchema:
    if isinstance(schema, dict) and schema.get("__fastavro_parsed"):
        return schema
    return parse_schema(schema)


# --- reading one body ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to read the records of one writer schema: fastavro's arguments, prepared once."""

    writer: ParsedSchema
    # None when there is no reader schema, or it is the writer schema itself.
    reader: ParsedSchema | None
    writer_label: str  # e.g. "writer schema id 7 (offsetkeeper.examples.Order)"
    reader_label: str | None
    # Checks a value's nesting depth and item counts before fastavro reads it; None when the
    # writer schema needs no checks (avro_limits).
    guard: ValueGuard | None


@dataclass(frozen=True, slots=True)
class ReaderSchema:
    schema: ParsedSchema
    label: str  # e.g. "reader schema offsetkeeper.examples.Order (schemas/orders-v2.avsc)"

    @classmethod
    def load(cls, path: Path) -> ReaderSchema:
        schema = load_schema_file(path, setting="reader_schema")
        return cls(schema, f"reader schema {schema_name(schema)} ({path})")


def _plan(
    writer: ParsedSchema, writer_label: str, reader: ReaderSchema | None, max_depth: int
) -> _Plan:
    guard = guard_for(writer, writer_label, max_depth)
    if reader is None:
        return _Plan(writer, None, writer_label, None, guard)
    # Equal schemas need no resolution; fastavro would compare them on every record.
    resolved = None if reader.schema == writer else reader.schema
    return _Plan(writer, resolved, writer_label, reader.label, guard)


_MISSING_DEFAULT = re.compile(r"field (\w+)")


def _read(value: bytes, start: int, plan: _Plan) -> Any:
    # Slicing off the header measured faster than BytesIO(value) + seek or a reused BytesIO
    # (ops/bench/avro_decode.py). Resolving skips the writer's fields the reader lacks, and
    # fastavro does not check that a skip found all its bytes: one byte of padding makes a short
    # skip visible, as the reader then ends past the body (checked below).
    if plan.guard is not None:
        plan.guard.check(value, start)
    body = value[start:] if plan.reader is None else value[start:] + b"\x00"
    buffer = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buffer, plan.writer, plan.reader)
    except SchemaResolutionError as exc:
        missing = _MISSING_DEFAULT.search(str(exc))
        raise DecodeError(
            f"{plan.writer_label} cannot be read as {plan.reader_label}: {exc}",
            field=missing.group(1) if missing else None,
        ) from exc
    except Exception as exc:  # malformed bytes surface as IndexError, ValueError, UnicodeError...
        # Reading failed with every byte used up (EOFError, or an IndexError on a missing
        # varint byte): the value ended too early.
        if isinstance(exc, EOFError) or buffer.tell() >= len(value) - start:
            raise DecodeError(
                f"value truncated: not valid Avro for {plan.writer_label} ({len(value)} bytes)"
            ) from exc
        raise DecodeError(
            f"value is not valid Avro for {plan.writer_label}: {type(exc).__name__}: {exc}"
        ) from exc
    left = len(value) - start - buffer.tell()
    if left < 0:
        raise DecodeError(
            f"value truncated: not valid Avro for {plan.writer_label} ({len(value)} bytes)"
        )
    if left:
        raise DecodeError(
            f"value is not valid Avro for {plan.writer_label}: {left} bytes left after the record"
        )
    return record


def _confluent_id(value: bytes) -> int:
    if len(value) < CONFLUENT_HEADER_SIZE:
        raise DecodeError(
            f"value truncated: {len(value)} bytes, shorter than the 5-byte Confluent header",
            field="schema id",
        )
    return int.from_bytes(value[1:CONFLUENT_HEADER_SIZE], "big")


# --- decoder "avro": Confluent framing, schemas from a registry ----------------------------


class SchemaRegistryClient:
    """Fetches writer schemas by id from a Confluent-compatible schema registry (stdlib HTTP).

    `user:password@` in the URL becomes HTTP basic auth; the password is never logged, and
    never sent to another origin: a redirect to another scheme, host or port is followed
    without the Authorization header (`_CredentialsStayHome`).
    """

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "schema registry URL must be http(s)://[user:password@]host[:port][/path]",
                setting="schema_registry_url",
            )
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # an IPv6 literal keeps its brackets
            netloc = netloc.replace(parts.hostname, f"[{parts.hostname}]", 1)
        self.base_url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/"), "", "")
        )
        self._headers = {"Accept": f"{REGISTRY_CONTENT_TYPE}, application/json"}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_CredentialsStayHome(self.base_url))

    def schema_text(self, schema_id: int) -> str:
        """The writer schema registered under `schema_id`, as JSON text.

        Raises `DecodeError` when the registry does not know the id or the schema is not Avro,
        `SchemaRegistryError` when the registry cannot be asked or answers nonsense.
        """
        started = time.monotonic()
        text = self._avro_schema_text(schema_id, self._fetch(schema_id, started))
        log.info(
            "schema_fetched",
            schema_id=schema_id,
            registry=self.base_url,
            seconds=round(time.monotonic() - started, 4),
        )
        return text

    def _fetch(self, schema_id: int, started: float) -> bytes:
        """The registry's answer body for `GET /schemas/ids/{schema_id}`."""
        url = f"{self.base_url}/schemas/ids/{schema_id}"
        # The scheme was checked to be http(s) in __init__.
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310
        try:
            with self._opener.open(request, timeout=self._timeout_s) as answer:
                body: bytes = answer.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(schema_id, exc) from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset
            raise SchemaRegistryError(
                f"schema registry unreachable: {exc}",
                registry=self.base_url,
                schema_id=schema_id,
                waited_s=round(time.monotonic() - started, 3),
            ) from exc
        return body

    def _http_error(
        self, schema_id: int, error: urllib.error.HTTPError
    ) -> DecodeError | SchemaRegistryError:
        """What an HTTP error answer means: 404 is an unknown id (the record's fault), anything
        else is the registry's."""
        reason = _registry_message(error)
        if error.code == HTTPStatus.NOT_FOUND:
            return DecodeError(
                f"unknown schema id {schema_id} (registry answered 404: {reason})",
                field="schema id",
                schema_id=schema_id,
            )
        return SchemaRegistryError(
            f"schema registry answered {error.code}: {reason}",
            registry=self.base_url,
            schema_id=schema_id,
        )

    def _avro_schema_text(self, schema_id: int, body: bytes) -> str:
        """The Avro schema text in the registry's 200 answer `body`."""
        try:
            answer_json = json.loads(body)
            text = answer_json["schema"]
            kind = answer_json.get("schemaType", "AVRO")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SchemaRegistryError(
                "schema registry answered 200 without a schema",
                registry=self.base_url,
                schema_id=schema_id,
            ) from exc
        if kind != "AVRO":
            raise DecodeError(
                f"schema id {schema_id} is a {kind} schema, not AVRO",
                field="schema id",
                schema_id=schema_id,
                schema_type=kind,
            )
        if not isinstance(text, str):
            raise SchemaRegistryError(
                "schema registry answered a schema that is not a string",
                registry=self.base_url,
                schema_id=schema_id,
            )
        return text


class _CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    """Follows the registry's redirects, but drops the Authorization header from a redirected
    request to another origin (scheme, host, port). urllib would send it anywhere."""

    def __init__(self, registry: str) -> None:
        self._registry = registry  # for the log, without credentials

    def redirect_request(  # noqa: PLR0917 - urllib's signature, positional as it calls it
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is not None and _origin(newurl) != _origin(req.full_url):
            dropped = redirected.has_header("Authorization")
            redirected.remove_header("Authorization")
            log.warning(
                "schema_registry_redirected_elsewhere",
                registry=self._registry,
                status=code,
                redirected_to=_without_credentials(newurl),
                credentials_dropped=dropped,
            )
        return redirected


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of `url`: where a request goes, as far as credentials care."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # not a port number: an origin like no other
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def _without_credentials(url: str) -> str:
    """`url` without its user:password@ and query: fit for a log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _registry_message(error: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(error.read())["message"]
    except Exception:  # any body that is not the registry's error JSON: use the HTTP reason
        return str(error.reason)
    return str(message)


class RegistryAvroDecoder:
    """Decoder `avro`: Confluent-framed values, writer schemas from a schema registry."""

    def __init__(
        self,
        registry: SchemaRegistryClient,
        reader: ReaderSchema | None,
        *,
        max_nesting_depth: int = DEFAULT_MAX_NESTING_DEPTH,
    ) -> None:
        self._registry = registry
        self._reader = reader
        self._max_depth = check_max_nesting_depth(max_nesting_depth)
        self._plans: dict[bytes, _Plan] = {}  # by the 4 id bytes of the Confluent header
        self._unknown_ids = _UnknownIds(_UNKNOWN_IDS_KEPT, _UNKNOWN_ID_RETRY_S)
        # Only a cache miss takes the lock, so two threads never fetch the same id twice.
        self._fetch_lock = threading.Lock()

    def __call__(self, value: bytes | None) -> Any:
        if value is None:
            return None
        if value[:1] != b"\x00":
            raise DecodeError(
                f"bad magic byte {_first_byte(value)} expected 0x00 (Confluent wire format)",
                field="magic byte",
            )
        # Keyed by the id's 4 bytes as they are: a hit needs no int conversion.
        plan = self._plans.get(value[1:CONFLUENT_HEADER_SIZE])
        if plan is None:
            plan = self._plan_for(value)
        return _read(value, CONFLUENT_HEADER_SIZE, plan)

    def _plan_for(self, value: bytes) -> _Plan:
        schema_id = _confluent_id(value)
        key = value[1:CONFLUENT_HEADER_SIZE]
        with self._fetch_lock:
            plan = self._plans.get(key)
            if plan is not None:
                return plan
            unknown = self._unknown_ids.message(schema_id)
            if unknown is not None:
                raise DecodeError(unknown, field="schema id", schema_id=schema_id)
            try:
                text = self._registry.schema_text(schema_id)
            except DecodeError as exc:
                self._unknown_ids.remember(schema_id, exc.message)
                raise
            try:
                writer = parse_schema(text)
            except Exception as exc:  # fastavro's parse errors have no common base
                raise DecodeError(
                    f"writer schema id {schema_id} from the registry is not a valid Avro "
                    f"schema: {exc}",
                    field="schema id",
                    schema_id=schema_id,
                ) from exc
            label = f"writer schema id {schema_id} ({schema_name(writer)})"
            plan = _plan(writer, label, self._reader, self._max_depth)
            self._plans[key] = plan
            return plan


class _UnknownIds:
    """Schema ids the registry does not know (or knows as another schema type): each answer
    stands for `retry_after_s`, and only the `kept` most recently met ids are remembered.
    Used under the decoder's fetch lock."""

    def __init__(self, kept: int, retry_after_s: float) -> None:
        self._kept = kept
        self._retry_after_s = retry_after_s
        # Schema id -> until when the registry's answer stands, and its message; oldest first.
        self._until: OrderedDict[int, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def message(self, schema_id: int) -> str | None:
        """The registry's answer for `schema_id` if it still stands, else None."""
        found = self._until.get(schema_id)
        if found is None:
            return None
        if time.monotonic() >= found[0]:
            del self._until[schema_id]
            return None
        self._until.move_to_end(schema_id)
        return found[1]

    def remember(self, schema_id: int, message: str) -> None:
        self._until[schema_id] = (time.monotonic() + self._retry_after_s, message)
        self._until.move_to_end(schema_id)
        while len(self._until) > self._kept:
            self._until.popitem(last=False)


def _first_byte(value: bytes) -> str:
    return f"0x{value[0]:02x}" if value else "(empty value)"


# --- decoder "avro-local": schemas from a directory ----------------------------------------


@dataclass(frozen=True, slots=True)
class LocalSchema:
    path: Path
    schema: ParsedSchema
    fingerprint: bytes
    schema_id: int | None  # from a file named NAME.ID.avsc


def load_schema_dir(directory: Path) -> list[LocalSchema]:
    """Every `*.avsc` under `directory` (recursively), parsed and fingerprinted."""
    if not directory.is_dir():
        raise ConfigError(
            "Avro schema directory does not exist or is not a directory",
            setting="schema_dir",
            path=str(directory),
        )
    schemas: list[LocalSchema] = []
    for path in sorted(directory.rglob("*.avsc")):
        schema = load_schema_file(path, setting="schema_dir")
        id_match = _ID_IN_FILE_NAME.search(path.stem)
        schema_id = int(id_match.group(1)) if id_match else None
        schemas.append(LocalSchema(path, schema, schema_fingerprint(schema), schema_id))
    if not schemas:
        raise ConfigError(
            "Avro schema directory holds no *.avsc files", setting="schema_dir", path=str(directory)
        )
    return schemas


class LocalAvroDecoder:
    """Decoder `avro-local`: single-object encoded values (and Confluent framing for schema
    files named NAME.ID.avsc), writer schemas from the `*.avsc` files of a directory."""

    def __init__(
        self,
        directory: Path,
        schemas: list[LocalSchema],
        reader: ReaderSchema | None,
        *,
        max_nesting_depth: int = DEFAULT_MAX_NESTING_DEPTH,
    ) -> None:
        self._directory = directory
        max_depth = check_max_nesting_depth(max_nesting_depth)
        self._by_fingerprint: dict[bytes, _Plan] = {}
        self._by_id: dict[int, _Plan] = {}
        first_of: dict[bytes, LocalSchema] = {}
        id_owner: dict[int, LocalSchema] = {}
        for local in schemas:
            plan = _plan(local.schema, f"writer schema {local.path.name}", reader, max_depth)
            earlier = first_of.setdefault(local.fingerprint, local)
            # The same canonical form in two files is one wire format; it is only ambiguous
            # when what is dropped from the canonical form (logical types, defaults) differs.
            if earlier is not local and earlier.schema != local.schema:
                raise ConfigError(
                    "two Avro schema files have the same fingerprint but differ",
                    setting="schema_dir",
                    files=[str(earlier.path), str(local.path)],
                    fingerprint=local.fingerprint.hex(),
                )
            self._by_fingerprint.setdefault(local.fingerprint, plan)
            if local.schema_id is not None:
                owner = id_owner.setdefault(local.schema_id, local)
                if owner is not local:
                    raise ConfigError(
                        f"two Avro schema files claim schema id {local.schema_id}",
                        setting="schema_dir",
                        files=[str(owner.path), str(local.path)],
                    )
                self._by_id[local.schema_id] = plan
        log.info(
            "schema_dir_loaded",
            schema_dir=str(directory),
            schemas=len(self._by_fingerprint),
            ids=sorted(self._by_id),
        )

    def __call__(self, value: bytes | None) -> Any:
        if value is None:
            return None
        if value[:2] == SINGLE_OBJECT_MAGIC:
            if len(value) < SINGLE_OBJECT_HEADER_SIZE:
                raise DecodeError(
                    f"value truncated: {len(value)} bytes, shorter than the 10-byte "
                    "single-object header",
                    field="fingerprint",
                )
            key = value[2:SINGLE_OBJECT_HEADER_SIZE]
            plan = self._by_fingerprint.get(key)
            if plan is None:
                raise DecodeError(
                    f"unknown schema fingerprint {key.hex()}: no *.avsc file in "
                    f"{self._directory} has it",
                    field="fingerprint",
                )
            return _read(value, SINGLE_OBJECT_HEADER_SIZE, plan)
        if value[:1] == b"\x00":
            schema_id = _confluent_id(value)
            plan = self._by_id.get(schema_id)
            if plan is None:
                raise DecodeError(
                    f"unknown schema id {schema_id}: no file named *.{schema_id}.avsc in "
                    f"{self._directory}",
                    field="schema id",
                    schema_id=schema_id,
                )
            return _read(value, CONFLUENT_HEADER_SIZE, plan)
        raise DecodeError(
            f"bad magic byte {_first_byte(value)} expected 0xc3 0x01 (Avro single-object "
            "encoding) or 0x00 (Confluent wire format)",
            field="magic byte",
        )
