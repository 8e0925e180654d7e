"""A real network partition of one member of two (issue #19, item 2).

One `offsetkeeper run` member lives in a network namespace of its own and reaches this test's
Kafka broker and PostgreSQL over a veth link (both listen on the host end of it, 10.231.N.1);
the other member runs on the host and uses the same addresses. While the namespaced member
holds a batch (tests/apps/held_chaos.py: mid-batch, uncommitted), nftables inside its
namespace drops every packet to and from the broker's port, and only those: it is now a
zombie that still reaches the database. The host member must take over its partitions once
the session times out, and commit them; the zombie's late commit must be refused by the sink's
epoch check (`partitions_fenced`, `offsetkeeper_fenced_partitions_total`); after the heal it
must rejoin the group and commit again, as README "Guarantees" says (a fenced member drops
those partitions and goes on). Then row by row: every record's output exactly once (the app
also adds a random-id row per apply, so a double apply shows even within one process),
checkpoints at the end offsets.

Short form (CI): one episode on the confluent client, the late commit arriving while the zombie
is still cut off. Long form (ops/chaos): four cut/heal cycles with more records on each client
(confluent, aiokafka), the late commit arriving alternately while cut off and after the heal.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer import mask_url
from tests.apps.held_chaos import held_marker
from tests.chaos.conftest import long_form, scaled
from tests.fixtures.chaos import PacedProducer, verify_chaos_sink
from tests.fixtures.kafka_tools import create_topic, end_offsets, unique_name
from tests.fixtures.netns import (
    NamespacedConsumer,
    PrivateLink,
    create_private_link,
    remove_private_link,
)
from tests.fixtures.pg import create_database, query
from tests.fixtures.processes import FAST_GROUP_SETTINGS, ConsumerProcess, run_args, wait_until
from tests.fixtures.services import free_port, run_ops, warm_up_group_coordinator

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.chaos]

APP = "tests.apps.held_chaos:app"
# The short form keeps CI to one episode on the default client; the long form runs both.
BACKENDS = ["confluent", "aiokafka"] if long_form() else ["confluent"]
PARTITIONS = 6
CYCLES = int(scaled(1, 4))
RATE = scaled(150, 400)  # records per second while a cycle runs
CYCLE_RECORDS = int(scaled(4_500, 16_000))
FINAL_RECORDS = int(scaled(600, 4_000))
SESSION_TIMEOUT_S = next(
    int(setting.split("=")[1]) / 1000
    for setting in FAST_GROUP_SETTINGS
    if setting.startswith("session.timeout.ms=")
)
RECONNECT_S = 5.0  # after a heal, before a held zombie lets its batch go


@dataclass(frozen=True)
class PartitionLab:
    """The namespace's link, and a broker and a database listening on its host end."""

    link: PrivateLink
    bootstrap: str
    broker_port: int
    server_dsn: str


@dataclass(frozen=True)
class Run:
    """The topic, group and database of one test, its Kafka client, and the namespaced
    member's gate file."""

    topic: str
    group: str
    dsn: str
    gate: Path
    backend: str


@dataclass(frozen=True)
class Held:
    """What the namespaced member held when its route to Kafka was cut."""

    partition: int
    offset: int
    epochs: dict[int, int]  # partition -> the zombie's fencing epoch


@dataclass(frozen=True)
class Episode:
    """The figures of one cut, takeover, late commit and heal."""

    held_partition: int
    held_offset: int
    zombie_partitions: list[int]
    takeover_s: float  # cut -> the host member's first commit of a partition the zombie held
    late_commit_while_cut: bool
    fenced_after_release_s: float  # the zombie's batch let go -> its commit refused
    rejoin_s: float  # heal -> the zombie assigned partitions again
    dropped_packets: int


