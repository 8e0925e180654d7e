"""Durable file operations of the file sink: what is renamed into place survives a power loss."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer import SinkError, SinkFullError
from sinks._file_layout import temp_path

# No space left: on the device, or in the user's quota.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def file_system_error(message: str, exc: OSError, *, sink: str, **context: Any) -> SinkError:
    """The error the engine sees for `exc`, met by the file sink `sink` while it did what
    `message` says: a `SinkFullError` ("disk full: ...", with the errno's name and the file
    where the OS named one) when the file system has no space left, else a `SinkError`; both
    are retried. The caller raises it `from exc`."""
    if exc.errno in _NO_SPACE:
        return SinkFullError(
            f"disk full: {message}",
            sink=sink,
            **context,
            errno=errno.errorcode[exc.errno],
            path=exc.filename,
            reason=str(exc),
        )
    return SinkError(message, sink=sink, **context, reason=str(exc))


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directory(directory: Path) -> None:
    """Create `directory` (and parents) so that the new entries survive a power loss too."""
    if directory.is_dir():
        return
    make_directory(directory.parent)
    with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
        directory.mkdir()
    fsync_directory(directory.parent)


def write_durably(path: Path, data: bytes, *, renamed: Callable[[], object] | None = None) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync the directory.
    `renamed` is called right after the rename (from then on, readers may see `data` even
    if the directory's fsync fails)."""
    temp = temp_path(path)
    try:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if renamed is not None:
        renamed()
    fsync_directory(path.parent)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:  # written atomically, so only by hand
        # ValueError: not JSON, or not UTF-8; RecursionError: nested too deep to read.
        raise SinkError(
            "file sink document is not valid JSON", path=str(path), reason=type(exc).__name__
        ) from exc
