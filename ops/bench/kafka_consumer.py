"""Shared by the two plain confluent-kafka contenders (limit, hand-written): the same client
settings as offsetkeeper's backend (consumer/_confluent.py) and one bounded poll loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import confluent_kafka

IDLE_GIVE_UP_S = 120.0


def consumer(bootstrap: str, group: str, extra: dict[str, str] | None = None) -> Any:
    return confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.offset.reset": "earliest",
            "queued.max.messages.kbytes": 32768,
            "fetch.wait.max.ms": 100,
            **(extra or {}),
        }
    )


def batches(
    client: Any,
    topic: str,
    records: int,
    *,
    batch: int = 2000,
    timeout_s: float = 0.5,
    on_fetch: Callable[[int], None] | None = None,
) -> Iterator[list[Any]]:
    """Batches of good messages until `records` messages were returned; gives up when nothing
    arrives for IDLE_GIVE_UP_S."""
    client.subscribe([topic])
    seen = 0
    last_data = time.monotonic()
    while seen < records:
        messages = client.consume(num_messages=batch, timeout=timeout_s)
        if not messages:
            if time.monotonic() - last_data > IDLE_GIVE_UP_S:
                raise TimeoutError(f"no records for {IDLE_GIVE_UP_S}s; saw {seen} of {records}")
            continue
        last_data = time.monotonic()
        if on_fetch is not None:
            on_fetch(len(messages))
        good = [m for m in messages if m.error() is None]
        seen += len(good)
        if good:
            yield good
