"""consumer.decoding.avro: both framings, schema evolution, bad inputs, the registry, its cache."""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import avro.schema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import ConfigError, DecodeError, Record, Row
from consumer.core.errors import SchemaRegistryError
from consumer.decoding import avro as avro_module
from consumer.decoding.avro import (
    RegistryAvroDecoder,
    encode_confluent,
    encode_single_object,
    parse_schema,
    schema_fingerprint,
)
from consumer.decoding.decoders import DecodeOptions, Decoder, decoder_for
from consumer.examples import orders_avro
from schemas import examples_dir
from tests.fixtures.schema_registry import FakeSchemaRegistry

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
V1_FILE, V2_FILE = EXAMPLES / "orders-v1.avsc", EXAMPLES / "orders-v2.avsc"
V1: dict[str, Any] = json.loads(V1_FILE.read_text())
V2: dict[str, Any] = json.loads(V2_FILE.read_text())
# Incompatible with both: amount_cents becomes a string (no promotion from int or long).
V_STRING_AMOUNT: dict[str, Any] = {
    **V2,
    "fields": [{**f, "type": "string"} if f["name"] == "amount_cents" else f for f in V2["fields"]],
}


def v1_order(n: int, coupon: str | None = None) -> dict[str, Any]:
    return {
        "order_id": f"o-{n}",
        "customer": f"c-{n % 7}",
        "amount_cents": 100 + n,
        "status": "paid",
        "coupon": coupon,
    }


def v2_order(n: int, currency: str = "USD") -> dict[str, Any]:
    return {
        "order_id": f"o-{n}",
        "customer": f"c-{n % 7}",
        "amount_cents": 2**40 + n,  # only fits in v2's long
        "status": "shipped",
        "currency": currency,
    }


def as_v2(order: dict[str, Any]) -> dict[str, Any]:
    """A v1 order as reader schema v2 sees it: coupon dropped, currency defaulted."""
    read = {k: v for k, v in order.items() if k != "coupon"}
    read.setdefault("currency", "EUR")
    return read


@pytest.fixture
def registry() -> Iterator[FakeSchemaRegistry]:
    with FakeSchemaRegistry() as fake:
        yield fake


def registry_decoder(
    registry: FakeSchemaRegistry, reader: Path | None = V2_FILE, **options: Any
) -> Decoder:
    return decoder_for(
        "avro",
        DecodeOptions(schema_registry_url=registry.url, reader_schema=reader, **options),
    )


def local_decoder(schema_dir: Path = EXAMPLES, reader: Path | None = V2_FILE) -> Decoder:
    return decoder_for("avro-local", DecodeOptions(schema_dir=schema_dir, reader_schema=reader))


def write_schema(path: Path, schema: Any) -> Path:
    path.write_text(json.dumps(schema))
    return path


# --- evolution ------------------------------------------------------------------------------


def test_registry_v1_and_v2_interleaved_read_as_v2(registry: FakeSchemaRegistry) -> None:
    id1, id2 = registry.register("orders-value", V1), registry.register("orders-value", V2)
    assert (id1, id2) == (1, 2)
    decode = registry_decoder(registry)
    values, expected = [], []
    for n in range(40):
        if n % 3:
            order = v1_order(n, coupon="SPRING" if n % 2 else None)
            values.append(encode_confluent(V1, id1, order))
            expected.append(as_v2(order))
        else:
            order = v2_order(n, currency="CHF")
            values.append(encode_confluent(V2, id2, order))
            expected.append(order)
    decoded = [decode(value) for value in values]
    assert decoded == expected
    # v1's int amounts arrive as v2's longs: same Python int; v2's exceed 32 bits.
    assert decoded[1] == {**as_v2(v1_order(1, "SPRING")), "currency": "EUR"}
    assert decoded[0]["amount_cents"] == 2**40
    assert "coupon" not in decoded[1]


def test_registry_without_reader_schema_reads_as_written(registry: FakeSchemaRegistry) -> None:
    id1, id2 = registry.register("orders-value", V1), registry.register("orders-value", V2)
    decode = registry_decoder(registry, reader=None)
    assert decode(encode_confluent(V1, id1, v1_order(1, "X"))) == v1_order(1, "X")
    assert decode(encode_confluent(V2, id2, v2_order(2))) == v2_order(2)


