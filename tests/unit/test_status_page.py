"""The status page (`/`) and its JSON (`/status.json`) over the real HTTP endpoint, for one
process and for the supervisor of `run --workers N`; the partition progress they show."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

from consumer import InvalidRecordError, SinkError, TopicPartition
from consumer.runtime.health import Health, StopCause
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import OpsServer
from consumer.runtime.status import ConsumerInfo, StatusReport, StatusSource
from consumer.runtime.status_page import REFRESH_S, age_text
from consumer.runtime.supervisor import WorkerView
from consumer.runtime.telemetry import Telemetry
from consumer.runtime.worker_endpoint import WorkerEndpoint
from tests.fixtures.fake_backend import FakeClock

P0 = TopicPartition("orders", 0)
P1 = TopicPartition("orders", 1)
ROW_VALUE = "4111-1111-1111-1111"  # what a bad record held: never on the page


@dataclass
class Member:
    server: OpsServer
    health: Health
    metrics: Metrics
    telemetry: Telemetry
    clock: FakeClock

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        return _get(self.server.port, path)


def _get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def _member() -> Member:
    clock = FakeClock()
    health = Health(readiness_timeout_s=30, clock=clock.now)
    metrics = Metrics(app="orders-app", group="orders-group", process_metrics=False)
    telemetry = Telemetry(metrics, health, clock=clock.now)
    info = ConsumerInfo("orders-app", "orders-group", ("orders", "refunds"), "9.8.7")
    status = StatusSource(info, health, metrics, wall_clock=lambda: 1_800_000_000.0)
    server = OpsServer("127.0.0.1", 0, metrics.registry, health, status)
    server.start()
    return Member(server, health, metrics, telemetry, clock)


@pytest.fixture
def member() -> Iterator[Member]:
    served = _member()
    yield served
    served.server.stop()


class _Text(HTMLParser):
    """The page's visible text, one line per table row or block, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[list[str]] = [[]]
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("style", "title"):
            self._hidden += 1
        if tag in ("tr", "h1", "h2", "p", "dt", "li"):
            self.lines.append([])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden and data.strip():
            self.lines[-1].append(data.strip())


def _parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


def _rows(page: str) -> list[str]:
    return [" | ".join(line) for line in _parse(page).lines if line]


def _stop_with_a_value_in_the_message(member: Member, tp: TopicPartition, offset: int) -> None:
    error = InvalidRecordError(
        f"amount {ROW_VALUE} does not fit bigint",
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        field="amount",
    )
    member.telemetry.partition_stopped(tp, error)


def test_the_page_shows_progress_stops_and_counts_without_row_values(member: Member) -> None:
    member.telemetry.partitions_assigned({P0: 100, P1: 40})
    member.telemetry.ends_sampled({P0: 700, P1: 90})
    for _ in range(6):  # 6 commits of 100 records on partition 0, 10 s apart
        member.clock.sleep(10)
        member.health.committed({P0: (member.health.positions()[P0] or 0) + 100})
    member.clock.sleep(2.5)
    _stop_with_a_value_in_the_message(member, P1, 40)
    member.metrics.bad_records.labels("orders", "0", "DecodeError", "dead_lettered").inc(3)
    member.metrics.records_lost.labels("orders", "0").inc(12)
    try:
        raise SinkError(f"value {ROW_VALUE} too long", sqlstate="22001")
    except SinkError as error:
        member.telemetry.sink_failed("commit", error)
        member.telemetry.sink_failed("commit", error)

    status, headers, page = member.get("/")

    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == "default-src 'none'; style-src 'unsafe-inline'"
    assert ROW_VALUE not in page
    assert "does not fit" not in page  # no message at all
    assert "too long" not in page
    rows = _rows(page)
    assert "App | orders-app" in rows
    assert "Group | orders-group" in rows
    assert "Topics | orders, refunds" in rows
    assert "Version | 9.8.7" in rows
    assert "Status | not ready" in rows
    assert "orders[1] is stopped on a bad record at offset 40" in rows
    # Next offset, end offset, lag, last commit, then 600 records in 6 commits over the 62.5 s
    # since the assignment (the window reaches back to the last entry before its start).
    assert "orders | 0 | 700 | 700 | 0 | 2.5 s ago | 9.6 | 5.8 | consuming" in rows
    assert "orders | 1 | 40 | 90 | 50 | never | 0.0 | 0.0 | stopped" in rows
    assert "orders | 1 | 40 | amount | InvalidRecordError" in rows  # the stopped table
    assert "Dead letters | 3" in rows
    assert "Records lost | 12" in rows
    assert "Bad records that stopped a partition | 1" in rows
    assert (
        "Sink retries | 2 in all; | 2 failed call(s) over 0 s, retrying: "
        "commit failed with SinkError (SQLSTATE 22001)"
    ) in rows


