"""Sinks: transactional stores for output rows and the checkpoints that produced them."""

from sinks._contract import (
    DEFAULT_CHECKPOINT_TABLE,
    DEFAULT_LEASE_TABLE,
    GroupBoundSink,
    RowsOrigin,
    Sink,
)
from sinks._sqlite import SqliteSink
from sinks._url import mask_url, open_sink

__all__ = [
    "DEFAULT_CHECKPOINT_TABLE",
    "DEFAULT_LEASE_TABLE",
    "GroupBoundSink",
    "RowsOrigin",
    "Sink",
    "SqliteSink",
    "mask_url",
    "open_sink",
]
