"""The file sink's replay job documents (`consumer.JobStore`): one JSON file per job."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from consumer import SinkError
from sinks._file_io import file_system_error, read_json, write_durably
from sinks._file_layout import FileLayout
from sinks._file_lock import DirectoryLock


def create_job(
    layout: FileLayout, lock: DirectoryLock, job_id: str, document: str, *, sink: str
) -> str:
    """Store a job's document unless the job exists; return the stored document."""
    path = layout.job_path(job_id)
    try:
        lock.acquire()  # two runs creating the same job: the first one's stays
        try:
            stored = load_job(layout, job_id, sink=sink)
            if stored is not None:
                return stored
            record = {"job_id": job_id, "created_at": datetime.now(tz=UTC).isoformat()}
            write_durably(path, (json.dumps({**record, "document": document}) + "\n").encode())
        finally:
            lock.release()
    except OSError as exc:
        raise file_system_error("cannot store replay job", exc, sink=sink, job=job_id) from exc
    return document


def load_job(layout: FileLayout, job_id: str, *, sink: str) -> str | None:
    """The stored document of the job, or None."""
    path = layout.job_path(job_id)
    try:
        stored = read_json(path)
    except OSError as exc:
        raise SinkError("cannot read replay job", sink=sink, job=job_id, reason=str(exc)) from exc
    if stored is None:
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("document"), str):
        raise SinkError("replay job file has no document", path=str(path), job=job_id)
    return str(stored["document"])
