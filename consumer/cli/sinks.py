"""Finding a sink by its URL scheme: the `offsetkeeper.sinks` entry-point group.

Every sink, ours included, is a plugin: a distribution declares

    [project.entry-points."offsetkeeper.sinks"]
    myscheme = "my_package.my_module:open_my_sink"

where `open_my_sink(url: str) -> consumer.Sink` returns a sink that is not opened yet. The
engine never imports a sink package; a third party adds a scheme without touching ours.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import cast
from urllib.parse import urlsplit

from consumer.core.errors import ConfigError
from consumer.core.urls import mask_url
from consumer.engine.sink import CheckpointAdmin, JobStore, Sink

SINK_ENTRY_POINT_GROUP = "offsetkeeper.sinks"

SinkFactory = Callable[[str], Sink]


def sink_schemes() -> dict[str, EntryPoint]:
    """Every installed sink URL scheme and the entry point that opens it."""
    return {ep.name: ep for ep in entry_points(group=SINK_ENTRY_POINT_GROUP)}


def open_sink(url: str) -> Sink:
    """A sink for `url` (not yet opened), from the plugin registered for its scheme."""
    scheme = urlsplit(url).scheme
    schemes = sink_schemes()
    entry = schemes.get(scheme)
    if entry is None:
        raise ConfigError(
            "unknown sink URL scheme", sink=mask_url(url), known=sorted(schemes) or None
        )
    try:
        factory = cast(SinkFactory, entry.load())
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            "the sink plugin for this scheme cannot be loaded",
            scheme=scheme,
            entry_point=entry.value,
            error=str(exc),
        ) from exc
    return factory(url)


def checkpoint_admin(sink: Sink) -> CheckpointAdmin:
    """The sink's checkpoint-tool capability, or a ConfigError saying it has none."""
    if not isinstance(sink, CheckpointAdmin):
        raise ConfigError(
            "this sink does not support the checkpoint tools", sink=mask_url(sink.description)
        )
    return sink


def job_store(sink: Sink) -> JobStore:
    """The sink's replay-job store, or a ConfigError saying it cannot keep replay jobs."""
    if not isinstance(sink, JobStore):
        raise ConfigError("this sink cannot keep replay jobs", sink=mask_url(sink.description))
    return sink
