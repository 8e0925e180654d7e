"""Which decoder reads which topic: the app's declaration, overridden by settings.

Decoders are built once per (decoder, reader schema) and shared by the topics that use them, so
an Avro decoder's schema cache serves every topic it reads. Every topic a command will read is
resolved at start-up (`check`), so a topic without a decoder or a bad schema file is a
`ConfigError` before anything is consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from consumer.core.app import App
from consumer.core.errors import ConfigError
from consumer.decoding.avro_limits import DEFAULT_MAX_NESTING_DEPTH
from consumer.decoding.decoders import DecodeOptions, Decoder, decoder_for


@dataclass(frozen=True, slots=True)
class DecodeSettings:
    """The decoding settings of a command (`--decode`, `--reader-schema`, registry, dir)."""

    schema_registry_url: str | None = None
    schema_dir: str | None = None
    # Per topic, overriding the app: decoder names and reader schema files.
    decode: Mapping[str, str] = field(default_factory=dict)
    reader_schema: Mapping[str, str] = field(default_factory=dict)
    # Avro values nesting deeper are bad records (see DecodeOptions.max_nesting_depth).
    max_nesting_depth: int = DEFAULT_MAX_NESTING_DEPTH


class TopicDecoders:
    """The decoder of each topic (see the module docstring)."""

    def __init__(self, app: App, settings: DecodeSettings | None = None) -> None:
        self._app = app
        self._settings = settings or DecodeSettings()
        self._by_topic: dict[str, Decoder] = {}
        self._by_choice: dict[tuple[str, str | None], Decoder] = {}

    def check(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.for_topic(topic)

    def for_topic(self, topic: str) -> Decoder:
        decoder = self._by_topic.get(topic)
        if decoder is None:
            decoder = self._build(topic)
            self._by_topic[topic] = decoder
        return decoder

    def name_for(self, topic: str) -> str:
        name = self._settings.decode.get(topic) or self._app.decode_for(topic)
        if name is None:
            raise ConfigError(
                "the app declares no decoder for this topic (give --decode TOPIC=NAME)",
                app=self._app.name,
                topic=topic,
            )
        return name

    def _build(self, topic: str) -> Decoder:
        name = self.name_for(topic)
        reader = self._settings.reader_schema.get(topic) or self._app.reader_schema_for(topic)
        if reader is not None and not name.startswith("avro"):
            raise ConfigError(
                "a reader schema applies to Avro decoding only", topic=topic, decode=name
            )
        choice = (name, reader)
        decoder = self._by_choice.get(choice)
        if decoder is None:
            decoder = decoder_for(
                name,
                DecodeOptions(
                    schema_registry_url=self._settings.schema_registry_url,
                    schema_dir=(
                        Path(self._settings.schema_dir) if self._settings.schema_dir else None
                    ),
                    reader_schema=Path(reader) if reader else None,
                    max_nesting_depth=self._settings.max_nesting_depth,
                ),
            )
            self._by_choice[choice] = decoder
        return decoder