def test_local_single_object_v1_and_v2_interleaved_read_as_v2() -> None:
    decode = local_decoder()
    orders = [v1_order(n, "C") if n % 2 else v2_order(n) for n in range(20)]
    values = [encode_single_object(V1 if n % 2 else V2, o) for n, o in enumerate(orders)]
    assert [decode(value) for value in values] == [
        as_v2(o) if n % 2 else o for n, o in enumerate(orders)
    ]


def test_local_reads_confluent_framing_for_files_named_with_an_id(tmp_path: Path) -> None:
    shutil.copy(V1_FILE, tmp_path / "orders.11.avsc")
    shutil.copy(V2_FILE, tmp_path / "orders.12.avsc")
    decode = local_decoder(tmp_path)
    assert decode(encode_confluent(V1, 11, v1_order(1))) == as_v2(v1_order(1))
    assert decode(encode_confluent(V2, 12, v2_order(2))) == v2_order(2)
    # The same files still serve single-object encoding.
    assert decode(encode_single_object(V1, v1_order(3))) == as_v2(v1_order(3))
    with pytest.raises(DecodeError, match=r"unknown schema id 13: no file named \*\.13\.avsc"):
        decode(encode_confluent(V2, 13, v2_order(4)))


def test_the_examples_reader_schema_is_used_even_when_writer_equals_reader() -> None:
    decode = local_decoder()
    assert decode(encode_single_object(V2, v2_order(5, "GBP"))) == v2_order(5, "GBP")


def test_promotions_int_to_long_float_double_and_string_bytes(tmp_path: Path) -> None:
    def record(types: list[str]) -> dict[str, Any]:
        fields = [{"name": f"f{i}", "type": t} for i, t in enumerate(types)]
        return {"type": "record", "name": "P", "fields": fields}

    writer = record(["int", "int", "long", "float", "string", "bytes"])
    reader = record(["long", "double", "float", "double", "bytes", "string"])
    (tmp_path / "schemas").mkdir()
    write_schema(tmp_path / "schemas" / "p.avsc", writer)
    reader_file = write_schema(tmp_path / "reader.avsc", reader)
    value = {"f0": 7, "f1": 3, "f2": 2**40, "f3": 1.5, "f4": "ü", "f5": b"ok"}
    decoded = local_decoder(tmp_path / "schemas", reader_file)(encode_single_object(writer, value))
    assert decoded == {"f0": 7, "f1": 3.0, "f2": float(2**40), "f3": 1.5, "f4": "ü".encode(),
                       "f5": "ok"}  # fmt: skip
    assert isinstance(decoded["f1"], float)


def test_tombstones_decode_to_none(registry: FakeSchemaRegistry) -> None:
    assert registry_decoder(registry)(None) is None
    assert local_decoder()(None) is None
    assert sum(registry.requests.values()) == 0


# --- bad records: DecodeError with a message that says what is wrong --------------------------


def test_bad_magic_byte(registry: FakeSchemaRegistry) -> None:
    with pytest.raises(DecodeError, match=r"bad magic byte 0x7b expected 0x00") as caught:
        registry_decoder(registry)(b'{"order_id": "o-1"}')
    assert caught.value.field == "magic byte"
    with pytest.raises(DecodeError, match=r"bad magic byte \(empty value\)"):
        registry_decoder(registry)(b"")
    with pytest.raises(DecodeError, match=r"bad magic byte 0x7b expected 0xc3 0x01") as local:
        local_decoder()(b'{"order_id": "o-1"}')
    assert local.value.field == "magic byte"


def test_header_shorter_than_its_framing(registry: FakeSchemaRegistry) -> None:
    with pytest.raises(DecodeError, match="shorter than the 5-byte Confluent header") as caught:
        registry_decoder(registry)(b"\x00\x00\x01")
    assert caught.value.field == "schema id"
    with pytest.raises(DecodeError, match="shorter than the 10-byte single-object header"):
        local_decoder()(b"\xc3\x01\x99")


def test_unknown_schema_id_is_a_decode_error_asked_once(registry: FakeSchemaRegistry) -> None:
    decode = registry_decoder(registry)
    value = encode_confluent(V1, 42, v1_order(1))
    for _ in range(3):
        with pytest.raises(
            DecodeError, match=r"unknown schema id 42 \(registry answered 404: Schema not found\)"
        ) as caught:
            decode(value)
        assert caught.value.field == "schema id"
        assert caught.value.context["schema_id"] == 42
    assert registry.fetches(42) == 1, "a 404 stands for a while: a burst of bad records is cheap"


