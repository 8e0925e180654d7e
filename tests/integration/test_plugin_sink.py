"""A third party's sink, installed with pip as a distribution of its own and found by
`offsetkeeper run` only through its `offsetkeeper.sinks` entry point, takes a real topic exactly
once; the checkpoint tools refuse it, since it implements `Sink` alone."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.apps.chaos import EVENTS, LATEST
from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_tools import (
    create_topic,
    end_offsets,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.plugins import MEMO_PLUGIN_DIR, load_memo_module, pip_install_target
from tests.fixtures.processes import OFFSETKEEPER, REPO, ConsumerProcess, run_args
from tests.fixtures.services import Service

pytestmark = pytest.mark.integration

PARTITIONS = 3
KEYS = 500
CHAOS_APP = "tests.apps.chaos:app"  # one row per (partition, offset, process): not idempotent
EXIT_FAILED = 1  # consumer.core's exit code for a failure that is not about one record


@pytest.fixture(scope="module")
def memo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The memo sink distribution, installed by pip into a directory of its own."""
    return pip_install_target(MEMO_PLUGIN_DIR, tmp_path_factory.mktemp("memo-plugin") / "site")


def _with_plugin(site: Path) -> dict[str, str]:
    """Environment of an offsetkeeper process that sees the installed plugin (and tests.apps)."""
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def test_an_installed_plugin_sink_takes_every_record_exactly_once(
    kafka: Service, memo_site: Path, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("memo"), unique_name("memo-group")
    create_topic(kafka.address, topic, PARTITIONS)
    root = tmp_path / "memo"
    sink_url = f"memo://{root}"
    args = run_args(CHAOS_APP, kafka.address, group, topic, sink_url, "--batch-max-records", "250")
    # Two runs: the second resumes from the checkpoints the plugin stored for the first.
    for run, (first, count) in enumerate([(0, 3_000), (3_000, 1_000)]):
        produce(kafka.address, topic, (chaos_event(i, KEYS) for i in range(first, first + count)))
        process = ConsumerProcess(
            [*args, "--stop-when-idle", "2"], tmp_path / f"run-{run}.log", _with_plugin(memo_site)
        )
        consumers.append(process)
        assert process.wait(timeout=180) == 0, process.log_path.read_text()[-4000:]
        assert any(e.get("sink") == sink_url for e in process.events()), "not the memo sink"

    produced = {
        (partition, offset): json.loads(value or b"")
        for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items()
        for offset, _key, value in records
    }
    assert len(produced) == 4_000
    sink = load_memo_module(memo_site).MemoSink(root)
    rows = sink.committed_rows(EVENTS.name)
    committed = Counter((row["source_partition"], row["source_offset"]) for row in rows)
    twice = sorted(where for where, times in committed.items() if times > 1)
    assert not twice, f"{len(twice)} records committed by both runs, e.g. {twice[:5]}"
    assert committed.keys() == produced.keys(), (
        f"missing {sorted(produced.keys() - committed.keys())[:5]},"
        f" never produced {sorted(committed.keys() - produced.keys())[:5]}"
    )
    for row in rows:
        where = (row["source_partition"], row["source_offset"])
        assert {"key": row["event_key"], "version": row["version"]} == produced[where], where
    assert len({row["writer"] for row in rows}) == 2, "each run wrote its own records"

    last_version: dict[str, int] = {}
    for _where, event in sorted(produced.items()):
        last_version[event["key"]] = max(last_version.get(event["key"], -1), event["version"])
    latest = {row["event_key"]: row["version"] for row in sink.committed_rows(LATEST.name)}
    assert latest == last_version, "upserts by key: the last version of each key wins"

    stored = {tp.partition: cp.next_offset for tp, cp in sink.load_checkpoints(group).items()}
    assert stored == end_offsets(kafka.address, topic, PARTITIONS)


def test_the_checkpoint_tools_refuse_a_sink_that_is_no_checkpoint_admin(
    memo_site: Path, tmp_path: Path
) -> None:
    sink_url = f"memo://{tmp_path}/memo"
    shown = subprocess.run(
        [OFFSETKEEPER, "checkpoint", "show", "--sink", sink_url, "--group", "orders"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **_with_plugin(memo_site)},
    )
    assert shown.returncode == EXIT_FAILED, shown.stderr
    assert (
        f"offsetkeeper: error: this sink does not support the checkpoint tools (sink='{sink_url}')"
    ) in shown.stderr
    assert "Traceback" not in shown.stderr
