"""Value decoders, chosen by name in the app. A failure is a `DecodeError` naming the record."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from consumer._errors import ConfigError, DecodeError

Decoder = Callable[[bytes | None], Any]


def _decode_json(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"value is not valid JSON: {exc}") from exc


def _decode_utf8(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not valid UTF-8: {exc}") from exc


def _decode_bytes(value: bytes | None) -> Any:
    return value


_DECODERS: dict[str, Decoder] = {
    "json": _decode_json,
    "utf8": _decode_utf8,
    "bytes": _decode_bytes,
}


def decoder_for(name: str) -> Decoder:
    try:
        return _DECODERS[name]
    except KeyError:
        raise ConfigError("unknown decoder", decode=name, known=sorted(_DECODERS)) from None
