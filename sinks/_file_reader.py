"""Reading a file sink's committed output: the reader protocol, for any process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consumer import SinkError, Table
from sinks._file_documents import decode_line, read_checkpoint_document
from sinks._file_layout import DataFile, FileLayout, parse_data_file


def committed_files(directory: str | Path, table: str | Table, group: str) -> list[DataFile]:
    """The data files of `table` that `group` committed, per partition in offset order.

    The reader protocol: read the group's checkpoint document FIRST, then list the directory,
    and take only files whose last offset is below their partition's `next_offset`. Such a file
    is complete and is never removed; anything else (temp files, files a crash left beyond the
    checkpoint) is ignored.
    """
    layout = FileLayout(Path(directory))
    name = table.name if isinstance(table, Table) else table
    stored = read_checkpoint_document(layout.checkpoint_path(group))
    if stored is None:
        return []
    next_offsets = {tp: cp.next_offset for tp, cp in stored[1].items()}
    try:
        entries = list(layout.data_dir(name, group).iterdir())
    except FileNotFoundError:
        return []
    files = []
    for entry in entries:
        parsed = parse_data_file(entry)
        if parsed is not None and parsed.last_offset < next_offsets.get(parsed.topic_partition, 0):
            files.append(parsed)
    return sorted(files, key=lambda f: (f.topic, f.partition, f.first_offset))


def read_committed_rows(
    directory: str | Path, table: str | Table, group: str
) -> Iterator[dict[str, Any]]:
    """Every committed row of `table` written by `group`, per partition in offset order (see
    `committed_files`). With a `Table`, bytes columns come back as bytes, else as base64."""
    decode_as = table if isinstance(table, Table) else None
    for data_file in committed_files(directory, table, group):
        try:
            content = data_file.path.read_bytes()
        except OSError as exc:
            raise SinkError(
                "a committed data file cannot be read (was a checkpoint moved back?)",
                path=str(data_file.path),
                reason=str(exc),
            ) from exc
        for line in content.splitlines():
            yield decode_line(line, decode_as)
