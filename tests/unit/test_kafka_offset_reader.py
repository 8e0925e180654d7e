"""sinks._kafka_offset_reader's parent side against a stand-in child (no broker): answers and
errors come back as confluent_kafka's types, a child that dies mid-request is replaced and the
request sent again (and reported), one that keeps dying or hangs is an error, and the child never
outlives its consumer, even one killed with SIGKILL. The real child against a real broker is in
tests/integration/test_kafka_sink.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

from sinks._kafka_offset_reader import (
    CRASH_RETRIES,
    IsolatedOffsetReader,
    OffsetReaderCrashedError,
)
from tests.fixtures.processes import process_state

# A stand-in for the child: the same protocol, canned answers. Before each answer it dies of
# SIGSEGV while the number in a file is above zero, counting it down; while that file's name
# with ".hang" added exists, it never answers.
FAKE_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    config = json.loads(sys.stdin.readline())
    print(json.dumps({"ready": os.getpid()}), flush=True)
    crashes = Path(config["crashes"])
    for line in sys.stdin:
        request = json.loads(line)
        left = int(crashes.read_text() or 0)
        if left > 0:
            crashes.write_text(str(left - 1))
            os.kill(os.getpid(), signal.SIGSEGV)
        if Path(config["crashes"] + ".hang").exists():
            time.sleep(3600)
        if request["group"] == "broken":
            print(json.dumps({"error": [15, "Broker: Coordinator not available"]}), flush=True)
            continue
        answers = [
            [topic, partition, 10 * partition, "meta", None]
            for topic, partition in request["partitions"] or [["t", 0], ["t", 1]]
        ]
        answers.append(["t", 9, -1001, None, [88, "unstable"]])
        print(json.dumps({"answers": answers, "stable": request["require_stable"]}), flush=True)
    """
)


def _reader(tmp_path: Path) -> tuple[IsolatedOffsetReader, Path]:
    script, counter = tmp_path / "child.py", tmp_path / "crashes"
    script.write_text(FAKE_CHILD)
    counter.write_text("0")
    reader = IsolatedOffsetReader(
        {"crashes": str(counter)},
        sink="kafka://test/out",
        command=[sys.executable, str(script)],
        answer_margin_s=1.0,
    )
    return reader, counter


def test_answers_come_back_as_confluent_kafka_types(tmp_path: Path) -> None:
    reader, _ = _reader(tmp_path)
    try:
        answers = reader.list_offsets("g", [("t", 2), ("u", 3)], require_stable=True, timeout_s=5)
    finally:
        reader.close()
    assert [(a.topic, a.partition, a.offset, a.metadata) for a in answers[:2]] == [
        ("t", 2, 20, "meta"),
        ("u", 3, 30, "meta"),
    ]
    assert answers[0].error is None
    unstable = answers[2].error
    assert isinstance(unstable, confluent_kafka.KafkaError)
    assert unstable.code() == confluent_kafka.KafkaError.UNSTABLE_OFFSET_COMMIT


def test_a_request_level_error_raises_kafka_exception_with_its_code(tmp_path: Path) -> None:
    reader, _ = _reader(tmp_path)
    try:
        with pytest.raises(confluent_kafka.KafkaException) as raised:
            reader.list_offsets("broken", None, require_stable=False, timeout_s=5)
        # The child is still serving after an error answer.
        assert len(reader.list_offsets("g", None, require_stable=False, timeout_s=5)) == 3
    finally:
        reader.close()
    assert raised.value.args[0].code() == confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE


def test_a_child_dying_mid_request_is_replaced_and_the_request_sent_again(
    tmp_path: Path, log_events: list[MutableMapping[str, Any]]
) -> None:
    reader, counter = _reader(tmp_path)
    try:
        first_pid = _started_pid(reader)
        counter.write_text(str(CRASH_RETRIES))
        answers = reader.list_offsets("g", [("t", 4)], require_stable=True, timeout_s=5)
        assert reader.child_pid != first_pid
    finally:
        reader.close()
    assert [(a.topic, a.partition, a.offset) for a in answers[:1]] == [("t", 4, 40)]
    assert counter.read_text() == "0"
    assert reader.crashes == CRASH_RETRIES
    died = [e for e in log_events if e["event"] == "kafka_sink_offset_reader_died"]
    assert [e["exit_code"] for e in died] == [-signal.SIGSEGV] * CRASH_RETRIES
    assert {e["group"] for e in died} == {"g"}
    assert "librdkafka#5040" in died[0]["why"]


def test_a_child_that_keeps_dying_is_an_error_not_a_loop(tmp_path: Path) -> None:
    reader, counter = _reader(tmp_path)
    try:
        _started_pid(reader)
        counter.write_text("100")
        with pytest.raises(OffsetReaderCrashedError, match="died 3 times in a row"):
            reader.list_offsets("g", None, require_stable=False, timeout_s=5)
    finally:
        reader.close()
    assert counter.read_text() == str(100 - (CRASH_RETRIES + 1))


def test_a_hung_child_is_killed_and_reported_as_a_timeout(tmp_path: Path) -> None:
    reader, counter = _reader(tmp_path)
    pid = _started_pid(reader)
    Path(f"{counter}.hang").touch()
    started = time.monotonic()
    with pytest.raises(confluent_kafka.KafkaException) as raised:
        reader.list_offsets("g", None, require_stable=False, timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert raised.value.args[0].code() == confluent_kafka.KafkaError._TIMED_OUT
    assert reader.child_pid is None
    _wait_gone(pid)


def test_close_ends_the_child(tmp_path: Path) -> None:
    reader, _ = _reader(tmp_path)
    pid = _started_pid(reader)
    reader.close()
    _wait_gone(pid)


def test_the_child_does_not_outlive_a_consumer_killed_with_sigkill(tmp_path: Path) -> None:
    script, counter = tmp_path / "child.py", tmp_path / "crashes"
    script.write_text(FAKE_CHILD)
    counter.write_text("0")
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from sinks._kafka_offset_reader import IsolatedOffsetReader
                reader = IsolatedOffsetReader(
                    {{"crashes": {str(counter)!r}}}, sink="s",
                    command=[sys.executable, {str(script)!r}],
                )
                reader.list_offsets("g", None, require_stable=False, timeout_s=5)
                print(reader.child_pid, flush=True)
                time.sleep(3600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    _wait_gone(child_pid)


def _started_pid(reader: IsolatedOffsetReader) -> int:
    reader.list_offsets("g", None, require_stable=False, timeout_s=5)
    pid = reader.child_pid
    assert pid is not None
    return pid


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until `pid` has exited: gone, or a zombie its new parent has not reaped yet (a
    container's PID 1 may never reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours (close, a timeout): reap it
        try:
            state = process_state(pid)
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")
