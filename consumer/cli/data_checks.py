"""`offsetkeeper checkpoint verify`, second half: the stored data files of a sink that keeps
checksums of them (the file sink) checked against what its checkpoints recorded.

The contract is defined here, where it is used (sinks implement it without importing it):
`DataFileVerifier.verify_data_files(group)` returns one `DataFileReport` per committed data
file of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TextIO, runtime_checkable

import structlog

log = structlog.get_logger("offsetkeeper.cli")

UNRECORDED = "no checksum recorded"


class DataFileReport(Protocol):
    """What checking one committed data file found. `status` is "ok", "no checksum recorded"
    (committed before the sink kept checksums), or a problem ("truncated", "altered",
    "missing", ...), which `problem` says."""

    @property
    def status(self) -> str: ...
    @property
    def problem(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def table(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def first_offset(self) -> int: ...
    @property
    def last_offset(self) -> int: ...
    @property
    def expected_sha256(self) -> str | None: ...
    @property
    def actual_sha256(self) -> str | None: ...
    @property
    def expected_bytes(self) -> int | None: ...
    @property
    def actual_bytes(self) -> int | None: ...
    @property
    def detail(self) -> str | None: ...


@runtime_checkable
class DataFileVerifier(Protocol):
    def verify_data_files(self, group: str) -> Sequence[DataFileReport]:
        """Check every data file `group` committed against the checksum its checkpoints
        recorded; read-only, safe beside a live group (it sees what a reader would)."""
        ...


def report_data_files(
    out: TextIO, group: str, reports: Sequence[DataFileReport], *, require_checksums: bool
) -> int:
    """Write what `reports` found; return how many count as problems (files without a
    checksum count only with `require_checksums`)."""
    problems = [r for r in reports if r.problem or (require_checksums and r.status == UNRECORDED)]
    unrecorded = [r for r in reports if r.status == UNRECORDED]
    good = sum(1 for r in reports if r.status == "ok")
    out.write(
        f"group {group}: {len(reports)} committed data file(s): {good} match their checksums, "
        f"{len(unrecorded)} with no checksum recorded, {len(problems)} problem(s)\n"
    )
    if unrecorded and not require_checksums:
        out.write(
            f"  {len(unrecorded)} file(s) with no checksum recorded (committed before checksums "
            f"were kept; not checked), e.g. {unrecorded[0].path}\n"
        )
    for report in problems:
        out.write(f"  {report.status}: {_describe(report)}\n")
        log.error(
            "data_file_integrity_problem",
            status=report.status,
            path=report.path,
            table=report.table,
            group=group,
            topic=report.topic,
            partition=report.partition,
            offsets=(report.first_offset, report.last_offset),
            expected_sha256=report.expected_sha256,
            actual_sha256=report.actual_sha256,
            expected_bytes=report.expected_bytes,
            actual_bytes=report.actual_bytes,
            detail=report.detail,
        )
    return len(problems)


def _describe(report: DataFileReport) -> str:
    where = (
        f"{report.path} (table {report.table}, {report.topic}[{report.partition}] offsets "
        f"{report.first_offset}..{report.last_offset})"
    )
    if report.expected_sha256 is not None:
        where += f" expected sha256 {report.expected_sha256} ({report.expected_bytes} bytes)"
        if report.actual_sha256 is not None:
            where += f", actual {report.actual_sha256} ({report.actual_bytes} bytes)"
    if report.detail:
        where += f": {report.detail}"
    return where
