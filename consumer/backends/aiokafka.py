"""The aiokafka (asyncio) driver: the same `Engine` rules, driven from an event loop.

One implementation of the rules, two drivers. The `Engine` (batching, ordering, checkpoints,
fencing, revocation) runs its steps in a worker thread (`asyncio.to_thread`), because sinks
are blocking; the event loop keeps aiokafka's fetches and heartbeats going meanwhile. The
engine reaches Kafka through `AiokafkaBridge`, whose blocking methods run their coroutine on
the loop. Async processors (`async def`) are awaited on the loop, so they may use the
service's other asyncio clients.

Revocation: aiokafka calls the rebalance listener from its coordinator task while our loop
may be in the middle of a batch. The listener takes the same lock the batch holds from
processing to COMMIT, so a revoked partition's in-flight batch is committed before the
partition is released, and records fetched before the revocation are dropped after it (the
engine only processes partitions it still owns). Fencing stays the backstop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import aiokafka
import aiokafka.errors
import structlog
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from consumer.core.errors import ConfigError, KafkaError, OffsetkeeperError
from consumer.core.records import RawRecord, TopicPartition
from consumer.engine.client import RebalanceListener
from consumer.engine.group import Engine

log = structlog.get_logger("offsetkeeper.kafka")

T = TypeVar("T")

_NO_POSITION_YET_PAUSE_S = 0.05
_BRIDGE_TIMEOUT_S = 60.0

# librdkafka-style names (as given with -X) that have an aiokafka equivalent.
_INT_SETTINGS = {
    "session.timeout.ms": "session_timeout_ms",
    "heartbeat.interval.ms": "heartbeat_interval_ms",
    "max.poll.interval.ms": "max_poll_interval_ms",
    "request.timeout.ms": "request_timeout_ms",
    "fetch.max.bytes": "fetch_max_bytes",
    "max.partition.fetch.bytes": "max_partition_fetch_bytes",
    "fetch.wait.max.ms": "fetch_max_wait_ms",
    "metadata.max.age.ms": "metadata_max_age_ms",
    "retry.backoff.ms": "retry_backoff_ms",
}
_TEXT_SETTINGS = {
    "client.id": "client_id",
    "isolation.level": "isolation_level",
    "group.instance.id": "group_instance_id",
}
_ASSIGNORS: dict[str, Any] = {
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
    # aiokafka rebalances eagerly only; its sticky assignor is the closest to cooperative-sticky.
    "cooperative-sticky": StickyPartitionAssignor,
    "sticky": StickyPartitionAssignor,
}


def aiokafka_settings(client_config: Mapping[str, str]) -> dict[str, Any]:
    """Translate -X settings to AIOKafkaConsumer arguments; refuse ones it has no match for."""
    # fetch_max_wait_ms: as the confluent backend's fetch.wait.max.ms (latency of a slow
    # stream; see consumer.backends.confluent).
    settings: dict[str, Any] = {
        "partition_assignment_strategy": (StickyPartitionAssignor,),
        "fetch_max_wait_ms": 100,
    }
    for key, value in client_config.items():
        if key in _INT_SETTINGS:
            try:
                settings[_INT_SETTINGS[key]] = int(value)
            except ValueError:
                raise ConfigError("setting needs a number", setting=key, value=value) from None
        elif key in _TEXT_SETTINGS:
            settings[_TEXT_SETTINGS[key]] = value
        elif key == "partition.assignment.strategy":
            names = [name.strip() for name in value.split(",")]
            unknown = [name for name in names if name not in _ASSIGNORS]
            if unknown:
                raise ConfigError(
                    "assignor not available with aiokafka",
                    assignor=unknown[0],
                    known=sorted(_ASSIGNORS),
                )
            settings["partition_assignment_strategy"] = tuple(_ASSIGNORS[name] for name in names)
        else:
            raise ConfigError(
                "Kafka setting not supported by the aiokafka backend",
                setting=key,
                supported=sorted(
                    [*_INT_SETTINGS, *_TEXT_SETTINGS, "partition.assignment.strategy"]
                ),
            )
    return settings


def translate(exc: BaseException, message: str, **context: Any) -> KafkaError:
    retriable = bool(getattr(exc, "retriable", False))
    return KafkaError(
        message, retriable=retriable, reason=f"{type(exc).__name__}: {exc}", **context
    )


def _kafka_tp(tp: TopicPartition) -> aiokafka.TopicPartition:
    return aiokafka.TopicPartition(tp.topic, tp.partition)


async def _watermarks(
    consumer: aiokafka.AIOKafkaConsumer, partition: TopicPartition, timeout_s: float
) -> tuple[int, int]:
    async def ends() -> tuple[int, int]:
        tp = _kafka_tp(partition)
        low = await consumer.beginning_offsets([tp])
        high = await consumer.end_offsets([tp])
        return int(low[tp]), int(high[tp])

    try:
        return await asyncio.wait_for(ends(), timeout_s)
    except (aiokafka.errors.KafkaError, TimeoutError) as exc:
        raise translate(
            exc, "cannot read watermarks", topic=partition.topic, partition=partition.partition
        ) from exc


def _run_on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on `loop` (another thread's) and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(_BRIDGE_TIMEOUT_S)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class AiokafkaBridge:
    """The `ClientBackend` the engine sees; every call is made from the engine's worker thread
    and carried out on the event loop."""

    def __init__(
        self, consumer: aiokafka.AIOKafkaConsumer, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._consumer = consumer
        self._loop = loop

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return _run_on(self._loop, coroutine)

    def resolve(self, awaitable: Awaitable[T]) -> T:
        """Await an async processor's result on the event loop (the engine's resolver)."""
        return _run_on(self._loop, _awaited(awaitable))

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        raise KafkaError("the aiokafka driver subscribes itself")

    def poll_batch(
        self, max_records: int, timeout_s: float, fill_s: float = 0.0
    ) -> list[RawRecord]:
        raise KafkaError("the aiokafka driver fetches itself")

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        async def pause() -> None:
            self._consumer.pause(*(_kafka_tp(tp) for tp in partitions))

        if partitions:
            self._run(pause())

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        async def resume() -> None:
            self._consumer.resume(*(_kafka_tp(tp) for tp in partitions))

        if partitions:
            self._run(resume())

    def commit_advisory(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        async def commit() -> None:
            try:
                await self._consumer.commit({_kafka_tp(tp): o for tp, o in next_offsets.items()})
            except aiokafka.errors.KafkaError as exc:
                # Advisory only: the sink holds the truth; lag tools lag a little longer.
                log.info("advisory_commit_failed", error=str(translate(exc, "commit failed")))

        if next_offsets:
            asyncio.run_coroutine_threadsafe(commit(), self._loop)  # not awaited: advisory

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        return self._run(_watermarks(self._consumer, partition, timeout_s))

    def group_metadata(self) -> object:
        raise ConfigError(
            "the transactional Kafka sink commits offsets with confluent-kafka's group "
            "metadata: use --backend confluent with a kafka:// sink"
        )

    def close(self) -> None:
        """The driver stops the consumer (leaving the group) on the loop."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, driver: AiokafkaDriver) -> None:
        self._driver = driver

    async def on_partitions_revoked(self, revoked: set[aiokafka.TopicPartition]) -> None:
        tps = sorted(TopicPartition(tp.topic, tp.partition) for tp in revoked)
        self._driver.moved.update(tps)
        # Waits for the in-flight batch to commit: never release a half-done partition.
        async with self._driver.batch_lock:
            if tps:
                await asyncio.to_thread(self._driver.engine.on_revoked, tps)

    async def on_partitions_assigned(self, assigned: set[aiokafka.TopicPartition]) -> None:
        tps = sorted(TopicPartition(tp.topic, tp.partition) for tp in assigned)
        self._driver.moved.update(tps)
        if not tps:
            return
        async with self._driver.batch_lock:
            try:
                starts = await asyncio.to_thread(self._driver.engine.on_assigned, tps)
            except OffsetkeeperError as exc:
                # aiokafka would only log it; the driver must stop with it.
                self._driver.fail(exc)
                return
            consumer = self._driver.consumer
            for tp in tps:
                start = starts[tp]
                if isinstance(start, int):
                    consumer.seek(_kafka_tp(tp), start)
                elif start == "earliest":
                    await consumer.seek_to_beginning(_kafka_tp(tp))
                else:  # "latest", or held (None): a known position, never an automatic reset
                    await consumer.seek_to_end(_kafka_tp(tp))
            # A partition we paused and lost comes back fresh: it must fetch again; one the
            # engine stopped at assignment (start None) is held.
            consumer.resume(*(_kafka_tp(tp) for tp in tps if starts[tp] is not None))
            consumer.pause(*(_kafka_tp(tp) for tp in tps if starts[tp] is None))


