"""Opening our sinks from their URLs: the factories behind the `offsetkeeper.sinks` entry
points (`pyproject.toml`). `sqlite:///relative.db`, `sqlite:////absolute.db`,
`postgresql://...`, `kafka://HOST:PORT/TOPIC`, `file:///absolute/dir`, `file:relative/dir`."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from consumer import ConfigError, Sink, mask_url
from sinks._sql import DEFAULT_CHECKPOINT_TABLE, DEFAULT_LEASE_TABLE


def _options(url: str) -> tuple[dict[str, str], str, str]:
    """The URL's query options, and the checkpoint and lease table names taken out of them."""
    options = {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}
    checkpoint_table = options.pop("checkpoint_table", DEFAULT_CHECKPOINT_TABLE)
    lease_table = options.pop("lease_table", DEFAULT_LEASE_TABLE)
    return options, checkpoint_table, lease_table


def open_sqlite_sink(url: str) -> Sink:
    """`sqlite:///relative.db` or `sqlite:////absolute.db`; `checkpoint_table`, `lease_table`."""
    from sinks._sqlite import SqliteSink  # noqa: PLC0415 - each sink loads only when used

    options, checkpoint_table, lease_table = _options(url)
    if options:
        raise ConfigError("unknown sqlite sink options", options=sorted(options))
    path = urlsplit(url).path
    # sqlite:///x.db -> "x.db" (relative); sqlite:////tmp/x.db -> "/tmp/x.db"
    path = path[1:] if path.startswith("/") else path
    if not path:
        raise ConfigError("sqlite sink URL needs a file path", sink=mask_url(url))
    return SqliteSink(path, checkpoint_table=checkpoint_table, lease_table=lease_table)


def open_postgres_sink(url: str) -> Sink:
    """`postgresql://user:pass@host:port/db?options` (libpq options pass through)."""
    from sinks._postgres import PostgresSink  # noqa: PLC0415 - psycopg loads only when used

    options, checkpoint_table, lease_table = _options(url)
    return PostgresSink(
        url.split("?", 1)[0],
        options=options,
        checkpoint_table=checkpoint_table,
        lease_table=lease_table,
    )


def open_kafka_sink(url: str) -> Sink:
    """`kafka://HOST:PORT[,HOST:PORT]/TOPIC?options` (see `sinks._kafka_settings`)."""
    from sinks._kafka import KafkaSink  # noqa: PLC0415 - confluent-kafka loads only when used
    from sinks._kafka_settings import parse_kafka_url  # noqa: PLC0415

    return KafkaSink(parse_kafka_url(url))


def open_file_sink(url: str) -> Sink:
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
            sink=mask_url(url),
            host=urlsplit(mask_url(url)).netloc,
        )
    if not parts.path:
        raise ConfigError("file sink URL needs a directory", sink=mask_url(url))
    return FileSink(unquote(parts.path))
