"""The `DeadLetterWriter` contract: where the engine puts records given up on. The Kafka
implementation is `consumer.deadletters.writer.KafkaDeadLetterWriter`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from consumer.engine.batch import DeadLetter


class DeadLetterWriter(Protocol):
    """Where the engine puts dead letters. `write` returns once every letter is durable: the
    engine commits no offset past a letter before that (commit step 0)."""

    def topic_for(self, source_topic: str) -> str: ...

    def prepare(self, source_topics: Sequence[str]) -> None:
        """Make sure the dead-letter topics of these source topics exist (at start-up)."""
        ...

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Send and wait for the broker's acknowledgement of each; KafkaError otherwise."""
        ...

    def close(self) -> None: ...