class AiokafkaDriver:
    """Runs an `Engine` over an aiokafka consumer until the engine is asked to stop."""

    def __init__(
        self,
        make_engine: Callable[[AiokafkaBridge], Engine],
        *,
        bootstrap_servers: str,
        group: str,
        topics: Sequence[str],
        client_config: Mapping[str, str],
        batch_max_records: int,
        poll_timeout_s: float,
        commit_interval_s: float = 0.0,
    ) -> None:
        self._make_engine = make_engine
        self._settings = aiokafka_settings(client_config)
        self._bootstrap_servers = bootstrap_servers
        self._group = group
        self._topics = list(topics)
        self._batch_max_records = batch_max_records
        self._poll_timeout_ms = int(poll_timeout_s * 1000)
        self._commit_interval_s = commit_interval_s
        self._failure: BaseException | None = None
        self.batch_lock = asyncio.Lock()
        # Partitions a rebalance moved while a batch was being gathered (see _gather).
        self.moved: set[TopicPartition] = set()
        self._engine: Engine | None = None
        self._consumer: aiokafka.AIOKafkaConsumer | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise KafkaError("the driver has not started")
        return self._engine

    @property
    def consumer(self) -> aiokafka.AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaError("the driver has not started")
        return self._consumer

    def fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.engine.request_stop()

    async def _reposition(self, exc: Any) -> None:
        """Partitions whose fetch position fell outside the log: the engine decides where
        they go on (seek) or stops them (pause); nothing jumps on its own."""
        tps = _out_of_range(exc)
        async with self.batch_lock:
            go_on = await asyncio.to_thread(self.engine.on_out_of_range, tps)
        for tp, offset in go_on.items():
            self.consumer.seek(_kafka_tp(tp), offset)
        held = [_kafka_tp(tp) for tp in tps if tp not in go_on]
        if held:
            self.consumer.pause(*held)

    async def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        self._consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap_servers,
            group_id=self._group,
            enable_auto_commit=False,  # the sink holds the offsets; Kafka gets an advisory copy
            # Never jump on our own: a position outside the log is the engine's decision.
            auto_offset_reset="none",
            **self._settings,
        )
        bridge = AiokafkaBridge(self._consumer, asyncio.get_running_loop())
        self._engine = self._make_engine(bridge)
        engine = self._engine
        await asyncio.to_thread(engine.start)
        try:
            await self._consumer.start()
        except aiokafka.errors.KafkaError as exc:
            await asyncio.to_thread(engine.finish)
            raise translate(exc, "cannot start the aiokafka consumer", group=self._group) from exc
        self._consumer.subscribe(self._topics, listener=_Listener(self))
        try:
            while not engine.stop_requested:
                records = await self._gather(engine.commit_in_flight)
                if records is None:
                    continue
                async with self.batch_lock:  # an empty poll settles the commit in flight
                    carry_on = await asyncio.to_thread(engine.step, records)
                if not carry_on:
                    break
            async with self.batch_lock:
                await asyncio.to_thread(engine.settle)
            if self._failure is not None:
                raise self._failure
        finally:
            # After a failure the batch in flight is waited for, not applied; stop() then
            # revokes through the listener (which takes the batch lock) and leaves the group.
            await asyncio.to_thread(engine.abandon)
            await self._consumer.stop()
            code = await asyncio.to_thread(engine.finish)
        return code

    async def _gather(self, commit_in_flight: bool) -> list[RawRecord] | None:
        """One batch: what aiokafka holds at once (waiting up to the poll timeout only when it
        holds nothing and no commit is in flight), filled for the commit interval at most.
        Records fetched before a rebalance that moved their partition are dropped (fetched
        again from where the listener put it). None: poll again (after a repositioning)."""
        consumer = self.consumer
        wait_ms = 0 if commit_in_flight else self._poll_timeout_ms
        records: list[RawRecord] = []
        deadline: float | None = None
        while len(records) < self._batch_max_records:
            self.moved.clear()
            try:
                fetched = await consumer.getmany(
                    timeout_ms=wait_ms, max_records=self._batch_max_records - len(records)
                )
            except aiokafka.errors.OffsetOutOfRangeError as exc:
                # Raised only once the other partitions' records were returned.
                await self._reposition(exc)
                return records or None
            except aiokafka.errors.NoOffsetForPartitionError:
                # A partition just assigned, before the listener's seek took effect: with no
                # automatic reset aiokafka says so instead of guessing. Poll again.
                await asyncio.sleep(_NO_POSITION_YET_PAUSE_S)
                return records or None
            except aiokafka.errors.KafkaError as exc:
                raise translate(exc, "poll failed", group=self._group) from exc
            if self.moved and records:
                records = [
                    r for r in records if TopicPartition(r.topic, r.partition) not in self.moved
                ]
            records.extend(_raw_record(m) for batch in fetched.values() for m in batch)
            loop_time = asyncio.get_running_loop().time()
            if deadline is None:
                deadline = loop_time + self._commit_interval_s
            remaining_ms = int((deadline - loop_time) * 1000)
            if not records or remaining_ms <= 0:
                break
            wait_ms = remaining_ms
        return records


