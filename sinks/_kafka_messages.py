"""The Kafka sink's output messages: one per row.

Message format of an output row (`encode_row` / `decode_row`):
    value   the row as a JSON object (UTF-8), every column of the table; `bytes` columns base64
    key     a JSON object of the table's key columns (so a key always lands on one partition)
    header  `offsetkeeper-table`: the table's name

Both are strict JSON (`sinks._json_rows`): a value JSON cannot hold (NaN, an infinity, a lone
surrogate) is a `RowsRefusedError` naming the table and column.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from consumer import SinkError, Table
from sinks._json_rows import row_json

TABLE_HEADER = "offsetkeeper-table"


def encode_row(table: Table, row: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of the message for one output row. See the module docstring."""
    return row_json(table, row, table.key), row_json(table, row, tuple(table.columns))


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
