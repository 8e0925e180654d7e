"""The one operations endpoint of `offsetkeeper run --workers N`, served by the supervisor on
`--metrics-port` (same paths as a single process):

    GET /metrics   every worker's /metrics, each sample labelled `worker="i"`, HELP and TYPE
                   once per family; then the supervisor's own: `offsetkeeper_workers`,
                   `offsetkeeper_worker_up{worker}`, `offsetkeeper_worker_restarts_total{worker}`.
                   Always the Prometheus text format 0.0.4 (the workers are asked for it).
    GET /healthz   200 while the supervisor's loop runs and no running worker reports its own
                   partition loop stalled (a worker that is starting, or waiting for its
                   restart, is being looked after); 503 otherwise.
    GET /readyz    200 only when every worker's own /readyz answers 200 (a worker that has
                   finished under --stop-when-idle is not waited for); 503 with the reasons.
    GET /          the status page: the members (state, pid, restarts, last exit), then every
                   worker's partitions, stopped partitions and counts, from its /status.json.
    GET /status.json  the same as JSON: each member with the report its worker gave (or null).

Each worker serves its own endpoint on 127.0.0.1, on a port the supervisor chose for it (in the
`worker_started` event); they are asked in parallel, `FETCH_TIMEOUT_S` each, with the standard
library only. A worker that does not answer in time counts as not up (metrics), starting (not
ready), and not stalled (liveness: only its own 503 says that).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from consumer.runtime import status_page
from consumer.runtime.health import Verdict
from consumer.runtime.ops_server import Answer, HttpEndpoint, not_found
from consumer.runtime.status import StatusReport
from consumer.runtime.status_page import Member
from consumer.runtime.supervisor import WorkerView

WORKER_LABEL = "worker"
FETCH_TIMEOUT_S = 3.0
LOOP_STALLED_S = 10.0  # the supervisor's loop runs every 0.1 s
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")
# The samples of a family are named like it, or like it with one of these suffixes.
_SAMPLE_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created", "_info")


# -- merging the workers' metrics ------------------------------------------------------------


def _name_end(line: str) -> int:
    end = 0
    while end < len(line) and line[end] in _NAME_CHARACTERS:
        end += 1
    return end


def label_sample(line: str, name: str, value: str) -> str:
    """A sample line of the text format with the label `name="value"` put first."""
    end = _name_end(line)
    label = f'{name}="{value}"'
    if line.startswith("{", end):
        rest = line[end + 1 :]
        return f"{line[:end]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{line[:end]}{{{label}}}{line[end:]}"


@dataclass(slots=True)
class _Family:
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [line for line in (self.help, self.type) if line] + self.samples


def merge_metrics(texts: Mapping[int, str]) -> str:
    """The workers' expositions (text format 0.0.4) as one: each sample labelled with its
    worker, the samples of a family together under one HELP and one TYPE line."""
    families: dict[str, _Family] = {}
    for worker, text in texts.items():
        current: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                keyword, _, rest = line[1:].strip().partition(" ")
                if keyword in ("HELP", "TYPE") and rest:
                    current = rest.split(None, 1)[0]
                    family = families.setdefault(current, _Family())
                    if keyword == "HELP":
                        family.help = family.help or line
                    else:
                        family.type = family.type or line
                continue  # other comments are not samples
            name = line[: _name_end(line)]
            if current is None or name not in {current + s for s in _SAMPLE_SUFFIXES}:
                current = name  # a sample outside a declared family: a family of its own
            families.setdefault(current, _Family()).samples.append(
                label_sample(line, WORKER_LABEL, str(worker))
            )
    return "".join(f"{line}\n" for family in families.values() for line in family.lines())


def supervisor_metrics(views: Iterable[WorkerView], answered: Iterable[int], count: int) -> str:
    """The supervisor's own families (text format 0.0.4)."""
    up = set(answered)
    listed = list(views)
    lines = [
        "# HELP offsetkeeper_workers Worker processes the supervisor runs (--workers).",
        "# TYPE offsetkeeper_workers gauge",
        f"offsetkeeper_workers {float(count)}",
        "# HELP offsetkeeper_worker_up 1 while the worker runs and its /metrics answered.",
        "# TYPE offsetkeeper_worker_up gauge",
        *(
            f'offsetkeeper_worker_up{{worker="{v.index}"}} {1.0 if v.index in up else 0.0}'
            for v in listed
        ),
        "# HELP offsetkeeper_worker_restarts_total Times the supervisor restarted the worker.",
        "# TYPE offsetkeeper_worker_restarts_total counter",
        *(
            f'offsetkeeper_worker_restarts_total{{worker="{v.index}"}} {float(v.restarts)}'
            for v in listed
        ),
    ]
    return "".join(f"{line}\n" for line in lines)