def test_the_page_is_self_contained_and_reloads_itself(member: Member) -> None:
    _, _, page = member.get("/")

    parsed = _parse(page)
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "svg"}
    assert all("src" not in attrs and "href" not in attrs for _, attrs in parsed.tags)
    assert "url(" not in page
    assert "@import" not in page
    refresh = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh == [{"http-equiv": "refresh", "content": str(REFRESH_S)}]
    assert "No partition is assigned to this member." in _rows(page)


def test_status_json_is_the_report_and_reads_back(member: Member) -> None:
    member.telemetry.partitions_assigned({P0: 5})
    _stop_with_a_value_in_the_message(member, P0, 5)

    status, headers, body = member.get("/status.json")

    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert ROW_VALUE not in body
    document = json.loads(body)
    report = StatusReport.from_json(document)
    assert json.loads(json.dumps(report.to_json())) == document
    assert report.info.topics == ("orders", "refunds")
    assert [(p.partition, p.stopped) for p in report.stopped] == [
        (0, StopCause(5, "InvalidRecordError", "amount"))
    ]


def test_a_field_that_is_not_a_name_is_not_shown() -> None:
    assert StopCause.of(3, "X", "a\nvalue: 4111") == StopCause(3, "X", None)
    assert StopCause.of(3, "not a class name!", "nesting depth").error == "error"
    assert StopCause.of(3, "DecodeError", "nesting depth").field == "nesting depth"


def test_rates_cover_the_last_minute_and_fall_to_zero_when_commits_stop() -> None:
    clock = FakeClock()
    health = Health(clock=clock.now)
    health.assigned({P0: 0})
    for _ in range(120):  # 120 s at 50 records/s, a commit every second
        clock.sleep(1)
        health.committed({P0: (health.positions()[P0] or 0) + 50})
    (state,) = health.partition_states()
    assert state.records_per_s == pytest.approx(50, rel=0.02)
    assert state.commits_per_min == pytest.approx(60, rel=0.02)
    assert state.last_commit_age_s == 0

    clock.sleep(90)
    (state,) = health.partition_states()
    assert (state.records_per_s, state.commits_per_min) == (0, 0)
    assert state.last_commit_age_s == 90


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "never"),
        (0.42, "0.4 s ago"),
        (12.4, "12 s ago"),
        (184, "3 min 4 s ago"),
        (7500, "2 h 5 min ago"),
    ],
)
def test_ages_read_naturally(seconds: float | None, text: str) -> None:
    assert age_text(seconds) == text


# -- run --workers N: the supervisor's page ------------------------------------------------------


@dataclass
class FakeSupervisor:
    views_now: list[WorkerView] = field(default_factory=list)
    stopping: bool = False
    count: int = 3

    def views(self) -> tuple[WorkerView, ...]:
        return tuple(self.views_now)

    def loop_age_s(self) -> float:
        return 0.1


def test_the_supervisors_page_lists_the_members_and_every_workers_partitions() -> None:
    workers = [_member(), _member()]
    endpoint: WorkerEndpoint | None = None
    try:
        workers[0].telemetry.partitions_assigned({P0: 10})
        workers[1].telemetry.partitions_assigned({P1: 20})
        _stop_with_a_value_in_the_message(workers[1], P1, 20)
        workers[0].metrics.bad_records.labels("orders", "0", "DecodeError", "dead_lettered").inc(2)
        workers[1].metrics.bad_records.labels("orders", "1", "DecodeError", "dead_lettered").inc(5)
        views = [
            WorkerView(0, "running", 4242, workers[0].server.port, 0, None),
            WorkerView(1, "running", 4343, workers[1].server.port, 1, -9),
            WorkerView(2, "restarting", None, None, 4, 1),
        ]
        endpoint = WorkerEndpoint("127.0.0.1", 0, FakeSupervisor(views))
        endpoint.start()

        status, headers, page = _get(endpoint.port, "/")
        _, _, body = _get(endpoint.port, "/status.json")
    finally:
        if endpoint is not None:
            endpoint.stop()
        for worker in workers:
            worker.server.stop()

    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert ROW_VALUE not in page
    assert ROW_VALUE not in body
    rows = _rows(page)
    assert "App | orders-app" in rows
    assert "Status | not ready" in rows
    assert "worker 2 exited and is waiting for its restart" in rows
    assert "0 | running | ready | 4242 | 0 | - | 1" in rows
    assert "1 | running | not ready | 4343 | 1 | -9 | 1" in rows
    assert "2 | restarting | - | - | 4 | 1 | -" in rows
    assert "1 | orders | 1 | 20 | amount | InvalidRecordError" in rows
    assert "0 | orders | 0 | 10 | - | - | never | 0.0 | 0.0 | consuming" in rows
    assert "Dead letters | 7" in rows
    document = json.loads(body)
    assert document["workers"]["2"] == {
        "state": "restarting",
        "pid": None,
        "restarts": 4,
        "last_exit": 1,
        "status": None,
    }
    assert document["workers"]["1"]["status"]["partitions"][0]["stopped"]["field"] == "amount"