def test_unknown_fingerprint_is_named_in_hex() -> None:
    other = {**V2, "name": "Refund"}
    value = encode_single_object(other, v2_order(1))
    fingerprint = schema_fingerprint(parse_schema(other)).hex()
    with pytest.raises(DecodeError, match=f"unknown schema fingerprint {fingerprint}") as caught:
        local_decoder()(value)
    assert caught.value.field == "fingerprint"


@pytest.mark.parametrize("reader", [None, V2_FILE], ids=["as-written", "resolved-to-v2"])
def test_every_truncation_is_caught(registry: FakeSchemaRegistry, reader: Path | None) -> None:
    # Resolving to v2 skips v1's coupon: a cut inside it must still be caught.
    schema_id = registry.register("orders-value", V1)
    value = encode_confluent(V1, schema_id, v1_order(1, "COUPON"))
    decode = registry_decoder(registry, reader)
    for end in range(5, len(value)):
        with pytest.raises(
            DecodeError, match=r"value truncated: not valid Avro for writer schema id 1 \("
        ):
            decode(value[:end])
    single = encode_single_object(V1, v1_order(1, "COUPON"))
    decode_local = local_decoder(EXAMPLES, reader)
    for end in range(10, len(single)):
        with pytest.raises(DecodeError, match=r"value truncated: .* orders-v1\.avsc"):
            decode_local(single[:end])


def test_garbage_body(registry: FakeSchemaRegistry) -> None:
    schema_id = registry.register("orders-value", V1)
    # Union index 63 (zigzag 0x7e) where orders-v1's coupon has two branches, then more bytes.
    body = encode_confluent(V1, schema_id, v1_order(1))[:-1] + b"\x7e\x02ab"
    with pytest.raises(
        DecodeError, match=r"value is not valid Avro for writer schema id 1 \(.*IndexError"
    ):
        registry_decoder(registry)(body)
    # A string whose bytes are not UTF-8.
    broken = encode_confluent(V1, schema_id, {**v1_order(1), "order_id": "\x00\x00"})
    broken = broken.replace(b"\x04\x00\x00", b"\x04\xff\xfe", 1)
    with pytest.raises(DecodeError, match=r"not valid Avro .*UnicodeDecodeError"):
        registry_decoder(registry)(broken)


def test_bytes_left_after_the_record_are_refused(registry: FakeSchemaRegistry) -> None:
    schema_id = registry.register("orders-value", V1)
    value = encode_confluent(V1, schema_id, v1_order(1)) + b"\x00\x00"
    with pytest.raises(DecodeError, match="2 bytes left after the record"):
        registry_decoder(registry)(value)


def test_incompatible_writer_and_reader_names_both(
    registry: FakeSchemaRegistry, tmp_path: Path
) -> None:
    reader = write_schema(tmp_path / "amount-as-string.avsc", V_STRING_AMOUNT)
    schema_id = registry.register("orders-value", V1)
    with pytest.raises(DecodeError) as caught:
        registry_decoder(registry, reader)(encode_confluent(V1, schema_id, v1_order(1)))
    message = str(caught.value)
    assert "writer schema id 1 (offsetkeeper.examples.Order) cannot be read as reader schema" in (
        message
    )
    assert "offsetkeeper.examples.Order (" + str(reader) + ")" in message
    assert "int is not string" in message


def test_reader_field_without_default_is_named(tmp_path: Path) -> None:
    needs_region = {**V2, "fields": [*V2["fields"], {"name": "region", "type": "string"}]}
    reader = write_schema(tmp_path / "needs-region.avsc", needs_region)
    with pytest.raises(
        DecodeError, match=r"writer schema orders-v1\.avsc cannot be read as reader schema"
    ) as caught:
        local_decoder(EXAMPLES, reader)(encode_single_object(V1, v1_order(1)))
    assert caught.value.field == "region"
    assert "No default value for field region" in str(caught.value)


