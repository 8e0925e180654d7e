"""Sinks: transactional stores for output rows and the checkpoints that produced them."""

from sinks._contract import (
    DEFAULT_CHECKPOINT_TABLE,
    DEFAULT_LEASE_TABLE,
    GroupBoundSink,
    RowsOrigin,
    Sink,
)
from sinks._file import DataFile, FileSink, committed_files, read_committed_rows
from sinks._kafka import KafkaSink, decode_row, encode_row
from sinks._sqlite import SqliteSink
from sinks._url import mask_url, open_sink

__all__ = [
    "DEFAULT_CHECKPOINT_TABLE",
    "DEFAULT_LEASE_TABLE",
    "DataFile",
    "FileSink",
    "GroupBoundSink",
    "KafkaSink",
    "RowsOrigin",
    "Sink",
    "SqliteSink",
    "committed_files",
    "decode_row",
    "encode_row",
    "mask_url",
    "open_sink",
    "read_committed_rows",
]
