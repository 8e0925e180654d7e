"""Open a sink from its URL: `sqlite:///relative.db`, `sqlite:////absolute.db`, `postgresql://...`."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

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
    raise ConfigError("unknown sink URL scheme", sink=mask_url(url), known=["sqlite", "postgresql"])