def test_a_non_avro_schema_type_is_a_decode_error(registry: FakeSchemaRegistry) -> None:
    schema_id = registry.register("orders-value", 'syntax = "proto3"; message M {}', "PROTOBUF")
    with pytest.raises(DecodeError, match=f"schema id {schema_id} is a PROTOBUF schema, not AVRO"):
        registry_decoder(registry)(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02")


def test_an_invalid_avro_schema_in_the_registry_is_a_decode_error(
    registry: FakeSchemaRegistry,
) -> None:
    schema_id = registry.register("broken", {"type": "record", "name": "B", "fields": "none"})
    with pytest.raises(DecodeError, match="writer schema id 1 from the registry is not a valid"):
        registry_decoder(registry)(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02")


# --- registry outages are SchemaRegistryError, never DecodeError ------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_registry_5xx_is_a_registry_error(registry: FakeSchemaRegistry, status: int) -> None:
    schema_id = registry.register("orders-value", V1)
    value = encode_confluent(V1, schema_id, v1_order(1))
    decode = registry_decoder(registry)
    registry.fail_with(status)
    with pytest.raises(SchemaRegistryError, match=f"schema registry answered {status}") as caught:
        decode(value)
    assert not isinstance(caught.value, DecodeError)
    assert caught.value.context["schema_id"] == schema_id
    # The outage is not remembered: once the registry is back, the same record decodes.
    registry.fail_with(None)
    assert decode(value) == as_v2(v1_order(1))


def test_a_registry_that_stalls_past_the_timeout(registry: FakeSchemaRegistry) -> None:
    schema_id = registry.register("orders-value", V1)
    registry.stall(1.0)
    decode = registry_decoder(registry, registry_timeout_s=0.2)
    with pytest.raises(SchemaRegistryError, match="schema registry unreachable"):
        decode(encode_confluent(V1, schema_id, v1_order(1)))


def test_a_registry_nobody_listens_on() -> None:
    closed = FakeSchemaRegistry().start()
    url = closed.url
    closed.close()
    decode = decoder_for("avro", DecodeOptions(schema_registry_url=url))
    with pytest.raises(SchemaRegistryError, match="schema registry unreachable") as caught:
        decode(encode_confluent(V1, 1, v1_order(1)))
    assert caught.value.context["registry"] == url


def test_credentials_from_the_url_are_sent_and_never_logged(
    registry: FakeSchemaRegistry, log_events: list[MutableMapping[str, Any]]
) -> None:
    schema_id = registry.register("orders-value", V1)
    registry.require_auth("svc", "p@ss:word")
    value = encode_confluent(V1, schema_id, v1_order(1))
    with pytest.raises(SchemaRegistryError, match="answered 401"):
        registry_decoder(registry)(value)
    authed = registry.url.replace("http://", "http://svc:p%40ss%3Aword@")
    decode = decoder_for("avro", DecodeOptions(schema_registry_url=authed))
    assert decode(value) == v1_order(1)
    fetched = [event for event in log_events if event["event"] == "schema_fetched"]
    assert fetched == [
        {
            "event": "schema_fetched",
            "log_level": "info",
            "schema_id": schema_id,
            "registry": registry.url,
            "seconds": fetched[0]["seconds"],
        }
    ]
    assert "p@ss" not in repr(log_events)


BASIC_SVC = "Basic " + base64.b64encode(b"svc:s3cret").decode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_does_not_carry_the_credentials(
    registry: FakeSchemaRegistry, status: int, log_events: list[MutableMapping[str, Any]]
) -> None:
    with FakeSchemaRegistry() as elsewhere:  # another local server: another port
        schema_id = elsewhere.register("orders-value", V1)
        registry.redirect_next(elsewhere.url, status)
        authed = registry.url.replace("http://", "http://svc:s3cret@")
        decode = decoder_for("avro", DecodeOptions(schema_registry_url=authed))
        assert decode(encode_confluent(V1, schema_id, v1_order(1))) == v1_order(1)
    path = f"/schemas/ids/{schema_id}"
    assert [(p, h.get("authorization")) for p, h in registry.received] == [(path, BASIC_SVC)]
    assert [p for p, _h in elsewhere.received] == [path]
    assert "authorization" not in elsewhere.received[0][1], "the credentials stayed home"
    redirected = [e for e in log_events if e["event"] == "schema_registry_redirected_elsewhere"]
    assert redirected == [
        {
            "event": "schema_registry_redirected_elsewhere",
            "log_level": "warning",
            "registry": registry.url,
            "status": status,
            "redirected_to": elsewhere.url + path,
            "credentials_dropped": True,
        }
    ]
    assert "s3cret" not in repr(log_events)


def test_another_origin_that_wants_credentials_gets_none(registry: FakeSchemaRegistry) -> None:
    with FakeSchemaRegistry() as elsewhere:
        schema_id = elsewhere.register("orders-value", V1)
        elsewhere.require_auth("svc", "s3cret")  # it would accept them: they are still not sent
        registry.redirect_next(elsewhere.url, 302)
        authed = registry.url.replace("http://", "http://svc:s3cret@")
        decode = decoder_for("avro", DecodeOptions(schema_registry_url=authed))
        with pytest.raises(SchemaRegistryError, match="answered 401"):
            decode(encode_confluent(V1, schema_id, v1_order(1)))
    assert "authorization" not in elsewhere.received[0][1]


def test_a_redirect_within_the_registry_keeps_the_credentials(
    registry: FakeSchemaRegistry, log_events: list[MutableMapping[str, Any]]
) -> None:
    schema_id = registry.register("orders-value", V1)
    registry.require_auth("svc", "s3cret")
    registry.redirect_next(registry.url, 307)  # same scheme, host and port
    authed = registry.url.replace("http://", "http://svc:s3cret@")
    decode = decoder_for("avro", DecodeOptions(schema_registry_url=authed))
    assert decode(encode_confluent(V1, schema_id, v1_order(1))) == v1_order(1)
    assert [h.get("authorization") for _p, h in registry.received] == [BASIC_SVC, BASIC_SVC]
    assert not [e for e in log_events if e["event"] == "schema_registry_redirected_elsewhere"]


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("http://Registry.Example/a", "http://registry.example:80/b", True),
        ("https://registry.example/a", "https://registry.example:443/b", True),
        ("http://registry.example/a", "https://registry.example/a", False),
        ("http://registry.example/a", "http://registry.example:8081/a", False),
        ("http://registry.example/a", "http://registry.example.evil/a", False),
        ("http://127.0.0.1:8081/a", "http://localhost:8081/a", False),
        ("http://registry.example/a", "http://registry.example:port/a", False),
    ],
)
def test_what_counts_as_the_same_origin(first: str, second: str, same: bool) -> None:
    assert (avro_module._origin(first) == avro_module._origin(second)) is same