def _stop_quietly(script: str, data_dir: Path) -> None:
    if data_dir.exists():
        try:
            run_ops(script, "stop", "--data-dir", str(data_dir))
        except RuntimeError as exc:
            print(f"could not stop {script} of {data_dir}: {exc}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PartitionLab]:
    """A namespace and its link, with a broker and a database of this module's own on the
    host end; all stopped, and the namespace deleted, however the tests end."""
    link = create_private_link()
    kafka_dir = tmp_path_factory.mktemp("partition-kafka") / "kafka"
    # PostgreSQL runs as its own OS user when we are root: pytest's tmp dirs are private to us.
    pg_root = Path(tempfile.mkdtemp(prefix="offsetkeeper-partition-pg-"))
    pg_root.chmod(0o755)
    host = ("--host", link.host_address)
    try:
        broker_port = free_port()
        bootstrap = run_ops(
            "kafka-local",
            "start",
            *host,
            "--port",
            str(broker_port),
            "--controller-port",
            str(free_port()),
            "--data-dir",
            str(kafka_dir),
        )
        warm_up_group_coordinator(bootstrap)
        server_dsn = run_ops(
            "postgres-local",
            "start",
            *host,
            "--port",
            str(free_port()),
            "--data-dir",
            str(pg_root / "postgres"),
        )
        yield PartitionLab(link, bootstrap, broker_port, server_dsn)
    finally:
        _stop_quietly("kafka-local", kafka_dir)
        _stop_quietly("postgres-local", pg_root / "postgres")
        shutil.rmtree(pg_root, ignore_errors=True)
        remove_private_link(link)


# --- what the members and the sink say -------------------------------------------------------


def _partition_of(name: str) -> int:
    return int(name.rsplit("[", 1)[1].rstrip("]"))  # "topic[3]"


def _assignment(member: ConsumerProcess) -> dict[int, int]:
    """Partition -> fencing epoch of what the member holds now, replayed from its log."""
    held: dict[int, int] = {}
    for event in member.events():
        name = event.get("event")
        if name == "partitions_assigned":
            held.update({_partition_of(tp): int(e) for tp, e in event["epochs"].items()})
        elif name in ("partitions_revoked", "partitions_lost", "partitions_fenced"):
            for tp in event["partitions"]:
                held.pop(_partition_of(tp), None)
    return held


def _events(member: ConsumerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in member.events() if e.get("event") == name]


def _checkpoints(dsn: str, group: str) -> dict[int, tuple[int, int]]:
    """Partition -> (next offset, epoch of the member that committed it)."""
    rows = query(
        dsn,
        "SELECT partition, next_offset, epoch FROM offsetkeeper_checkpoints WHERE group_id = %s",
        (group,),
    )
    return {int(p): (int(o), int(e)) for p, o, e in rows}


def _require_alive(member: ConsumerProcess, what: str) -> None:
    if not member.alive():
        raise AssertionError(f"{what} exited; its log:\n{member.log_path.read_text()[-4000:]}")


def _fenced_metric(lab: PartitionLab, zombie: ConsumerProcess) -> float:
    """offsetkeeper_fenced_partitions_total summed, scraped over the link (its endpoint listens
    on the namespace's address; the cut drops only the broker's port)."""
    port = int(_events(zombie, "ops_server_listening")[0]["port"])
    url = f"http://{lab.link.member_address}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "offsetkeeper_fenced_partitions_total"
    )


# --- one partition episode -------------------------------------------------------------------


def _wait_group_settled(host: ConsumerProcess, zombie: ConsumerProcess) -> None:
    """Until the two members split the partitions between them (no rebalance under way)."""

    def settled() -> bool:
        mine, theirs = set(_assignment(zombie)), set(_assignment(host))
        split = bool(mine) and bool(theirs) and not mine & theirs
        return split and mine | theirs == set(range(PARTITIONS))

    wait_until(
        lambda: settled() or not (host.alive() and zombie.alive()),
        timeout=180,
        what="the two members to split the partitions",
    )
    _require_alive(host, "the host member")
    _require_alive(zombie, "the namespaced member")


def _hold_a_batch(
    host: ConsumerProcess, zombie: ConsumerProcess, gate: Path, dsn: str, group: str
) -> Held:
    """Once the members split the partitions and the namespaced one commits under its epochs,
    make it hold its next record mid-batch (the gate), and say which."""
    _wait_group_settled(host, zombie)
    epochs = _assignment(zombie)
    wait_until(
        lambda: any(_checkpoints(dsn, group).get(p, (0, 0))[1] == e for p, e in epochs.items()),
        timeout=60,
        what="the namespaced member to commit under its epochs",
    )
    marker = held_marker(gate)
    marker.unlink(missing_ok=True)
    gate.touch()
    wait_until(
        lambda: marker.exists() or not zombie.alive(),
        timeout=60,
        what="the namespaced member to hold a batch",
    )
    _require_alive(zombie, "the namespaced member")
    held = json.loads(marker.read_text())
    assert held["pid"] == zombie.pid, "the held batch must be the namespaced member's"
    epochs = _assignment(zombie)
    assert held["partition"] in epochs, "it holds a record of a partition it owns"
    return Held(held["partition"], held["offset"], epochs)


