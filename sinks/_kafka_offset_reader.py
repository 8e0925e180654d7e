"""A group's committed offsets, read by an admin client in a child process.

librdkafka (2.16 and its master as of 2026-07) dereferences a null group handle when an admin
client's OffsetFetch is answered NOT_COORDINATOR or COORDINATOR_NOT_AVAILABLE
(confluentinc/librdkafka#5040): the process dies of SIGSEGV. A moving group coordinator (its
broker killed or restarted) makes exactly that answer, and the Kafka sink reads its checkpoints
this way on every assignment. In a child process the crash costs a new child and a second try,
not the consumer.

The parent (`IsolatedOffsetReader`) and the child (this file run as a script: it imports only
the standard library, confluent_kafka and structlog, so it starts in a tenth of a second,
without the `sinks` package) speak JSON lines
over the child's stdin and stdout. The first line is the client configuration (on a pipe, not
the command line, where secrets would show). The child exits when its stdin closes, so it never
outlives the consumer, even one killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import confluent_kafka
import confluent_kafka.admin
import structlog

log = structlog.get_logger("offsetkeeper.sink.kafka")

# A child that crashed is replaced and the request sent again, this many times in a row (the
# caller waits out a moving coordinator on top of that).
CRASH_RETRIES = 2
_CRASH_PAUSE_S = 0.5  # the coordinator moving is what crashes it: give the move a moment
_START_TIMEOUT_S = 30.0
_ANSWER_MARGIN_S = 15.0  # beyond the request's own timeout, before the child is declared hung


@dataclass(frozen=True, slots=True)
class OffsetAnswer:
    """One partition of the answer, shaped like confluent_kafka's TopicPartition."""

    topic: str
    partition: int
    offset: int
    metadata: str | None
    error: confluent_kafka.KafkaError | None


class OffsetReaderCrashedError(Exception):
    """The child kept dying (CRASH_RETRIES in a row) before it answered."""


class IsolatedOffsetReader:
    """`list_consumer_group_offsets` through a long-lived child process, replaced when it dies.

    A request-level failure raises `confluent_kafka.KafkaException`, as the admin client's own
    future would. Calls are serialized (one child, one request at a time)."""

    def __init__(
        self,
        client_config: Mapping[str, Any],
        *,
        sink: str,
        command: Sequence[str] | None = None,
        answer_margin_s: float = _ANSWER_MARGIN_S,
    ) -> None:
        self._config = dict(client_config)
        self._sink = sink
        self._answer_margin_s = answer_margin_s
        self._command = list(command) if command else [sys.executable, str(Path(__file__))]
        self._child: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self.crashes = 0

    @property
    def child_pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def list_offsets(
        self,
        group: str,
        partitions: Sequence[tuple[str, int]] | None,
        *,
        require_stable: bool,
        timeout_s: float,
    ) -> list[OffsetAnswer]:
        request = {
            "group": group,
            "partitions": None if partitions is None else [list(tp) for tp in partitions],
            "require_stable": require_stable,
            "timeout_s": timeout_s,
        }
        with self._lock:
            for attempt in range(CRASH_RETRIES + 1):
                reply = self._ask(request, timeout_s + self._answer_margin_s)
                if reply is not None:
                    return _answers(reply)
                if attempt < CRASH_RETRIES:
                    time.sleep(_CRASH_PAUSE_S)
        raise OffsetReaderCrashedError(
            f"the offset reader process died {CRASH_RETRIES + 1} times in a row reading"
            f" group {group!r}"
        )

    def close(self) -> None:
        with self._lock:
            self._stop_child()

    # -- the child -------------------------------------------------------------------------

    def _ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The child's reply, or None when it died first (it is reaped and reported)."""
        child = self._ensure_child()
        try:
            _pipe(child.stdin).write(json.dumps(request) + "\n")
            _pipe(child.stdin).flush()
        except (BrokenPipeError, OSError):
            self._reap_crashed(request.get("group"))
            return None
        line = _read_line(child, timeout_s)
        if line is None:
            self._stop_child()
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(
                    confluent_kafka.KafkaError._TIMED_OUT,
                    f"the offset reader process gave no answer in {timeout_s:.0f}s",
                )
            )
        if not line:
            self._reap_crashed(request.get("group"))
            return None
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _ensure_child(self) -> subprocess.Popen[str]:
        if self._child is not None and self._child.poll() is None:
            return self._child
        child = subprocess.Popen(  # noqa: S603 - our own command line, no shell
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        _pipe(child.stdin).write(json.dumps(self._config) + "\n")
        _pipe(child.stdin).flush()
        started = _read_line(child, _START_TIMEOUT_S)
        reply = json.loads(started) if started else None
        if not reply or "error" in reply:
            _kill(child)
            code, reason = (reply or {}).get("error") or (
                confluent_kafka.KafkaError._FAIL,
                f"the offset reader process did not start (exit {child.returncode})",
            )
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(code, reason))
        self._child = child
        return child

    def _reap_crashed(self, group: object) -> None:
        child = self._child
        self._child = None
        if child is None:
            return
        _kill(child)
        self.crashes += 1
        log.warning(
            "kafka_sink_offset_reader_died",
            exit_code=child.returncode,
            group=group,
            sink=self._sink,
            why="librdkafka crashes on an admin OffsetFetch answered NOT_COORDINATOR"
            " (confluentinc/librdkafka#5040); the read is retried in a new child",
        )

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            _kill(child)