# --- caching --------------------------------------------------------------------------------


def test_one_registry_request_per_schema_id(registry: FakeSchemaRegistry) -> None:
    id1, id2 = registry.register("orders-value", V1), registry.register("orders-value", V2)
    decode = registry_decoder(registry)
    values = [
        encode_confluent(V1, id1, v1_order(n)) if n % 2 else encode_confluent(V2, id2, v2_order(n))
        for n in range(10_000)
    ]
    decoded = [decode(value) for value in values]
    assert decoded[9_999] == as_v2(v1_order(9_999))
    assert decoded[9_998] == v2_order(9_998)
    assert registry.fetches(id1) == 1
    assert registry.fetches(id2) == 1
    assert sum(registry.requests.values()) == 2


def _unknown(decode: Decoder, schema_id: int) -> None:
    with pytest.raises(DecodeError, match=f"unknown schema id {schema_id} "):
        decode(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02")


def test_unknown_ids_remembered_are_bounded_the_most_recent_kept(
    registry: FakeSchemaRegistry,
) -> None:
    decode = registry_decoder(registry, reader=None)
    assert isinstance(decode, RegistryAvroDecoder)
    kept = avro_module._UNKNOWN_IDS_KEPT
    assert kept == 1024
    started = time.monotonic()
    for schema_id in range(100_000, 100_000 + kept + 200):  # a stream of random ids
        _unknown(decode, schema_id)
    assert len(decode._unknown_ids) == kept, "no more than the bound, whatever comes"
    assert time.monotonic() - started < 20
    asked = sum(registry.requests.values())
    # The most recent ids still stand: no request.
    for schema_id in range(100_000 + 200, 100_000 + kept + 200):
        _unknown(decode, schema_id)
    assert sum(registry.requests.values()) == asked
    # The first ones were pushed out: asked for again (and remembered again).
    _unknown(decode, 100_000)
    _unknown(decode, 100_000)
    assert registry.fetches(100_000) == 2
    assert len(decode._unknown_ids) == kept


def test_a_remembered_unknown_id_is_used_and_kept_over_newer_ones(
    registry: FakeSchemaRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(avro_module, "_UNKNOWN_IDS_KEPT", 3)
    decode = registry_decoder(registry, reader=None)
    for schema_id in (1, 2, 3):
        _unknown(decode, schema_id)
    _unknown(decode, 1)  # met again: now the most recent
    _unknown(decode, 4)  # pushes out 2, the least recently met
    _unknown(decode, 1)
    _unknown(decode, 3)
    _unknown(decode, 2)
    assert [registry.fetches(i) for i in (1, 2, 3, 4)] == [1, 2, 1, 1]


def test_an_unknown_id_is_asked_for_again_after_its_time(
    registry: FakeSchemaRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(avro_module, "_UNKNOWN_ID_RETRY_S", 0.2)
    decode = registry_decoder(registry, reader=None)
    _unknown(decode, 7)
    _unknown(decode, 7)
    assert registry.fetches(7) == 1
    # Registered meanwhile (ids are given in order): once the 404 has had its time, the
    # record decodes.
    schemas = [{**V1, "name": f"Order{n}"} for n in range(1, 8)]
    assert [registry.register("late-value", schema) for schema in schemas][-1] == 7
    _unknown(decode, 7)
    time.sleep(0.3)
    assert decode(encode_confluent(schemas[-1], 7, v1_order(1))) == v1_order(1)
    assert registry.fetches(7) == 2


# --- configuration errors -------------------------------------------------------------------


def test_avro_without_a_registry_url() -> None:
    with pytest.raises(ConfigError, match="needs a schema registry URL") as caught:
        decoder_for("avro", DecodeOptions())
    assert caught.value.context["setting"] == "schema_registry_url"
    with pytest.raises(ConfigError, match="needs a schema registry URL"):
        decoder_for("avro")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "registry:8081", "http://"])
def test_a_registry_url_that_is_not_http(url: str) -> None:
    with pytest.raises(ConfigError, match=r"must be http\(s\)://") as caught:
        decoder_for("avro", DecodeOptions(schema_registry_url=url))
    assert url not in str(caught.value), "a URL may carry a password; it is not echoed"


def test_avro_local_without_or_with_a_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a schema directory"):
        decoder_for("avro-local", DecodeOptions())
    with pytest.raises(ConfigError, match="does not exist or is not a directory") as missing:
        decoder_for("avro-local", DecodeOptions(schema_dir=tmp_path / "nope"))
    assert missing.value.context["path"] == str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"holds no \*\.avsc files"):
        decoder_for("avro-local", DecodeOptions(schema_dir=tmp_path))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "Avro schema file is not JSON"),
        ('{"type": "record", "name": "R", "fields": [{"name": "x"}]}', "not a valid schema"),
        ('{"type": "nosuchtype"}', "not a valid schema"),
    ],
)
def test_an_invalid_schema_file_is_named(tmp_path: Path, content: str, problem: str) -> None:
    bad = tmp_path / "bad.avsc"
    bad.write_text(content)
    shutil.copy(V1_FILE, tmp_path / "good.avsc")
    with pytest.raises(ConfigError, match=problem) as in_dir:
        local_decoder(tmp_path, reader=None)
    assert in_dir.value.context == {"setting": "schema_dir", "path": str(bad)}
    with pytest.raises(ConfigError, match=problem) as as_reader:
        local_decoder(EXAMPLES, reader=bad)
    assert as_reader.value.context == {"setting": "reader_schema", "path": str(bad)}


