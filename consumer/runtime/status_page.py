"""The status page at `/` on the ops port: one self-contained HTML document (inline style, no
script, no external asset, so it works air-gapped and under `default-src 'none'`) that
reloads itself every `REFRESH_S` seconds.

It shows what runs, each owned partition's progress, the stopped partitions with their error
(topic, partition, offset, field and error class; never a value: the report holds none), the
dead letters, lost records and sink retries. Under `run --workers N` the supervisor's page
lists the members and shows every worker's partitions with a worker column.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass

from consumer.runtime.health import PartitionState
from consumer.runtime.status import StatusReport, Tallies, combined_tallies

REFRESH_S = 5
CONTENT_TYPE = "text/html; charset=utf-8"

_STYLE = """
body{font:14px/1.4 "Liberation Sans",Arial,sans-serif;margin:1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.4em;margin:0 0 .5em}h2{font-size:1.1em;margin:1.5em 0 .4em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;margin:0}dt{color:#555}
dd{margin:0}table{border-collapse:collapse;min-width:40em}
th,td{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.t,th.t{text-align:left}.bad{color:#b00020;font-weight:bold}
.ok{color:#0a7d2c;font-weight:bold}tr.stopped td{background:#fde8ea}
ul.reasons{margin:.3em 0;padding-left:1.3em}.muted{color:#777}
"""


@dataclass(frozen=True, slots=True)
class Member:
    """A worker of `run --workers N` as the supervisor sees it, with its report if it gave one."""

    index: int
    state: str
    pid: int | None
    restarts: int
    last_exit: int | None
    report: StatusReport | None


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def age_text(seconds: float | None) -> str:
    """E.g. `never`, `0.4 s ago`, `12 s ago`, `3 min 4 s ago`, `2 h 5 min ago`."""
    if seconds is None:
        return "never"
    if seconds < 10:  # noqa: PLR2004 - tenths only where they say something
        return f"{seconds:.1f} s ago"
    whole = round(seconds)
    if whole < 60:  # noqa: PLR2004
        return f"{whole} s ago"
    if whole < 3600:  # noqa: PLR2004
        return f"{whole // 60} min {whole % 60} s ago"
    return f"{whole // 3600} h {whole % 3600 // 60} min ago"


# `align` has a letter per column: "t" text (left), "n" number (right).


def _table(headers: Sequence[str], rows: Sequence[str], align: str) -> str:
    cells = "".join(
        f'<th class="t">{_e(h)}</th>' if a == "t" else f"<th>{_e(h)}</th>"
        for h, a in zip(headers, align, strict=True)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _row(cells: Sequence[object], align: str, css: str = "") -> str:
    tds = "".join(
        f'<td class="t">{_e(c)}</td>' if a == "t" else f"<td>{_e(c)}</td>"
        for c, a in zip(cells, align, strict=True)
    )
    return f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>"


# A partition with the worker that owns it (None: a single process).
Owned = tuple[str | None, PartitionState]


def _partitions_section(owned: Sequence[Owned], with_worker: bool) -> str:
    headers = ["Topic", "Partition", "Next offset", "End offset", "Lag", "Last commit"]
    headers += ["Committed/s (1 min)", "Commits/min", "State"]
    align = ("t" if with_worker else "") + "tnnnnnnnt"
    rows = []
    for worker, p in owned:
        cells: list[object] = [p.topic, p.partition, _number(p.next_offset)]
        cells += [_number(p.end_offset), _number(p.lag), age_text(p.last_commit_age_s)]
        cells += [f"{p.records_per_s:,.1f}", f"{p.commits_per_min:,.1f}"]
        cells.append("stopped" if p.stopped else "consuming")
        lead = [worker] if with_worker else []
        rows.append(_row(lead + cells, align, css="stopped" if p.stopped else ""))
    if not rows:
        return '<h2>Partitions</h2><p class="muted">No partition is assigned to this member.</p>'
    lead_headers = ["Worker"] if with_worker else []
    table = _table(lead_headers + headers, rows, align)
    return f'<h2>Partitions</h2><div id="partitions">{table}</div>'


def _stopped_section(owned: Sequence[Owned], with_worker: bool) -> str:
    align = ("t" if with_worker else "") + "tnntt"
    rows = []
    for worker, p in owned:
        cause = p.stopped
        if cause is None:
            continue
        lead = [worker] if with_worker else []
        cells = [p.topic, p.partition, _number(cause.offset), cause.field or "-", cause.error]
        rows.append(_row(lead + cells, align, css="stopped"))
    if not rows:
        return '<h2>Stopped partitions</h2><p class="muted">None.</p>'
    lead_headers = ["Worker"] if with_worker else []
    headers = [*lead_headers, "Topic", "Partition", "Offset", "Field", "Error"]
    note = (
        "<p>A stopped partition waits at its bad record until someone acts: fix the app or "
        "the data, or run with <code>--on-bad-record dead-letter</code>, then restart.</p>"
    )
    table = _table(headers, rows, align)
    return f'<h2 class="bad">Stopped partitions</h2><div id="stopped">{table}</div>{note}'


def _sink_text(reports: Sequence[tuple[str | None, StatusReport]]) -> str:
    failing = [(worker, r.sink) for worker, r in reports if r.sink.retries]
    if not failing:
        return '<span class="ok">none in progress</span>'
    parts = []
    for worker, sink in failing:
        who = "" if worker is None else f"worker {worker}: "
        what = "" if sink.failure is None else f": {sink.failure.describe()}"
        parts.append(
            f"{who}{sink.retries} failed call(s) over {sink.failing_for_s:.0f} s, retrying{what}"
        )
    return '<span class="bad">' + _e("; ".join(parts)) + "</span>"


def _counts_section(tallies: Tallies, sink: str) -> str:
    def count(value: int) -> str:
        return f'<span class="bad">{value:,}</span>' if value else "0"

    return (
        '<h2>Since start</h2><dl id="counts">'
        f"<dt>Dead letters</dt><dd>{count(tallies.dead_letters)}</dd>"
        f"<dt>Records lost</dt><dd>{count(tallies.records_lost)}</dd>"
        f"<dt>Bad records that stopped a partition</dt>"
        f"<dd>{count(tallies.bad_records_stopped)}</dd>"
        f"<dt>Fencing rejections</dt><dd>{count(tallies.fenced)}</dd>"
        f"<dt>Sink retries</dt><dd>{tallies.sink_retries:,} in all; {sink}</dd></dl>"
    )


def _members_section(members: Sequence[Member]) -> str:
    rows = []
    for m in members:
        ready = "-" if m.report is None else ("ready" if m.report.ready else "not ready")
        partitions = "-" if m.report is None else str(len(m.report.partitions))
        exit_code = "-" if m.last_exit is None else str(m.last_exit)
        pid = "-" if m.pid is None else str(m.pid)
        cells = [m.index, m.state, ready, pid, m.restarts, exit_code, partitions]
        rows.append(_row(cells, "ttnnnnn"))
    headers = ["Worker", "State", "Readiness", "PID", "Restarts", "Last exit", "Partitions"]
    return f'<h2>Members</h2><div id="members">{_table(headers, rows, "ttnnnnn")}</div>'


def _header(report: StatusReport | None, ready: bool, reasons: Sequence[str], now: float) -> str:
    info = report.info if report is not None else None
    status = '<span class="ok">ready</span>' if ready else '<span class="bad">not ready</span>'
    fields = [
        ("App", info.app if info else "-"),
        ("Group", info.group if info else "-"),
        ("Topics", ", ".join(info.topics) if info else "-"),
        ("Version", info.version if info else "-"),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in fields)
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    items += f"<dt>Status</dt><dd>{status}</dd><dt>Updated</dt><dd>{_e(updated)}"
    items += f' <span class="muted">(reloads every {REFRESH_S} s)</span></dd>'
    why = "".join(f"<li>{_e(r)}</li>" for r in reasons)
    listed = f'<ul class="reasons" id="reasons">{why}</ul>' if why else ""
    return f'<h1>offsetkeeper</h1><dl id="summary">{items}</dl>{listed}'


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _title(report: StatusReport | None) -> str:
    return (
        "offsetkeeper"
        if report is None
        else f"offsetkeeper: {report.info.app} ({report.info.group})"
    )


def render_process(report: StatusReport) -> str:
    """The page of one `offsetkeeper run` process."""
    owned: list[Owned] = [(None, p) for p in report.partitions]
    body = (
        _header(report, report.ready, report.reasons, report.taken_at)
        + _counts_section(report.tallies, _sink_text([(None, report)]))
        + _stopped_section(owned, with_worker=False)
        + _partitions_section(owned, with_worker=False)
    )
    return _document(_title(report), body)


def render_supervisor(
    members: Sequence[Member], ready: bool, reasons: Sequence[str], now: float
) -> str:
    """The page of the supervisor of `run --workers N`: its members, then every worker's
    partitions (from the reports the workers gave)."""
    reports = [(str(m.index), m.report) for m in members if m.report is not None]
    owned: list[Owned] = [(w, p) for w, r in reports for p in r.partitions]
    first = reports[0][1] if reports else None
    body = (
        _header(first, ready, reasons, now)
        + _members_section(members)
        + _counts_section(combined_tallies([r for _, r in reports]), _sink_text(reports))
        + _stopped_section(owned, with_worker=True)
        + _partitions_section(owned, with_worker=True)
    )
    return _document(_title(first), body)
