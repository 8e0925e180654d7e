"""Our sinks: SQLite, PostgreSQL, atomic files and a transactional Kafka topic.

Each implements `consumer.Sink` and is found by the CLI through the `offsetkeeper.sinks`
entry-point group (one name per URL scheme), exactly as a third party's sink would be. This
package imports only consumer's public API.
"""

from sinks._file import FileSink
from sinks._file_layout import DataFile
from sinks._file_reader import committed_files, read_committed_rows
from sinks._file_verify import CorruptDataFileError, DataFileCheck
from sinks._kafka import KafkaSink
from sinks._kafka_messages import decode_row, encode_row
from sinks._sql import DEFAULT_CHECKPOINT_TABLE, DEFAULT_LEASE_TABLE
from sinks._sqlite import SqliteSink
from sinks._url import open_file_sink, open_kafka_sink, open_postgres_sink, open_sqlite_sink

__all__ = [
    "DEFAULT_CHECKPOINT_TABLE",
    "DEFAULT_LEASE_TABLE",
    "CorruptDataFileError",
    "DataFile",
    "DataFileCheck",
    "FileSink",
    "KafkaSink",
    "SqliteSink",
    "committed_files",
    "decode_row",
    "encode_row",
    "open_file_sink",
    "open_kafka_sink",
    "open_postgres_sink",
    "open_sqlite_sink",
    "read_committed_rows",
]