def test_an_unreadable_reader_schema_file(tmp_path: Path, registry: FakeSchemaRegistry) -> None:
    with pytest.raises(ConfigError, match="cannot read Avro schema file") as caught:
        registry_decoder(registry, tmp_path / "missing.avsc")
    assert caught.value.context["path"] == str(tmp_path / "missing.avsc")


def test_schema_files_that_clash(tmp_path: Path) -> None:
    shutil.copy(V1_FILE, tmp_path / "a.5.avsc")
    shutil.copy(V2_FILE, tmp_path / "b.5.avsc")
    with pytest.raises(ConfigError, match="two Avro schema files claim schema id 5"):
        local_decoder(tmp_path)
    (tmp_path / "b.5.avsc").unlink()
    # Same canonical form, different logical type: the fingerprint cannot tell them apart.
    plain = {"type": "record", "name": "T", "fields": [{"name": "at", "type": "long"}]}
    timed = {**plain, "fields": [{"name": "at", "type": {"type": "long", "logicalType":
                                                          "timestamp-millis"}}]}  # fmt: skip
    write_schema(tmp_path / "plain.avsc", plain)
    write_schema(tmp_path / "timed.avsc", timed)
    with pytest.raises(ConfigError, match="same fingerprint but differ"):
        local_decoder(tmp_path)
    # An identical copy is harmless.
    (tmp_path / "timed.avsc").unlink()
    write_schema(tmp_path / "copy.avsc", plain)
    assert local_decoder(tmp_path, reader=None)(encode_single_object(plain, {"at": 3})) == {"at": 3}