def _cut_and_take_over(
    lab: PartitionLab, host: ConsumerProcess, held: Held, dsn: str, group: str
) -> float:
    """Cut the zombie's route to the broker; the seconds until the host member commits a
    partition the zombie held (a checkpoint under a newer epoch than the zombie's)."""
    lab.link.cut(lab.link.host_address, lab.broker_port)
    cut_at = time.monotonic()

    def taken_over() -> bool:
        stored = _checkpoints(dsn, group)
        return any(p in stored and stored[p][1] > e for p, e in held.epochs.items())

    wait_until(taken_over, timeout=120, interval=0.05, what="the host member to take over")
    takeover_s = time.monotonic() - cut_at
    assert set(held.epochs) <= set(_assignment(host)), "the host member took them all"
    # The host re-did the held record: from here on the zombie's batch is stale.
    wait_until(
        lambda: _checkpoints(dsn, group).get(held.partition, (0, 0))[0] > held.offset,
        timeout=120,
        what="the host member to commit past the held record",
    )
    return takeover_s


def _release_until_fenced(zombie: ConsumerProcess, gate: Path, topic: str, held: Held) -> float:
    """Let the zombie finish its batch; the seconds until its commit of the held partition is
    refused (a pipelined batch before it may be refused first, in an event of its own)."""
    fenced_before = len(_events(zombie, "partitions_fenced"))

    def held_partition_fenced() -> bool:
        refused = _events(zombie, "partitions_fenced")[fenced_before:]
        return any(f"{topic}[{held.partition}]" in e["partitions"] for e in refused)

    released_at = time.monotonic()
    gate.unlink()
    wait_until(
        lambda: held_partition_fenced() or not zombie.alive(),
        timeout=90,
        interval=0.05,
        what="the zombie's late commit to be fenced",
    )
    fenced_s = time.monotonic() - released_at
    _require_alive(zombie, "the fenced member")  # it drops the partitions and goes on
    return fenced_s


def _wait_rejoined(zombie: ConsumerProcess, assigned_before: int, healed_at: float) -> float:
    """The seconds from the heal until the zombie is assigned partitions again."""
    wait_until(
        lambda: (
            not zombie.alive()
            or (
                len(_events(zombie, "partitions_assigned")) > assigned_before
                and bool(_assignment(zombie))
            )
        ),
        timeout=180,
        what="the healed member to rejoin the group",
    )
    _require_alive(zombie, "the healed member")
    return time.monotonic() - healed_at


def _episode(
    lab: PartitionLab,
    host: ConsumerProcess,
    zombie: ConsumerProcess,
    run: Run,
    late_commit_while_cut: bool,
) -> Episode:
    """One cut, takeover, late commit and heal, with a stream of records flowing throughout."""
    dsn, group, topic, gate = run.dsn, run.group, run.topic, run.gate
    producer = PacedProducer(lab.bootstrap, topic, total=CYCLE_RECORDS, rate=RATE).start()
    held = _hold_a_batch(host, zombie, gate, dsn, group)
    assigned_before = len(_events(zombie, "partitions_assigned"))
    takeover_s = _cut_and_take_over(lab, host, held, dsn, group)
    dropped = lab.link.dropped_packets()
    assert dropped > 0, "the cut dropped nothing: the zombie was not cut off"
    if late_commit_while_cut:
        fenced_s = _release_until_fenced(zombie, gate, topic, held)
        lab.link.heal()
        healed_at = time.monotonic()
    else:
        lab.link.heal()
        healed_at = time.monotonic()
        # Its client reconnects in the background while the batch is held (it polls, and so
        # rejoins, only after the batch): the late commit comes from a member that is back.
        time.sleep(RECONNECT_S)
        fenced_s = _release_until_fenced(zombie, gate, topic, held)
    rejoin_s = _wait_rejoined(zombie, assigned_before, healed_at)
    stale = query(
        dsn,
        "SELECT count(*) FROM chaos_events WHERE source_partition = %s AND source_offset = %s"
        " AND writer LIKE %s",
        (held.partition, held.offset, f"{zombie.pid}-%"),
    )
    assert stale == [(0,)], "the zombie's stale batch landed"
    producer.join(timeout=300)
    return Episode(
        held.partition,
        held.offset,
        sorted(held.epochs),
        round(takeover_s, 2),
        late_commit_while_cut,
        round(fenced_s, 2),
        round(rejoin_s, 2),
        dropped,
    )


# --- the test ----------------------------------------------------------------------------------


def _verify_applied_once(lab: PartitionLab, run: Run) -> int:
    """Every record of the topic was applied exactly once: one random-id row per (partition,
    offset), whichever process applied it. Returns how many records that is."""
    rows = query(
        run.dsn,
        "SELECT source_partition, source_offset, count(*) FROM held_chaos_applies"
        " GROUP BY source_partition, source_offset",
    )
    applied = {(int(p), int(o)): int(n) for p, o, n in rows}
    ends = end_offsets(lab.bootstrap, run.topic, PARTITIONS)
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    twice = {where: n for where, n in applied.items() if n > 1}
    assert not twice, f"{len(twice)} records applied more than once, e.g. {list(twice)[:5]}"
    missing = sorted(expected - applied.keys())
    assert not missing, f"{len(missing)} records never applied, e.g. {missing[:5]}"
    assert applied.keys() == expected, "applies of records that are not in the topic"
    return len(expected)


