"""Chaos beyond one process: a three-broker cluster, a network partition, a full disk and a
soak. Every test here has a short form (what `ops/test`, and so CI, runs) and a long form that
`ops/chaos` runs (OFFSETKEEPER_CHAOS=long)."""

from __future__ import annotations

import os

# Every consumer process a chaos test starts goes in the `consumers` list, so none outlives it.
from tests.integration.conftest import consumers

__all__ = ["consumers", "long_form", "scaled"]

LONG_FORM_VARIABLE = "OFFSETKEEPER_CHAOS"


def long_form() -> bool:
    """True when the long form was asked for (`ops/chaos`)."""
    return os.environ.get(LONG_FORM_VARIABLE, "").strip().lower() == "long"


def scaled(short: float, long: float) -> float:
    """A duration, count or rate: `short` in the CI form, `long` under `ops/chaos`."""
    return long if long_form() else short
