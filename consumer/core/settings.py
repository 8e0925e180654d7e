"""Typed settings. Precedence, highest first: CLI flags, `OFFSETKEEPER_*` env vars, the config
file (TOML, `--config` or `OFFSETKEEPER_CONFIG`), then the defaults below."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumer.core.errors import ConfigError

CONFIG_FILE_ENV = "OFFSETKEEPER_CONFIG"


class CommonSettings(BaseSettings):
    """Settings every command shares: where the broker and the sink are."""

    model_config = SettingsConfigDict(env_prefix="OFFSETKEEPER_", extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    sink: SecretStr = SecretStr("sqlite:///offsetkeeper.db")
    # Raw librdkafka settings, passed through (e.g. {"session.timeout.ms": "10000"}).
    kafka_config: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"


class DecodingSettings(CommonSettings):
    """How record values are decoded (the app's declaration, overridden per topic here)."""

    # Per topic, overriding the app: decoder names (json, utf8, bytes, avro, avro-local) and
    # Avro reader schema files (.avsc).
    decode: dict[str, str] = Field(default_factory=dict)
    reader_schema: dict[str, str] = Field(default_factory=dict)
    # Decoder "avro": a Confluent-compatible schema registry (may carry user:password@).
    schema_registry_url: SecretStr | None = None
    # Decoder "avro-local": the directory of writer schema files (*.avsc).
    schema_dir: str = "schemas"


class ConsumingSettings(DecodingSettings):
    """Settings of the commands that process records (`run`, `replay`): decoding, bad records."""

    # Bad records (README "Bad records and dead letters"): retried, then they stop their
    # partition or go to the dead-letter topic ({group} and {topic} are filled in; in a replay,
    # {group} is "replay-<job id>").
    on_bad_record: Literal["stop", "dead-letter"] = "stop"
    dead_letter_topic: str = "{group}.dlq"
    bad_record_retries: int = Field(default=2, ge=0, le=100)
    bad_record_backoff_s: float = Field(default=0.2, ge=0)
    bad_record_max_backoff_s: float = Field(default=5.0, ge=0)
    # How long sink failures are retried (capped exponential backoff) before giving up.
    sink_retry_deadline_s: float = Field(default=120.0, ge=0)
    # Stateful apps: memory for cached state entries (README "Keyed state"); the rest is read
    # from the sink when needed.
    state_cache_mb: int = Field(default=256, ge=1, le=1_048_576)
    # Records deleted from the log before they were read (README "Guarantees"): stop the
    # partition, or skip them with a records_lost event and metric.
    on_data_loss: Literal["stop", "skip"] = "stop"


class RunSettings(ConsumingSettings):
    """`offsetkeeper run`."""

    app: str
    group: str
    topics: Annotated[list[str], NoDecode]
    reset_policy: Literal["earliest", "latest", "error"] = "earliest"
    batch_max_records: int = Field(default=2000, ge=1, le=1_000_000)
    poll_timeout_s: float = Field(default=0.5, gt=0)
    # How long a batch waits to fill up to batch_max_records once it has a record (0: take
    # what is there; README "Commit cadence").
    commit_interval_s: float = Field(default=0.0, ge=0, le=3600)
    stop_when_idle_s: float | None = Field(default=None, gt=0)
    broker_retry_deadline_s: float = Field(default=300.0, ge=0)
    # The Kafka client: librdkafka (confluent, fastest) or aiokafka (asyncio, async processors).
    backend: Literal["confluent", "aiokafka"] = "confluent"
    # Operations (README "Deploying"): the HTTP port for /metrics, /healthz and /readyz (None:
    # no server; 0: any free port, logged), graceful shutdown, lag sampling, health thresholds.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Loopback unless told otherwise: the image, Compose and Kubernetes set 0.0.0.0, since
    # probes and scrapers reach a container from outside.
    metrics_host: str = "127.0.0.1"
    shutdown_deadline_s: float = Field(default=30.0, gt=0)
    lag_interval_s: float = Field(default=10.0, gt=0)
    readiness_timeout_s: float = Field(default=30.0, gt=0)
    liveness_timeout_s: float = Field(default=120.0, gt=0)
    # Members of the group this command runs (README "Deploying"): above 1, as child processes
    # of a supervisor that restarts them, forwards signals and serves one endpoint for all.
    workers: int = Field(default=1, ge=1, le=256)

    @field_validator("topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        # Env and file may give "a,b"; CLI gives a list.
        if isinstance(value, str):
            return [topic.strip() for topic in value.split(",") if topic.strip()]
        return value

    @field_validator("topics")
    @classmethod
    def _at_least_one_topic(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one topic is required")
        return value


class CheckpointSettings(CommonSettings):
    """`offsetkeeper checkpoint ...`."""

    group: str


class DeadLetterSettings(DecodingSettings):
    """`offsetkeeper dlq show|replay`."""

    dead_letter_topic: str
    # `dlq replay --to pipeline`: the app whose processor re-handles the records.
    app: str | None = None


class ReplaySettings(ConsumingSettings):
    """`offsetkeeper replay` (the range itself is given by flags, per invocation)."""

    app: str
    topic: str
    partitions: list[int] | None = None
    job_id: str | None = None
    backend: Literal["confluent", "aiokafka"] = "confluent"
    batch_max_records: int = Field(default=2000, ge=1, le=1_000_000)
    poll_timeout_s: float = Field(default=0.5, gt=0)


S = TypeVar("S", bound=CommonSettings)


def load_settings(
    settings_class: type[S], cli_values: dict[str, Any], config_file: Path | None = None
) -> S:
    """Build settings from CLI values (None means "not given"), env vars and the config file."""
    given = {key: value for key, value in cli_values.items() if value is not None}
    file_path = config_file or (
        Path(os.environ[CONFIG_FILE_ENV]) if os.environ.get(CONFIG_FILE_ENV) else None
    )
    file_values = _read_config_file(file_path, settings_class) if file_path else {}

    class _Layered(settings_class):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        settings: S = _Layered(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    return settings


_ALL_FIELDS = (
    set(RunSettings.model_fields)
    | set(CheckpointSettings.model_fields)
    | set(ReplaySettings.model_fields)
    | set(DeadLetterSettings.model_fields)
)


def _read_config_file(path: Path, settings_class: type[BaseSettings]) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("cannot read config file", path=str(path), reason=str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            "config file is not valid TOML", path=str(path), reason=str(exc)
        ) from None
    unknown = sorted(set(values) - _ALL_FIELDS)
    if unknown:
        raise ConfigError("unknown keys in config file", path=str(path), keys=unknown)
    return {key: value for key, value in values.items() if key in settings_class.model_fields}
