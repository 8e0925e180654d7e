"""Processor state: JSON bytes in the checkpoint, upgraded by the app's own version chain."""

from __future__ import annotations

import json
from typing import Any

from consumer.checkpoints.versioning import upgrade_chain
from consumer.core.app import StateSchema
from consumer.core.errors import CheckpointError, ConfigError


def encode_state(state: Any) -> bytes:
    try:
        return json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError("processor state must be JSON-serializable", reason=str(exc)) from exc


def copy_state(state: Any) -> Any:
    """A deep copy the processor may change freely: a batch that rolls back leaves no trace."""
    return json.loads(encode_state(state))


def load_state(
    schema: StateSchema, stored: bytes | None, stored_version: int | None, **context: Any
) -> Any:
    """The partition's state at the stored checkpoint, upgraded to the app's version; the
    schema's initial state when none was stored."""
    if stored is None:
        return schema.initial()
    try:
        value = json.loads(stored)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError("stored processor state is not JSON", **context) from exc
    return upgrade_chain(
        value,
        from_version=stored_version or 1,
        to_version=schema.version,
        steps=schema.upgraders,
        what="processor state",
        **context,
    )
