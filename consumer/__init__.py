"""offsetkeeper: consume Kafka topics into sinks exactly once in effect.

This module is the public API: everything a user, a sink or a client backend written outside
this package may import is in `__all__`; the subpackages are private. Public names report
`consumer` as their module, so a traceback reads `consumer.FencedError`.
"""

from consumer._version import __version__
from consumer.checkpoints.model import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    decode_checkpoint,
    encode_checkpoint,
    from_avro,
    to_avro,
)
from consumer.cli.sinks import SINK_ENTRY_POINT_GROUP, open_sink
from consumer.core.app import (
    POSITION_COLUMNS,
    SOURCE_COLUMNS,
    App,
    ColumnType,
    StateSchema,
    Table,
    TableMode,
    check_identifier,
    load_app,
)
from consumer.core.errors import (
    CheckpointError,
    CheckpointFormatError,
    ConfigError,
    DecodeError,
    FencedError,
    InvalidRecordError,
    KafkaError,
    OffsetkeeperError,
    RecordError,
    RecordsLostError,
    RowsRefusedError,
    SchemaRegistryError,
    SinkError,
    SinkFullError,
)
from consumer.core.records import (
    RawRecord,
    Record,
    Row,
    SourcePosition,
    StoredPosition,
    TopicPartition,
    position_order,
    position_values,
    replaces,
)
from consumer.core.settings import RunSettings
from consumer.core.urls import mask_url
from consumer.decoding.avro import encode_confluent, encode_single_object
from consumer.engine.batch import DeadLetter
from consumer.engine.client import ClientBackend, RebalanceListener, StartPosition
from consumer.engine.crash import CrashInjector
from consumer.engine.sink import (
    CheckpointAdmin,
    GroupBoundSink,
    InterruptibleSink,
    JobStore,
    PositionGuardedSink,
    RowsOrigin,
    Sink,
    StateChange,
    StateEntry,
    StateStore,
    StoredRowsReader,
    check_epochs,
)
from consumer.engine.state import KeyedState
from consumer.engine.values import LimitedSink, ValueLimits
from consumer.runner.result import RunResult, StopReason
from consumer.runner.run import Runner, run

__all__ = [
    "CURRENT_FORMAT_VERSION",
    "POSITION_COLUMNS",
    "SINK_ENTRY_POINT_GROUP",
    "SOURCE_COLUMNS",
    "App",
    "Checkpoint",
    "CheckpointAdmin",
    "CheckpointError",
    "CheckpointFormatError",
    "ClientBackend",
    "ColumnType",
    "ConfigError",
    "CrashInjector",
    "DeadLetter",
    "DecodeError",
    "FencedError",
    "GroupBoundSink",
    "InterruptibleSink",
    "InvalidRecordError",
    "JobStore",
    "KafkaError",
    "KeyedState",
    "LimitedSink",
    "OffsetkeeperError",
    "PositionGuardedSink",
    "RawRecord",
    "RebalanceListener",
    "Record",
    "RecordError",
    "RecordsLostError",
    "Row",
    "RowsOrigin",
    "RowsRefusedError",
    "RunResult",
    "RunSettings",
    "Runner",
    "SchemaRegistryError",
    "Sink",
    "SinkError",
    "SinkFullError",
    "SourcePosition",
    "StartPosition",
    "StateChange",
    "StateEntry",
    "StateSchema",
    "StateStore",
    "StopReason",
    "StoredPosition",
    "StoredRowsReader",
    "Table",
    "TableMode",
    "TopicPartition",
    "ValueLimits",
    "__version__",
    "check_epochs",
    "check_identifier",
    "decode_checkpoint",
    "encode_checkpoint",
    "encode_confluent",
    "encode_single_object",
    "from_avro",
    "load_app",
    "mask_url",
    "open_sink",
    "position_order",
    "position_values",
    "replaces",
    "run",
    "to_avro",
]


import inspect


def _report_public_module() -> None:
    """Public classes and functions say they live in `consumer` (as psycopg does)."""
    for name in __all__:
        value = globals()[name]
        if isinstance(value, type) or inspect.isfunction(value):
            value.__module__ = __name__


_report_public_module()