# -- health ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    """A worker's answer to one request."""

    status: int
    body: bytes

    def document(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


Answers = Mapping[int, "Fetched | None"]  # worker index -> its answer (None: no answer)


def _worker_entry(view: WorkerView, answer: Fetched | None, key: str) -> dict[str, Any]:
    return {
        "state": view.state,
        "pid": view.pid,
        "restarts": view.restarts,
        key: None if answer is None else answer.document(),
    }


def liveness(views: Iterable[WorkerView], loop_age_s: float, answers: Answers) -> Verdict:
    """See the module docstring (/healthz)."""
    reasons = []
    if loop_age_s > LOOP_STALLED_S:
        reasons.append(f"the supervisor's loop has not run for {loop_age_s:.0f}s")
    workers = {}
    for view in views:
        answer = answers.get(view.index)
        if view.state == "running" and answer is not None and answer.status != HTTPStatus.OK:
            reasons.append(f"worker {view.index}: its partition loop stalled")
        workers[str(view.index)] = _worker_entry(view, answer, "healthz")
    alive = not reasons
    return Verdict(
        alive,
        {
            "status": "alive" if alive else "stalled",
            "reasons": reasons,
            "loop_last_seen_s": round(loop_age_s, 3),
            "workers": workers,
        },
    )


def _not_ready_because(view: WorkerView, answer: Fetched | None) -> list[str]:
    if view.state == "finished":
        return []
    if view.state == "restarting":
        return [f"worker {view.index} exited and is waiting for its restart"]
    if view.state != "running" or answer is None:
        return [f"worker {view.index} is starting (its endpoint does not answer yet)"]
    if answer.status == HTTPStatus.OK:
        return []
    document = answer.document()
    found = document.get("reasons") if isinstance(document, dict) else None
    reasons = [str(r) for r in found] if isinstance(found, list) and found else ["not ready"]
    return [f"worker {view.index}: {reason}" for reason in reasons]


def readiness(views: Iterable[WorkerView], stopping: bool, answers: Answers) -> Verdict:
    """See the module docstring (/readyz)."""
    listed = list(views)
    reasons = ["shutting down"] if stopping else []
    partitions = lag = 0
    workers = {}
    for view in listed:
        answer = answers.get(view.index)
        reasons.extend(_not_ready_because(view, answer))
        entry = _worker_entry(view, answer, "readyz")
        document = entry["readyz"]
        if isinstance(document, dict):
            partitions += int(document.get("partitions") or 0)
            lag += int(document.get("lag") or 0)
        workers[str(view.index)] = entry
    if not any(view.state == "running" for view in listed):
        reasons.append("no worker is running")
    ready = not reasons
    return Verdict(
        ready,
        {
            "status": "ready" if ready else "not ready",
            "reasons": reasons,
            "partitions": partitions,
            "lag": lag,
            "workers": workers,
        },
    )


# -- the status page -------------------------------------------------------------------------


def _report_of(answer: Fetched | None) -> StatusReport | None:
    if answer is None or answer.status != HTTPStatus.OK:
        return None
    document = answer.document()
    try:
        return StatusReport.from_json(document)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # not a report this version reads: the member is listed without one


def members(views: Iterable[WorkerView], answers: Answers) -> list[Member]:
    """Each worker with the report it gave (`/status.json`), if it gave one."""
    return [
        Member(
            index=view.index,
            state=view.state,
            pid=view.pid,
            restarts=view.restarts,
            last_exit=view.last_returncode,
            report=_report_of(answers.get(view.index)),
        )
        for view in views
    ]


def status_document(listed: Sequence[Member], verdict: Verdict) -> dict[str, Any]:
    return {
        "ready": verdict.ok,
        "reasons": verdict.body["reasons"],
        "workers": {
            str(m.index): {
                "state": m.state,
                "pid": m.pid,
                "restarts": m.restarts,
                "last_exit": m.last_exit,
                "status": None if m.report is None else m.report.to_json(),
            }
            for m in listed
        },
    }


# -- asking the workers ------------------------------------------------------------------------


def fetch(port: int, path: str, timeout_s: float = FETCH_TIMEOUT_S) -> Fetched | None:
    """GET a worker's endpoint on loopback; None when it does not answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Accept": "text/plain"}
    )
    try:
        # http://127.0.0.1 and a port the supervisor chose: no file:// or other scheme here.
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310
            return Fetched(answer.status, answer.read())
    except urllib.error.HTTPError as error:
        return Fetched(error.code, error.read())
    except (OSError, http.client.HTTPException):
        return None


class Supervised(Protocol):
    """What the endpoint reads of the supervisor (`consumer.runtime.supervisor.Supervisor`)."""

    count: int

    def views(self) -> tuple[WorkerView, ...]: ...

    @property
    def stopping(self) -> bool: ...

    def loop_age_s(self) -> float: ...


Fetch = Callable[[int, str], "Fetched | None"]


class WorkerEndpoint(HttpEndpoint):
    """Serves the module docstring's paths from the supervisor and its workers."""

    def __init__(
        self, host: str, port: int, supervisor: Supervised, *, fetch: Fetch = fetch
    ) -> None:
        self._supervisor = supervisor
        self._fetch = fetch
        super().__init__(host, port, self._respond_to)

    def _ask(self, views: tuple[WorkerView, ...], path: str) -> dict[int, Fetched | None]:
        asked = [v for v in views if v.state == "running" and v.metrics_port is not None]
        if not asked:
            return {}
        with ThreadPoolExecutor(max_workers=min(len(asked), 16)) as pool:
            answers = pool.map(lambda v: self._fetch(v.metrics_port or 0, path), asked)
            return {view.index: answer for view, answer in zip(asked, answers, strict=True)}

    def _respond_to(self, path: str, _accept: str) -> Answer:
        supervisor = self._supervisor
        views = supervisor.views()
        if path == "/healthz":
            answers = self._ask(views, path)
            return Answer.of_verdict(liveness(views, supervisor.loop_age_s(), answers))
        if path == "/readyz":
            answers = self._ask(views, path)
            return Answer.of_verdict(readiness(views, supervisor.stopping, answers))
        if path in ("/", "/status.json"):
            return self._status(views, as_page=path == "/")
        if path != "/metrics":
            return not_found()
        texts = {
            index: answer.body.decode("utf-8", "replace")
            for index, answer in self._ask(views, path).items()
            if answer is not None and answer.status == HTTPStatus.OK
        }
        body = merge_metrics(texts) + supervisor_metrics(views, texts, supervisor.count)
        return Answer(200, CONTENT_TYPE_PLAIN_0_0_4, body.encode())

    def _status(self, views: tuple[WorkerView, ...], *, as_page: bool) -> Answer:
        with ThreadPoolExecutor(max_workers=2) as pool:
            ready_answers = pool.submit(self._ask, views, "/readyz")
            listed = members(views, self._ask(views, "/status.json"))
            verdict = readiness(views, self._supervisor.stopping, ready_answers.result())
        if not as_page:
            return Answer.of_json(200, status_document(listed, verdict))
        reasons = [str(r) for r in verdict.body["reasons"]]
        page = status_page.render_supervisor(listed, verdict.ok, reasons, time.time())
        return Answer.of_html(page)
