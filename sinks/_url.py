"""Open a sink from its URL: `sqlite:///relative.db`, `sqlite:////absolute.db`,
`postgresql://...`, `kafka://HOST:PORT/TOPIC`, `file:///absolute/dir`, `file:relative/dir`."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

from consumer._errors import ConfigError
from sinks._contract import DEFAULT_CHECKPOINT_TABLE, DEFAULT_LEASE_TABLE, Sink
from sinks._sqlite import SqliteSink

_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@]*)@")


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and output."""
    return _PASSWORD.sub(r"\1:***@", url)


def open_sink(url: str) -> Sink:
    """A `Sink` for `url` (not yet opened). Query parameters `checkpoint_table`, `lease_table`."""
    parts = urlsplit(url)
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    checkpoint_table = options.pop("checkpoint_table", DEFAULT_CHECKPOINT_TABLE)
    lease_table = options.pop("lease_table", DEFAULT_LEASE_TABLE)
    if parts.scheme == "sqlite":
        if options:
            raise ConfigError("unknown sqlite sink options", options=sorted(options))
        # sqlite:///x.db -> "x.db" (relative); sqlite:////tmp/x.db -> "/tmp/x.db"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigError("sqlite sink URL needs a file path", sink=mask_url(url))
        return SqliteSink(path, checkpoint_table=checkpoint_table, lease_table=lease_table)
    if parts.scheme in ("postgresql", "postgres"):
        from sinks._postgres import PostgresSink  # noqa: PLC0415 - psycopg loads only when used

        return PostgresSink(
            url.split("?", 1)[0],
            options=options,
            checkpoint_table=checkpoint_table,
            lease_table=lease_table,
        )
    if parts.scheme == "file":
        return _file_sink(url)
    if parts.scheme == "kafka":
        # confluent-kafka is always installed (the default backend); the module loads on use.
        from sinks._kafka import KafkaSink, parse_kafka_url  # noqa: PLC0415

        return KafkaSink(parse_kafka_url(url))
    raise ConfigError(
        "unknown sink URL scheme",
        sink=mask_url(url),
        known=["sqlite", "postgresql", "file", "kafka"],
    )


def _file_sink(url: str) -> Sink:
    """`file:///abs/dir` (or `file://localhost/abs/dir`) or `file:relative/dir`; no options."""
    from sinks._file import FileSink  # noqa: PLC0415 - loaded only when used

    parts = urlsplit(url)
    if parts.query:
        raise ConfigError(
            "the file sink takes no options", options=sorted(parse_qs(parts.query, True))
        )
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            "file sink URL names a host; use file:///absolute/dir or file:relative/dir",
            sink=url,
            host=parts.netloc,
        )
    if not parts.path:
        raise ConfigError("file sink URL needs a directory", sink=url)
    return FileSink(unquote(parts.path))
