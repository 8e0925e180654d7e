"""offsetkeeper: consume Kafka topics into sinks exactly once in effect."""

from consumer._app import SOURCE_COLUMNS, App, ColumnType, StateSchema, Table, TableMode, load_app
from consumer._avro import encode_confluent, encode_single_object
from consumer._backend import ClientBackend, RebalanceListener, StartPosition
from consumer._checkpoint import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    decode_checkpoint,
    encode_checkpoint,
    from_avro,
    to_avro,
)
from consumer._errors import (
    CheckpointError,
    CheckpointFormatError,
    ConfigError,
    DecodeError,
    FencedError,
    InvalidRecordError,
    KafkaError,
    OffsetkeeperError,
    RecordError,
    SchemaRegistryError,
    SinkError,
)
from consumer._records import RawRecord, Record, Row, TopicPartition

__all__ = [
    "CURRENT_FORMAT_VERSION",
    "SOURCE_COLUMNS",
    "App",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormatError",
    "ClientBackend",
    "ColumnType",
    "ConfigError",
    "DecodeError",
    "FencedError",
    "InvalidRecordError",
    "KafkaError",
    "OffsetkeeperError",
    "RawRecord",
    "RebalanceListener",
    "Record",
    "RecordError",
    "Row",
    "SchemaRegistryError",
    "SinkError",
    "StartPosition",
    "StateSchema",
    "Table",
    "TableMode",
    "TopicPartition",
    "decode_checkpoint",
    "encode_checkpoint",
    "encode_confluent",
    "encode_single_object",
    "from_avro",
    "load_app",
    "to_avro",
]
