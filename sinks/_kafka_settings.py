"""The Kafka sink's settings: its URL (`kafka://HOST:PORT[,HOST:PORT]/TOPIC?options`) parsed
and checked, and the fixed timeouts of its calls to the cluster."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, urlsplit

from consumer import ConfigError, mask_url

# How long one call to the cluster (a transactional step, an admin request) may take.
OPERATION_TIMEOUT_S = 30.0

DEFAULT_TRANSACTION_TIMEOUT_MS = 10_000
_MIN_TRANSACTION_TIMEOUT_MS = 1000
JOBS_TOPIC_SUFFIX = ".offsetkeeper-jobs"
DEFAULT_STATE_TOPIC_PREFIX = "offsetkeeper-state"
# What a topic name may hold (Kafka's own rule), and its longest length.
TOPIC_NAME_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
)
MAX_TOPIC_NAME_LENGTH = 249
_MAX_STATE_TOPIC_PREFIX_LENGTH = 100

# Settings the sink owns: a user value would break the transaction or its fencing.
_RESERVED_CLIENT_KEYS = frozenset(
    {
        "bootstrap.servers",
        "transactional.id",
        "transaction.timeout.ms",
        "enable.idempotence",
        "acks",
        "request.required.acks",  # librdkafka's other name for acks
        "group.id",
        "isolation.level",
    }
)
_URL_OPTIONS = frozenset(
    {
        "transactional_id",
        "transaction_timeout_ms",
        "jobs_topic",
        "state_topic_prefix",
        "state_replication_factor",
        "state_min_insync_replicas",
    }
)


@dataclass(frozen=True, slots=True)
class KafkaSinkSettings:
    """What a `kafka://` URL says. `client_config` holds librdkafka keys (they contain a dot).

    The `state_*` settings are those of the keyed state's changelog topics (`_kafka_state`):
    their name prefix, and the replication factor and min.insync.replicas they are created
    with (None: the broker's defaults)."""

    bootstrap_servers: str
    topic: str
    transactional_id: str | None = None
    transaction_timeout_ms: int = DEFAULT_TRANSACTION_TIMEOUT_MS
    jobs_topic: str | None = None
    client_config: Mapping[str, str] = field(default_factory=dict)
    state_topic_prefix: str = DEFAULT_STATE_TOPIC_PREFIX
    state_replication_factor: int | None = None
    state_min_insync_replicas: int | None = None

    @property
    def description(self) -> str:
        return f"kafka://{self.bootstrap_servers}/{self.topic}"

    @property
    def jobs_topic_name(self) -> str:
        """Where replay job plans are kept: `jobs_topic`, or TOPIC + `.offsetkeeper-jobs`."""
        return self.jobs_topic or f"{self.topic}{JOBS_TOPIC_SUFFIX}"


def parse_kafka_url(url: str) -> KafkaSinkSettings:
    """`kafka://h:p[,h:p]/TOPIC?transactional_id=..&transaction_timeout_ms=..&jobs_topic=..&
    state_topic_prefix=..&state_replication_factor=..&state_min_insync_replicas=..&
    <librdkafka key>=..`. Unknown options, and librdkafka keys the sink sets itself, are a
    ConfigError."""
    parts = urlsplit(url)
    shown = mask_url(url.split("?", 1)[0])
    if parts.scheme != "kafka":
        raise ConfigError("not a kafka:// sink URL", sink=shown)
    bootstrap = parts.netloc
    topic = parts.path.removeprefix("/")
    if not bootstrap or "@" in bootstrap:
        raise ConfigError("kafka sink URL needs HOST:PORT[,HOST:PORT] (no user part)", sink=shown)
    if not topic or "/" in topic:
        raise ConfigError(
            "kafka sink URL needs one output topic: kafka://HOST:PORT/TOPIC", sink=shown
        )
    own, client_config = _split_options(parts)
    timeout_ms = _transaction_timeout_ms(own)
    transactional_id = own.get("transactional_id")
    if transactional_id == "":
        raise ConfigError("transactional_id must not be empty")
    jobs_topic = own.get("jobs_topic")
    if jobs_topic == "":
        raise ConfigError("jobs_topic must not be empty")
    return KafkaSinkSettings(
        bootstrap_servers=bootstrap,
        topic=topic,
        transactional_id=transactional_id,
        transaction_timeout_ms=timeout_ms,
        jobs_topic=jobs_topic,
        client_config=client_config,
        state_topic_prefix=_state_topic_prefix(own),
        state_replication_factor=_positive(own, "state_replication_factor"),
        state_min_insync_replicas=_positive(own, "state_min_insync_replicas"),
    )


def _split_options(parts: SplitResult) -> tuple[dict[str, str], dict[str, str]]:
    """(the sink's own options, librdkafka settings) of the URL's query, each checked."""
    options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    client_config = {k: v for k, v in options.items() if "." in k}
    own = {k: v for k, v in options.items() if "." not in k}
    unknown = sorted(set(own) - _URL_OPTIONS)
    if unknown:
        raise ConfigError(
            "unknown kafka sink options",
            options=unknown,
            known=sorted(_URL_OPTIONS),
            hint="librdkafka settings are passed by their dotted name, e.g. linger.ms=20",
        )
    reserved = sorted(set(client_config) & _RESERVED_CLIENT_KEYS)
    if reserved:
        raise ConfigError(
            "the kafka sink sets these client settings itself",
            options=reserved,
            hint="use transactional_id= and transaction_timeout_ms= for the transaction",
        )
    return own, client_config


def _transaction_timeout_ms(own: Mapping[str, str]) -> int:
    timeout_text = own.get("transaction_timeout_ms", str(DEFAULT_TRANSACTION_TIMEOUT_MS))
    try:
        timeout_ms = int(timeout_text)
    except ValueError:
        raise ConfigError(
            "transaction_timeout_ms must be a whole number of milliseconds", value=timeout_text
        ) from None
    if timeout_ms < _MIN_TRANSACTION_TIMEOUT_MS:
        raise ConfigError(
            "transaction_timeout_ms is too small",
            value=timeout_ms,
            minimum=_MIN_TRANSACTION_TIMEOUT_MS,
        )
    return timeout_ms


def _state_topic_prefix(own: Mapping[str, str]) -> str:
    prefix = own.get("state_topic_prefix", DEFAULT_STATE_TOPIC_PREFIX)
    if (
        not prefix
        or len(prefix) > _MAX_STATE_TOPIC_PREFIX_LENGTH
        or not set(prefix) <= TOPIC_NAME_CHARACTERS
        or prefix in (".", "..")
    ):
        raise ConfigError(
            "state_topic_prefix must be 1 to 100 characters of a Kafka topic name "
            "(letters, digits, '.', '_' and '-')",
            value=prefix,
        )
    return prefix


def _positive(own: Mapping[str, str], option: str) -> int | None:
    text = own.get(option)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{option} must be a whole number", value=text) from None
    if value < 1:
        raise ConfigError(f"{option} must be at least 1", value=value)
    return value
