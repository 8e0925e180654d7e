"""consumer.runtime.worker_endpoint: the supervisor's one endpoint for all its workers, over
real worker endpoints (`OpsServer`s with their own registry and health) on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumer import TopicPartition
from consumer.runtime.health import Health
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import OpsServer
from consumer.runtime.supervisor import WorkerView
from consumer.runtime.telemetry import Telemetry
from consumer.runtime.worker_endpoint import (
    Fetched,
    WorkerEndpoint,
    label_sample,
    liveness,
    merge_metrics,
    readiness,
)
from tests.fixtures.fake_backend import FakeClock

# -- labelling and merging -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "labelled"),
    [
        ("up 1.0", 'up{worker="3"} 1.0'),
        ('lag{topic="t",partition="0"} 5.0', 'lag{worker="3",topic="t",partition="0"} 5.0'),
        ("x{} 2", 'x{worker="3"} 2'),
        ("x_total 7 1700000000000", 'x_total{worker="3"} 7 1700000000000'),
        ('y{a="} {"} 1', 'y{worker="3",a="} {"} 1'),
    ],
)
def test_a_sample_gets_the_worker_label_first(line: str, labelled: str) -> None:
    assert label_sample(line, "worker", "3") == labelled


def _exposition(committed: int, lag: int) -> str:
    metrics = Metrics(app="orders", group="g", process_metrics=False)
    metrics.records_committed.labels("orders", "0").inc(committed)
    metrics.lag.labels("orders", "0").set(lag)
    metrics.batch_records.observe(committed)
    return generate_latest(metrics.registry).decode()


def test_merged_metrics_keep_one_help_and_type_per_family_and_every_workers_samples() -> None:
    merged = merge_metrics({0: _exposition(10, 1), 1: _exposition(20, 2)})

    helps = [line for line in merged.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps)), "a family is declared twice"
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    committed = {
        s.labels["worker"]: s.value
        for s in families["offsetkeeper_records_committed"].samples
        if s.name.endswith("_total")
    }
    assert committed == {"0": 10.0, "1": 20.0}
    lag = {s.labels["worker"]: s.value for s in families["offsetkeeper_consumer_lag"].samples}
    assert lag == {"0": 1.0, "1": 2.0}
    buckets = [s for s in families["offsetkeeper_batch_records"].samples if s.name.endswith("_sum")]
    assert sorted((s.labels["worker"], s.value) for s in buckets) == [("0", 10.0), ("1", 20.0)]
    # A family's samples stay together: each family name starts one contiguous block.
    names = [line.split()[2] for line in merged.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_samples_without_a_declared_family_become_a_family_of_their_own() -> None:
    merged = merge_metrics({0: "# HELP a A\n# TYPE a gauge\na 1\nb 2\n", 1: "a 3\n"})
    assert merged.splitlines() == [
        "# HELP a A",
        "# TYPE a gauge",
        'a{worker="0"} 1',
        'a{worker="1"} 3',
        'b{worker="0"} 2',
    ]


# -- the verdicts ------------------------------------------------------------------------------


def _view(
    index: int, state: str = "running", port: int | None = 1, restarts: int = 0
) -> WorkerView:
    return WorkerView(index, state, 100 + index, port, restarts, None)  # type: ignore[arg-type]


READY = Fetched(200, b'{"status": "ready", "reasons": [], "partitions": 2, "lag": 3}')


def test_ready_only_when_every_worker_is_ready() -> None:
    views = [_view(0), _view(1)]
    verdict = readiness(views, False, {0: READY, 1: READY})
    assert verdict.ok
    assert (verdict.body["partitions"], verdict.body["lag"]) == (4, 6)

    not_ready = Fetched(503, b'{"status": "not ready", "reasons": ["joining the consumer group"]}')
    verdict = readiness(views, False, {0: READY, 1: not_ready})
    assert not verdict.ok
    assert verdict.body["reasons"] == ["worker 1: joining the consumer group"]

    verdict = readiness([_view(0), _view(1, "restarting", None, 1)], False, {0: READY})
    assert verdict.body["reasons"] == ["worker 1 exited and is waiting for its restart"]
    assert not readiness(views, False, {0: READY, 1: None}).ok  # starting
    assert readiness(views, True, {0: READY, 1: READY}).body["reasons"] == ["shutting down"]


def test_a_finished_worker_is_not_waited_for() -> None:
    verdict = readiness([_view(0), _view(1, "finished", None)], False, {0: READY})
    assert verdict.ok
    assert not readiness([_view(0, "finished", None)], False, {}).ok  # nobody left


def test_alive_unless_the_loop_or_a_workers_own_loop_stalled() -> None:
    views = [_view(0), _view(1, "restarting", None, 2)]
    assert liveness(views, 0.1, {0: Fetched(200, b"{}")}).ok
    assert liveness(views, 0.1, {0: None}).ok, "no answer yet is not a stall"
    stalled = liveness(views, 0.1, {0: Fetched(503, b'{"status": "stalled"}')})
    assert not stalled.ok
    assert stalled.body["reasons"] == ["worker 0: its partition loop stalled"]
    assert not liveness(views, 11, {0: Fetched(200, b"{}")}).ok


# -- the endpoint over real worker endpoints ---------------------------------------------------


@dataclass
class FakeSupervisor:
    views_now: list[WorkerView] = field(default_factory=list)
    stopping: bool = False
    count: int = 2

    def views(self) -> tuple[WorkerView, ...]:
        return tuple(self.views_now)

    def loop_age_s(self) -> float:
        return 0.1


@dataclass
class Worker:
    server: OpsServer
    health: Health
    telemetry: Telemetry


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started = []
    for _ in range(2):
        clock = FakeClock()
        health = Health(clock=clock.now)
        metrics = Metrics(app="orders", group="g", process_metrics=False)
        telemetry = Telemetry(metrics, health)
        server = OpsServer("127.0.0.1", 0, metrics.registry, health)
        server.start()
        started.append(Worker(server, health, telemetry))
    yield started
    for worker in started:
        worker.server.stop()


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_endpoint_merges_the_workers_and_adds_its_own_metrics(workers: list[Worker]) -> None:
    tp = TopicPartition("orders", 0)
    for index, worker in enumerate(workers):
        worker.health.assigned({tp: 0})
        worker.telemetry.metrics.assigned_partitions.set(index + 1)
    supervisor = FakeSupervisor(
        [_view(0, port=workers[0].server.port), _view(1, "restarting", None, restarts=3)]
    )
    endpoint = WorkerEndpoint("127.0.0.1", 0, supervisor)
    endpoint.start()
    try:
        status, body = _get(endpoint.port, "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert samples[("offsetkeeper_assigned_partitions", (("worker", "0"),))] == 1
        assert ("offsetkeeper_assigned_partitions", (("worker", "1"),)) not in samples
        assert samples[("offsetkeeper_workers", ())] == 2
        assert samples[("offsetkeeper_worker_up", (("worker", "0"),))] == 1
        assert samples[("offsetkeeper_worker_up", (("worker", "1"),))] == 0
        assert samples[("offsetkeeper_worker_restarts_total", (("worker", "1"),))] == 3

        assert _get(endpoint.port, "/healthz")[0] == 200
        assert _get(endpoint.port, "/readyz")[0] == 503  # worker 1 is waiting for its restart
        supervisor.views_now = [_view(i, port=w.server.port) for i, w in enumerate(workers)]
        status, body = _get(endpoint.port, "/readyz")
        assert status == 200, body
        assert _get(endpoint.port, "/nothing")[0] == 404
    finally:
        endpoint.stop()
