"""consumer._decode: value decoders by name; failures are DecodeErrors."""

from __future__ import annotations

import pytest

from consumer import ConfigError, DecodeError
from consumer._decode import decoder_for


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
    assert caught.value.context["known"] == ["bytes", "json", "utf8"]
