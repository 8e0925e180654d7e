"""ops/prometheus (alert rules) and ops/grafana (dashboard), checked by Prometheus's own
promtool: the rules load, each alert has a unit test that fires it (`promtool test rules`),
every dashboard query is valid PromQL, and every metric they name is one the consumer exports.
(tests/integration/test_prometheus_alerts.py runs them against a real server.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.fixtures.monitoring import (
    RULE_TESTS,
    RULES,
    alert_rules,
    consumer_exported_names,
    dashboard,
    dashboard_queries,
    dashboard_variable_queries,
    named_in_monitoring,
)
from tests.fixtures.tools import require_tool

ALERTS = {
    "OffsetkeeperPartitionStopped",
    "OffsetkeeperLagGrowing",
    "OffsetkeeperNoCommitWhileLagging",
    "OffsetkeeperRecordsLost",
    "OffsetkeeperFenced",
    "OffsetkeeperDeadLettersRising",
    "OffsetkeeperSinkFailing",
}


def _promtool(*args: str, cwd: Path | None = None) -> str:
    promtool = require_tool("promtool", "the alert rules' tests")
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_the_rules_load_in_promtool() -> None:
    output = _promtool("check", "rules", str(RULES))

    assert f"SUCCESS: {len(ALERTS)} rules found" in output
    assert set(alert_rules()) == ALERTS
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_every_alert_fires_in_its_promtool_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for test in tests
        for check in test["alert_rule_test"]
        if check.get("exp_alerts")
    }
    assert fired == ALERTS

    output = _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)

    assert "SUCCESS" in output


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, expr in enumerate([*queries.values()])
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    output = _promtool("check", "rules", str(path))

    assert f"SUCCESS: {len(rules)} rules found" in output


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    titles = {panel["title"] for panel in dashboard()["panels"] if panel["type"] != "row"}
    for wanted in (
        "Throughput",
        "Lag per partition",
        "Commit latency",
        "Batch sizes",
        "Rebalances",
        "Fencing",
        "Bad records",
        "Sink retries",
    ):
        assert wanted in titles
    assert all(v.startswith("label_values(") for v in dashboard_variable_queries())


def test_every_metric_the_dashboard_and_rules_name_is_exported() -> None:
    named = named_in_monitoring()
    exported = consumer_exported_names()

    assert named - exported == set()
    # The families an operator needs are all used somewhere.
    for family in (
        "offsetkeeper_records_committed_total",
        "offsetkeeper_consumer_lag",
        "offsetkeeper_sink_duration_seconds_bucket",
        "offsetkeeper_batch_records_bucket",
        "offsetkeeper_rebalances_total",
        "offsetkeeper_fenced_partitions_total",
        "offsetkeeper_bad_records_total",
        "offsetkeeper_sink_retries_total",
        "offsetkeeper_partitions_stopped",
        "offsetkeeper_records_lost_total",
    ):
        assert family in named
