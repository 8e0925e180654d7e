"""One upgrade-chain mechanism for everything versioned: checkpoint formats and user state.

A chain is a mapping {n: upgrade from version n to n+1}. Upgrading runs the steps in order;
a version newer than the code knows is refused (never silently downgraded), and so is a gap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from consumer.core.errors import CheckpointFormatError

T = TypeVar("T")


def upgrade_chain(
    value: T,
    *,
    from_version: int,
    to_version: int,
    steps: Mapping[int, Callable[[T], T]],
    what: str,
    **context: Any,
) -> T:
    """Run `steps[from_version]`, `steps[from_version + 1]`, ... up to `to_version`."""
    if from_version > to_version:
        raise CheckpointFormatError(
            f"{what} v{from_version} is newer than this code knows (it reads up to "
            f"v{to_version}); upgrade the code, nothing was changed",
            stored_version=from_version,
            supported_version=to_version,
            **context,
        )
    version = from_version
    while version < to_version:
        step = steps.get(version)
        if step is None:
            raise CheckpointFormatError(
                f"no upgrader from {what} v{version} to v{version + 1}",
                stored_version=version,
                supported_version=to_version,
                **context,
            )
        value = step(value)
        version += 1
    return value