def _read_line(child: subprocess.Popen[str], timeout_s: float) -> str | None:
    """One line from the child; "" when it exited, None when `timeout_s` passed."""
    stdout = _pipe(child.stdout)
    ready, _, _ = select.select([stdout], [], [], timeout_s)
    if not ready:
        return None
    return stdout.readline()


def _pipe(stream: IO[str] | None) -> IO[str]:
    if stream is None:
        raise RuntimeError("the offset reader process was started without pipes")
    return stream


def _kill(child: subprocess.Popen[str]) -> None:
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):  # a broken pipe to a dead child
                stream.close()
    if child.poll() is None:
        try:
            child.wait(timeout=2)  # its stdin closed: it exits by itself
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _answers(reply: dict[str, Any]) -> list[OffsetAnswer]:
    if "error" in reply:
        code, reason = reply["error"]
        raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(code, reason))
    return [
        OffsetAnswer(
            topic=topic,
            partition=partition,
            offset=offset,
            metadata=metadata,
            error=None if error is None else confluent_kafka.KafkaError(error[0], error[1]),
        )
        for topic, partition, offset, metadata, error in reply["answers"]
    ]


# -- the child process --------------------------------------------------------------------


def _error_pair(error: confluent_kafka.KafkaError) -> list[Any]:
    return [error.code(), error.str()]


def _serve(admin: Any, request: dict[str, Any]) -> dict[str, Any]:
    partitions = request["partitions"]
    group = request["group"]
    query = confluent_kafka.ConsumerGroupTopicPartitions(
        group,
        None
        if partitions is None
        else [confluent_kafka.TopicPartition(topic, partition) for topic, partition in partitions],
    )
    try:
        future = admin.list_consumer_group_offsets(
            [query],
            require_stable=request["require_stable"],
            request_timeout=request["timeout_s"],
        )[group]
        listed = future.result().topic_partitions or []
    except confluent_kafka.KafkaException as exc:
        return {"error": _error_pair(exc.args[0])}
    return {
        "answers": [
            [
                tp.topic,
                tp.partition,
                tp.offset,
                tp.metadata,
                None if tp.error is None else _error_pair(tp.error),
            ]
            for tp in listed
        ]
    }


def main() -> int:
    # The consumer's own shutdown closes our stdin; a Ctrl-C to the terminal's process group
    # must not kill a read in flight first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.stdin.readline() or "{}")
    try:
        admin = confluent_kafka.admin.AdminClient(config)
    except confluent_kafka.KafkaException as exc:
        print(json.dumps({"error": _error_pair(exc.args[0])}), flush=True)
        return 1
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve(admin, json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