def _out_of_range(exc: Any) -> list[TopicPartition]:
    """The partitions an aiokafka OffsetOutOfRangeError names ({tp: offset} in its args)."""
    named = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return sorted(TopicPartition(tp.topic, tp.partition) for tp in named)


def _raw_record(message: Any) -> RawRecord:
    # Positional: built once per record fetched.
    headers = message.headers
    return RawRecord(
        message.topic,
        message.partition,
        message.offset,
        message.timestamp,
        message.key,
        message.value,
        tuple((name, value) for name, value in headers) if headers else (),
    )


class AiokafkaReader:
    """`PartitionReader` over aiokafka (for `replay --backend aiokafka`): manual assignment,
    no group. Its coroutines run on a private event loop in a background thread, so replay's
    synchronous loop drives it like the confluent reader."""

    def __init__(self, *, bootstrap_servers: str, client_config: Mapping[str, str]) -> None:
        settings = aiokafka_settings(client_config)
        settings.pop("partition_assignment_strategy", None)
        self._out_of_range: set[TopicPartition] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="offsetkeeper-aiokafka-reader", daemon=True
        )
        self._thread.start()

        async def start() -> aiokafka.AIOKafkaConsumer:
            consumer = aiokafka.AIOKafkaConsumer(
                bootstrap_servers=bootstrap_servers,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="none",  # out of range is reported (out_of_range), not reset
                **settings,
            )
            await consumer.start()
            return consumer

        try:
            self._consumer = self._run(start())
        except aiokafka.errors.KafkaError as exc:
            self._stop_loop()
            raise translate(exc, "cannot start the aiokafka reader") from exc

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return _run_on(self._loop, coroutine)

    def resolve(self, awaitable: Awaitable[T]) -> T:
        """Await an async processor's result on the event loop (the engine's resolver)."""
        return _run_on(self._loop, _awaited(awaitable))

    def partitions(self, topic: str) -> list[int]:
        async def lookup() -> set[int] | None:
            # consumer.topics() returns only names; the metadata it fetched holds partitions.
            cluster = await self._consumer._client.fetch_all_metadata()
            found: set[int] | None = cluster.partitions_for_topic(topic)
            return found

        found = self._run(lookup())
        if not found:
            raise ConfigError("unknown topic", topic=topic)
        return sorted(found)

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        return self._run(_watermarks(self._consumer, partition, timeout_s))

    def offsets_for_time(
        self, partitions: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        async def lookup() -> dict[Any, Any]:
            found: dict[Any, Any] = await self._consumer.offsets_for_times(
                {_kafka_tp(tp): timestamp_ms for tp in partitions}
            )
            return found

        try:
            found = self._run(lookup())
        except aiokafka.errors.KafkaError as exc:
            raise translate(
                exc, "cannot look up offsets by time", timestamp_ms=timestamp_ms
            ) from exc
        answer: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            hit = found.get(_kafka_tp(tp))
            answer[tp] = None if hit is None else int(hit.offset)
        return answer

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        async def assign() -> None:
            self._consumer.assign([_kafka_tp(tp) for tp in positions])
            for tp, offset in positions.items():
                self._consumer.seek(_kafka_tp(tp), offset)

        self._run(assign())

    def poll_batch(self, max_records: int, timeout_s: float) -> list[RawRecord]:
        async def fetch() -> list[RawRecord]:
            batches = await self._consumer.getmany(
                timeout_ms=int(timeout_s * 1000), max_records=max_records
            )
            return [_raw_record(message) for batch in batches.values() for message in batch]

        try:
            return self._run(fetch())
        except aiokafka.errors.OffsetOutOfRangeError as exc:
            # Raised only once the other partitions' records were returned.
            self._out_of_range.update(_out_of_range(exc))
            return []
        except aiokafka.errors.KafkaError as exc:
            raise translate(exc, "poll failed") from exc

    def out_of_range(self) -> list[TopicPartition]:
        found, self._out_of_range = sorted(self._out_of_range), set()
        return found

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        async def pause() -> None:
            self._consumer.pause(*(_kafka_tp(tp) for tp in partitions))

        if partitions:
            self._run(pause())

    def position(self, partition: TopicPartition) -> int | None:
        async def position() -> int:
            return int(await self._consumer.position(_kafka_tp(partition)))

        try:
            return self._run(position())
        except aiokafka.errors.KafkaError:
            return None

    def group_members(self, group: str) -> list[str]:
        raise KafkaError("the aiokafka reader does not describe groups", group=group)

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        raise KafkaError("the aiokafka reader does not read group offsets", group=group)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        try:
            self._run(self._consumer.stop())
        finally:
            self._stop_loop()
