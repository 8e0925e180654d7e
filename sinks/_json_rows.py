"""Rows as strict JSON, for the sinks that write JSON (the file and Kafka sinks).

A column's value is written as JSON holds it: `bytes` as base64 (standard alphabet, padded),
`json` as the value itself, the rest as they are. JSON has no NaN nor infinities, so these
sinks declare that they cannot store them (`JSON_VALUE_LIMITS`: the engine refuses such a
value before the transaction); a value that still cannot be written (NaN, a lone surrogate,
a set, nesting too deep for the encoder) is the sink's data refusal, `RowsRefusedError`
naming the table and the column, never a silent change such as NaN written as null.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from consumer import RowsRefusedError, Table, ValueLimits

JSON_VALUE_LIMITS = ValueLimits(nan=False, infinity=False)

# What json.dumps and str.encode raise for a value JSON (in UTF-8) cannot hold; bytes() of a
# value that is not bytes raises TypeError (and ValueError for a negative int).
_ENCODING_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)


def json_bytes(document: Any) -> bytes:
    """Compact, strict JSON in UTF-8. Raises TypeError, ValueError (UnicodeEncodeError) or
    RecursionError for what JSON cannot hold."""
    text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _column_value(column_type: str, value: Any) -> Any:
    if column_type == "bytes" and value is not None:
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def _refused(table: Table, column: str | None, exc: Exception) -> RowsRefusedError:
    return RowsRefusedError(
        "a row value cannot be written as JSON",
        table=table.name,
        field=column,
        reason=f"{type(exc).__name__}: {exc}",
    )


def row_json(table: Table, row: Mapping[str, Any], columns: tuple[str, ...]) -> bytes:
    """The JSON object of `row`'s `columns` (in that order), as bytes; `RowsRefusedError`
    naming the column of a value JSON cannot hold."""
    document: dict[str, Any] = {}
    for column in columns:
        try:
            document[column] = _column_value(table.columns[column], row.get(column))
        except _ENCODING_ERRORS as exc:
            raise _refused(table, column, exc) from exc
    try:
        return json_bytes(document)
    except _ENCODING_ERRORS as exc:
        raise _refused(table, _culprit(document), exc) from exc


def _culprit(document: Mapping[str, Any]) -> str | None:
    """The first column whose value alone cannot be written (on the error path only)."""
    for column, value in document.items():
        try:
            json_bytes(value)
        except _ENCODING_ERRORS:
            return column
    return None
