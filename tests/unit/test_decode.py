"""consumer.decoding.decoders: value decoders by name; failures are DecodeErrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer import ConfigError, DecodeError
from consumer.decoding.decoders import DECODER_NAMES, DecodeOptions, decoder_for


def test_json_decoder() -> None:
    decode = decoder_for("json")
    assert decode(b'{"a": [1, 2.5, null, true], "b": "\\u00fc"}') == {
        "a": [1, 2.5, None, True],
        "b": "ü",
    }
    assert decode(b"3") == 3
    assert decode(None) is None, "a tombstone decodes to None"


@pytest.mark.parametrize("value", [b"", b"{", b"{'a': 1}", b"\xff\xfe", b"NaNx"])
def test_json_decoder_failures_are_decode_errors(value: bytes) -> None:
    with pytest.raises(DecodeError, match="not valid JSON") as caught:
        decoder_for("json")(value)
    assert caught.value.__cause__ is not None


def test_utf8_decoder() -> None:
    decode = decoder_for("utf8")
    assert decode("grüße".encode()) == "grüße"
    assert decode(None) is None
    with pytest.raises(DecodeError, match="not valid UTF-8"):
        decode(b"\xc3\x28")


def test_bytes_decoder_passes_values_through() -> None:
    decode = decoder_for("bytes")
    assert decode(b"\x00\x01") == b"\x00\x01"
    assert decode(None) is None


def test_unknown_decoder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown decoder") as caught:
        decoder_for("avro-magic")
    assert caught.value.context["known"] == ["avro", "avro-local", "bytes", "json", "utf8"]


def test_every_named_decoder_can_be_built_and_decodes_a_tombstone_to_none() -> None:
    options = DecodeOptions(
        schema_registry_url="http://127.0.0.1:1",  # never asked: a tombstone has no schema id
        schema_dir=Path(__file__).resolve().parents[2] / "schemas" / "examples",
    )
    assert DECODER_NAMES == ("json", "utf8", "bytes", "avro", "avro-local")
    for name in DECODER_NAMES:
        assert decoder_for(name, options)(None) is None, name


def test_plain_decoders_ignore_avro_options() -> None:
    options = DecodeOptions(reader_schema=Path("/nonexistent.avsc"))
    assert decoder_for("json", options)(b"[1]") == [1]


@pytest.mark.parametrize(
    ("name", "options", "message", "setting"),
    [
        ("avro", None, "needs a schema registry URL", "schema_registry_url"),
        ("avro", DecodeOptions(schema_registry_url=""), "needs a schema registry", None),
        ("avro-local", None, "needs a schema directory", "schema_dir"),
        ("avro-local", DecodeOptions(schema_dir=Path("/nonexistent")), "not a directory", None),
    ],
)
def test_avro_decoders_without_their_settings_are_config_errors(
    name: str, options: DecodeOptions | None, message: str, setting: str | None
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        decoder_for(name, options)
    if setting is not None:
        assert caught.value.context["setting"] == setting


def test_json_nested_past_the_recursion_limit_is_a_decode_error_naming_the_depth() -> None:
    decode = decoder_for("json")
    with pytest.raises(DecodeError) as refused:
        decode(b"[" * 100_000 + b"]" * 100_000)
    assert refused.value.field == "nesting depth"


_DIRTY_JSON = [
    b'{"a":1,"a":2}',
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"NaN",
    b"Infinity",
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\xed\xa0\x80"',
    b"\xef\xbb\xbf{}",
    b'"a\x01b"',
    b'"\xff"',
    b"-0",
    b"-0.0",
    b'{"k":' + b"9" * 5000 + b"}",
    b'"\\u0000 nul"',
    b"[1,]",
    b"{}garbage",
    '{"é": "ü\U0001f600"}'.encode(),
    '{"é": 1}'.encode("utf-16"),
]


@pytest.mark.parametrize("document", _DIRTY_JSON, ids=lambda d: repr(d[:24]))
def test_the_fast_json_path_decodes_exactly_what_json_loads_does(document: bytes) -> None:
    """msgspec decodes what it accepts, json.loads the rest: the value (or the refusal) is the
    one json.loads gives, integers of any size and lone surrogates included."""
    decode = decoder_for("json")
    try:
        expected = json.loads(document)
    except (ValueError, RecursionError):
        with pytest.raises(DecodeError):
            decode(document)
        return
    got = decode(document)
    assert repr(got) == repr(expected)
    assert type(got) is type(expected)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_document_decodes_to_the_value_json_loads_gives(value: Any) -> None:
    for document in (
        json.dumps(value).encode(),
        json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    ):
        try:
            expected = json.loads(document)
        except ValueError:
            continue  # a lone surrogate written raw is not UTF-8: both refuse it
        assert repr(decoder_for("json")(document)) == repr(expected)
