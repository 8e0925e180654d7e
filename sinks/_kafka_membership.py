"""The consumer's group membership, as the Kafka sink reads it from the group metadata it
sends with each transaction's offsets; and the metadata of groups this process never joins."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import confluent_kafka
import structlog

from consumer import ConfigError, FencedError
from sinks._kafka_errors import error_context

log = structlog.get_logger("offsetkeeper.sink.kafka")


@dataclass(frozen=True, slots=True)
class GroupMembership:
    """What librdkafka's serialized `ConsumerGroupMetadata` says about the member."""

    group: str
    generation: int
    member_id: str

    @property
    def is_member(self) -> bool:
        return self.generation >= 0 and bool(self.member_id)


_GROUP_METADATA_MAGIC = b"CGMDv2:"


def parse_group_metadata(metadata: object) -> GroupMembership | None:
    """Member id and generation from librdkafka's serialization (`CGMDv2:`, int32 generation in
    host byte order, then NUL-terminated group id and member id). None for anything else."""
    try:
        raw = bytes(metadata)  # type: ignore[call-overload]
    except TypeError:
        return None
    if not raw.startswith(_GROUP_METADATA_MAGIC) or len(raw) < len(_GROUP_METADATA_MAGIC) + 4:
        return None
    start = len(_GROUP_METADATA_MAGIC)
    (generation,) = struct.unpack("=i", raw[start : start + 4])
    group, _, rest = raw[start + 4 :].partition(b"\x00")
    member_id, terminated, _ = rest.partition(b"\x00")
    if not terminated:
        return None
    return GroupMembership(
        group=group.decode(errors="replace"),
        generation=int(generation),
        member_id=member_id.decode(errors="replace"),
    )


class MemberlessGroups:
    """The group metadata of groups this process never joins (replay jobs, migrations): the
    coordinator takes a transaction's offsets for such a group with no generation check. One
    client per group, never subscribed."""

    def __init__(self, client_config: Mapping[str, Any], *, sink: str) -> None:
        self._config = dict(client_config)
        self._sink = sink
        self._clients: dict[str, Any] = {}

    def metadata(self, group: str) -> object:
        client = self._clients.get(group)
        if client is None:
            try:
                client = confluent_kafka.Consumer(
                    {**self._config, "group.id": group, "enable.auto.commit": False}
                )
            except confluent_kafka.KafkaException as exc:
                raise ConfigError(
                    "invalid kafka sink client settings", sink=self._sink, **error_context(exc)
                ) from exc
            self._clients[group] = client
        return client.consumer_group_metadata()

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(confluent_kafka.KafkaException, RuntimeError):
                client.close()
        self._clients.clear()


def is_member(metadata: object) -> bool:
    """Whether the group metadata says we are a member of the group (readable, with a member
    id and a generation)."""
    membership = parse_group_metadata(metadata)
    return membership is not None and membership.is_member


def require_member(
    sent_as: GroupMembership | None, group: str, partitions: Sequence[tuple[str, int]]
) -> None:
    """FencedError naming `partitions` unless `sent_as` is a member of the group: a member-less
    commit would be accepted even for a live group, so a consumer that was evicted (librdkafka
    reset its membership) must not commit anything."""
    if sent_as is not None and sent_as.is_member:
        return
    log.warning(
        "kafka_commit_fenced",
        reason="not a member of the group",
        generation=None if sent_as is None else sent_as.generation,
        partitions=list(partitions),
    )
    raise FencedError(
        "this consumer is not a member of the group; its partitions are gone",
        partitions=list(partitions),
        group=group,
    )
