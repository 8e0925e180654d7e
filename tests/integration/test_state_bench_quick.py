"""The keyed-state benchmark's smoke test: `ops/bench/state --quick` at tiny sizes works end to
end, and both contenders' sinks are right key by key (count and sum), on SQLite and PostgreSQL,
after the first pass and after the flat-cost pass. It never judges speed.

Like tests/integration/test_bench_quick.py, the bench starts its own broker and PostgreSQL on
free ports and stops them by PID, so this test needs no service fixture (Java and PostgreSQL's
server binaries, as `ops/test` does).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.fixtures.services import REPO

pytestmark = [pytest.mark.integration, pytest.mark.fault]

BENCH_TIMEOUT_S = 300
KEYS = (3000,)  # one key count: each run costs a process start and a group join
HOT_KEYS, HOT_RECORDS = 50, 2000


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("state-bench-quick")
    # The checkout's own code, as it is: no git needed (CI may test an export of the tree).
    argv = [str(REPO / "ops" / "bench" / "state"), "--quick", "--engine", "worktree"]
    argv += ["--out", str(out)]
    argv += ["--keys", ",".join(map(str, KEYS)), "--idle-s", "0.5"]
    argv += ["--hot-keys", str(HOT_KEYS), "--hot-records", str(HOT_RECORDS)]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S
    )
    assert done.returncode == 0, f"ops/bench/state --quick failed:\n{done.stderr[-6000:]}"
    assert (out / "state.md").read_text().startswith("# offsetkeeper keyed-state benchmark")
    doc: dict[str, Any] = json.loads((out / "state.json").read_text())
    return doc


def test_every_cell_ran_with_both_contenders(quick_run: dict[str, Any]) -> None:
    assert quick_run["mode"] == "quick"
    cells = {(r["keys"], r["sink"], r["contender"], r["phase"]) for r in quick_run["runs"]}
    assert cells == {
        (n, sink, contender, phase)
        for n in KEYS
        for sink in ("sqlite", "postgresql")
        for contender in ("stateless", "stateful")
        for phase in ("first", "flat")
    }
    assert quick_run["correct"]


def test_each_key_count_and_sum_exact_in_both_contenders(quick_run: dict[str, Any]) -> None:
    for run in quick_run["runs"]:
        cell = (run["keys"], run["sink"], run["contender"], run["phase"])
        assert run["exit_code"] == 0, cell
        checks = run["checks"]
        failed = {name: c for name, c in checks.items() if not c["ok"]}
        assert not failed, (cell, failed)
        assert checks["rows"]["rows"] == run["keys"], cell
        assert checks["rows"]["wrong"] == 0, cell
        expected_records = run["keys"] if run["phase"] == "first" else HOT_RECORDS
        assert checks["records_committed"]["committed"] == expected_records, cell
        if run["contender"] == "stateful":
            assert checks["state"]["entries"] == run["keys"], cell
        else:
            assert "state" not in checks, cell


def test_figures_are_reported(quick_run: dict[str, Any]) -> None:
    summary = quick_run["summary"]
    assert len(summary["table"]) == len(summary["flat"]) == 2 * len(KEYS)
    for row in summary["table"] + summary["flat"]:
        assert row["with_state_rps"], row
        assert row["without_state_rps"], row
        assert row["peak_rss_with_state_mib"], row