def _start_members(
    lab: PartitionLab, tmp_path: Path, members: list[ConsumerProcess], run: Run
) -> tuple[ConsumerProcess, NamespacedConsumer]:
    """The host member, and the namespaced one (its metrics on its own address)."""

    def args(*extra: str) -> list[str]:
        return [
            "--backend",
            run.backend,
            *run_args(APP, lab.bootstrap, run.group, run.topic, run.dsn, *extra),
            "--batch-max-records",
            "200",
        ]

    host = ConsumerProcess(args(), tmp_path / "host.log")
    members.append(host)
    zombie = NamespacedConsumer(
        lab.link,
        args("--metrics-port", "0", "--metrics-host", lab.link.member_address),
        tmp_path / "namespaced.log",
        env={"HELD_CHAOS_GATE": str(run.gate)},
    )
    members.append(zombie)
    for member, name in ((host, "the host member"), (zombie, "the namespaced member")):
        member.wait_started()
        _require_alive(member, name)
    assert zombie.runs_in_namespace(), "the PID must be offsetkeeper's, inside the namespace"
    return host, zombie


def _final_wave(lab: PartitionLab, zombie: ConsumerProcess, run: Run) -> None:
    """Records after the last heal, until the checkpoints reach the end offsets: the healed
    member commits again under the epochs it took when it rejoined."""
    dsn, group, topic = run.dsn, run.group, run.topic
    rejoined = _assignment(zombie)
    PacedProducer(lab.bootstrap, topic, total=FINAL_RECORDS, rate=RATE * 4).start().join(300)
    ends = end_offsets(lab.bootstrap, topic, PARTITIONS)
    wait_until(
        lambda: {p: o for p, (o, _) in _checkpoints(dsn, group).items()} == ends,
        timeout=240,
        what="checkpoints to reach the end offsets",
    )
    stored = _checkpoints(dsn, group)
    assert any(stored[p][1] == e for p, e in rejoined.items()), (
        "the healed member committed nothing after it rejoined"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_partitioned_member_is_taken_over_fenced_and_rejoins(
    backend: str, lab: PartitionLab, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    started = time.monotonic()
    topic, group = unique_name("partition"), unique_name("partition-group")
    create_topic(lab.bootstrap, topic, PARTITIONS)
    run = Run(topic, group, create_database(lab.server_dsn), tmp_path / "gate", backend)
    host, zombie = _start_members(lab, tmp_path, consumers, run)
    episodes = [
        _episode(lab, host, zombie, run, late_commit_while_cut=cycle % 2 == 0)
        for cycle in range(CYCLES)
    ]
    _final_wave(lab, zombie, run)
    fenced_metric = _fenced_metric(lab, zombie)
    assert fenced_metric >= CYCLES, "each refused late commit counts in the fencing metric"
    assert host.terminate() == 0, "the host member stops cleanly"
    assert zombie.terminate() == 0, "the fenced, healed member stops cleanly too"
    stored = {p: o for p, (o, _) in _checkpoints(run.dsn, group).items()}
    assert stored == end_offsets(lab.bootstrap, topic, PARTITIONS), "checkpoints = end offsets"
    counts = verify_chaos_sink(lab.bootstrap, topic, PARTITIONS, lambda sql: query(run.dsn, sql))
    assert _verify_applied_once(lab, run) == counts["records"]
    figures = {
        "form": "long" if long_form() else "short",
        "backend": backend,
        "session_timeout_s": SESSION_TIMEOUT_S,
        "link": f"{lab.link.host_address} <-> {lab.link.member_address} ({lab.link.namespace})",
        "broker": lab.bootstrap,
        "database": mask_url(lab.server_dsn),
        "records": counts["records"],
        "writers": counts["writers"],
        "duration_s": round(time.monotonic() - started, 1),
        "takeover_s": [e.takeover_s for e in episodes],
        "rejoin_s": [e.rejoin_s for e in episodes],
        "fenced_partitions_metric": fenced_metric,
        "episodes": [asdict(e) for e in episodes],
    }
    (tmp_path / "network_partition.json").write_text(json.dumps(figures, indent=2))
    print(f"network partition ({figures['form']} form): {json.dumps(figures)}")
