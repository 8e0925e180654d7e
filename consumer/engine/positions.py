"""Where the batch loop stands in each partition it works on."""

from __future__ import annotations

from dataclasses import dataclass

from consumer.core.errors import RecordError
from consumer.engine.state import PartitionState


@dataclass(slots=True)
class Position:
    """A partition the loop works on: its fencing epoch, the next offset to process (None
    until the client reports one), where to stop (exclusive; None: never), and its state."""

    epoch: int
    next_offset: int | None
    end: int | None = None
    state: PartitionState | None = None  # stateful apps: the state as of next_offset
    stopped: RecordError | None = None
    # Pipelined: the next offset past the batch being committed (None: none in flight), and
    # whether that batch ends at a record that stops the partition (nothing more is taken).
    ahead: int | None = None
    halting: bool = False


__all__ = ["Position"]