# --- the framings themselves ----------------------------------------------------------------


def test_fingerprints_match_the_spec_and_the_avro_package() -> None:
    # The Avro spec's test vector: CRC-64-AVRO of "null" is 7195948357588979594 (a Java long).
    assert int.from_bytes(schema_fingerprint(parse_schema("null")), "little") == (
        7195948357588979594
    )
    for schema in (V1, V2):
        reference = avro.schema.parse(json.dumps(schema)).fingerprint("CRC-64-AVRO")
        assert schema_fingerprint(parse_schema(schema)) == bytes(reference)


def test_encoders_lay_out_the_headers() -> None:
    confluent = encode_confluent(V1, 258, v1_order(1))
    assert confluent[:5] == b"\x00\x00\x00\x01\x02"
    single = encode_single_object(V1, v1_order(1))
    assert single[:2] == b"\xc3\x01"
    assert single[2:10] == schema_fingerprint(parse_schema(V1))
    assert confluent[5:] == single[10:], "the same Avro body behind either header"
    with pytest.raises(ValueError, match="does not fit in 4 bytes"):
        encode_confluent(V1, 2**32, v1_order(1))


# --- the example app ------------------------------------------------------------------------


def process_order(record: Record) -> Row:
    """The example's processor, typed as what it returns: exactly one Row."""
    row = orders_avro.order_row(record)  # type: ignore[call-arg]  # Processor is a union
    assert isinstance(row, Row)
    return row


def test_the_orders_avro_example_writes_v1_and_v2_orders() -> None:
    app = orders_avro.app
    assert app.decode == "avro-local"
    assert app.reader_schema == str(examples_dir() / "orders-v2.avsc")
    assert dict(orders_avro.ORDERS.columns)["currency"] == "text"
    assert app.processor is not None
    decode = local_decoder()
    rows = []
    for offset, value in enumerate(
        [encode_single_object(V1, v1_order(1, "X")), encode_single_object(V2, v2_order(2))]
    ):
        record = Record(
            topic="orders", partition=0, offset=offset, timestamp_ms=None, key=None,
            value=decode(value),
        )  # fmt: skip
        rows.append(process_order(record))
    assert rows == [Row("orders", as_v2(v1_order(1))), Row("orders", v2_order(2))]


# --- property: any order survives encode + decode -------------------------------------------

_text = st.text(max_size=30)
_v1_orders = st.fixed_dictionaries(
    {
        "order_id": _text,
        "customer": _text,
        "amount_cents": st.integers(-(2**31), 2**31 - 1),
        "status": _text,
        "coupon": st.none() | _text,
    }
)
_v2_orders = st.fixed_dictionaries(
    {
        "order_id": _text,
        "customer": _text,
        "amount_cents": st.integers(-(2**63), 2**63 - 1),
        "status": _text,
        "currency": _text,
    }
)


@pytest.fixture(scope="module")
def property_decoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Decoder, Decoder]:
    """avro-local read as v2: over the examples, and over copies named with ids 1 and 2."""
    with_ids = tmp_path_factory.mktemp("schemas-with-ids")
    shutil.copy(V1_FILE, with_ids / "orders.1.avsc")
    shutil.copy(V2_FILE, with_ids / "orders.2.avsc")
    return local_decoder(), local_decoder(with_ids)


@settings(max_examples=200, deadline=None)
@given(orders=st.lists(st.tuples(st.booleans(), _v1_orders, _v2_orders), max_size=5))
def test_random_orders_round_trip_through_both_framings(
    property_decoders: tuple[Decoder, Decoder],
    orders: list[tuple[bool, dict[str, Any], dict[str, Any]]],
) -> None:
    by_fingerprint, by_id = property_decoders
    for is_v1, order_v1, order_v2 in orders:
        schema, order = (V1, order_v1) if is_v1 else (V2, order_v2)
        expected = as_v2(order) if is_v1 else order
        assert by_fingerprint(encode_single_object(schema, order)) == expected
        assert by_id(encode_confluent(schema, 1 if is_v1 else 2, order)) == expected
