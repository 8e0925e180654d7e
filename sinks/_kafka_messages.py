"""The Kafka sink's output messages: one per row.

Message format of an output row (`encode_row` / `decode_row`):
    value   the row as a JSON object (UTF-8), every column of the table; `bytes` columns base64
    key     a JSON object of the table's key columns (so a key always lands on one partition)
    header  `offsetkeeper-table`: the table's name
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from consumer import SinkError, Table

TABLE_HEADER = "offsetkeeper-table"


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _column_value(column_type: str, value: Any) -> Any:
    if column_type == "bytes" and value is not None:
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def encode_row(table: Table, row: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of the message for one output row. See the module docstring."""
    key = {column: _column_value(table.columns[column], row.get(column)) for column in table.key}
    value = {
        column: _column_value(column_type, row.get(column))
        for column, column_type in table.columns.items()
    }
    try:
        return _json_bytes(key), _json_bytes(value)
    except (TypeError, ValueError) as exc:
        raise SinkError(
            "a row value cannot be written as JSON", table=table.name, reason=str(exc)
        ) from exc


def decode_row(table: Table, value: bytes) -> dict[str, Any]:
    """The row an output message's value holds (`bytes` columns decoded back to bytes)."""
    try:
        document = json.loads(value)
    except ValueError as exc:
        raise SinkError("output message is not JSON", table=table.name, reason=str(exc)) from exc
    if not isinstance(document, dict):
        raise SinkError("output message is not a JSON object", table=table.name)
    try:
        return {
            column: (
                base64.b64decode(document[column], validate=True)
                if column_type == "bytes" and document.get(column) is not None
                else document.get(column)
            )
            for column, column_type in table.columns.items()
        }
    except (TypeError, ValueError, binascii.Error) as exc:
        raise SinkError(
            "a bytes column of the output message is not base64", table=table.name, reason=str(exc)
        ) from exc
