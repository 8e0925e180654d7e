"""Reading a file sink's committed output: the reader protocol, for any process, with each
file checked against the checksum its checkpoint recorded (`_file_verify`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consumer import SinkError, Table
from sinks._file_documents import decode_line, read_group_document
from sinks._file_layout import DataFile, FileLayout
from sinks._file_verify import (
    check_data_file,
    committed_in,
    recorded_digests,
    refuse_if_corrupt,
    with_recorded,
)


def committed_files(
    directory: str | Path, table: str | Table, group: str, *, verify: bool = False
) -> list[DataFile]:
    """The data files of `table` that `group` committed, per partition in offset order.

    The reader protocol: read the group's checkpoint document FIRST, then list the directory,
    and take only files whose last offset is below their partition's `next_offset`. Such a file
    is complete and is never removed; anything else (temp files, files a crash left beyond the
    checkpoint) is ignored.

    Each file carries the SHA-256 and size its checkpoint recorded (None for a file committed
    before checksums existed). A file whose size differs from the recorded one is refused at
    once (`CorruptDataFileError`: a truncated file is never listed as good); with `verify`,
    every file is read and its SHA-256 compared too (what `read_committed_rows` does anyway).
    """
    layout = FileLayout(Path(directory))
    name = table.name if isinstance(table, Table) else table
    stored = read_group_document(layout.checkpoint_path(group))
    if stored is None:
        return []
    files = committed_in(layout.data_dir(name, group), stored)
    if not files:
        return []
    recorded = recorded_digests(layout, stored, {f.topic_partition for f in files})
    checked = []
    for found in files:
        data_file = with_recorded(found, recorded.get((name, found.path.name)))
        if verify:
            refuse_if_corrupt(check_data_file(data_file, name, group, _content(data_file)))
        elif data_file.size is not None and _size(data_file) != data_file.size:
            content = _content(data_file)  # the size differs: say how, with both digests
            refuse_if_corrupt(check_data_file(data_file, name, group, content))
        checked.append(data_file)
    return checked


def read_committed_rows(
    directory: str | Path, table: str | Table, group: str
) -> Iterator[dict[str, Any]]:
    """Every committed row of `table` written by `group`, per partition in offset order (see
    `committed_files`). Each file's bytes are checked against its recorded SHA-256 before any
    of its rows is yielded: a truncated or altered file raises `CorruptDataFileError`. With a
    `Table`, bytes columns come back as bytes, else as base64."""
    decode_as = table if isinstance(table, Table) else None
    name = table.name if isinstance(table, Table) else table
    for data_file in committed_files(directory, table, group):
        content = _content(data_file)
        refuse_if_corrupt(check_data_file(data_file, name, group, content))
        for line in content.splitlines():
            yield decode_line(line, decode_as)


def _content(data_file: DataFile) -> bytes:
    try:
        return data_file.path.read_bytes()
    except OSError as exc:
        raise SinkError(
            "a committed data file cannot be read (was a checkpoint moved back?)",
            path=str(data_file.path),
            reason=str(exc),
        ) from exc


def _size(data_file: DataFile) -> int:
    try:
        return data_file.path.stat().st_size
    except OSError as exc:
        raise SinkError(
            "a committed data file cannot be read (was a checkpoint moved back?)",
            path=str(data_file.path),
            reason=str(exc),
        ) from exc
