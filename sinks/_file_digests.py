"""The file sink's checksums: the SHA-256 and size of every committed data file, recorded by
the checkpoint document that commits the file, so that a reader and `checkpoint verify` can
tell a truncated or altered file from a good one.

The digest is taken from the bytes as `write_rows` writes them (nothing is read back), and
committed by the same rename as the file's checkpoint. Per partition, the document holds a
`DigestChain`: the newest digests inline (fewer than `INLINE_DIGESTS`) and a reference to the
newest *sealed segment*, an immutable file holding older digests and naming its predecessor:

    DIR/_offsetkeeper/digests/<group>/<topic>+<partition>+<20 hex of its SHA-256>.jsonl

    {"kind": "offsetkeeper-file-digests", "file_version": 1, "group": ..., "topic": ...,
     "partition": ..., "previous": <older segment or null>, "previous_sha256": ..., "lines": n}
    {"table": "orders", "file": "<data file name>", "sha256": "<64 hex>", "bytes": 1234}

So a commit rewrites at most `INLINE_DIGESTS` digests per partition, and once in that many
files writes one segment (durably, before the document that names it): the cost of a commit
does not grow with the files a partition holds. Every reference carries the referenced
segment's SHA-256, so the chain itself cannot be truncated or altered unnoticed. A segment is
named by its content, so writing it again (a retried batch) writes the same bytes.

Moving a checkpoint back drops the digests of the files it uncommits, in the same document:
inline ones at once; if sealed ones are affected, the kept digests are rewritten as one new
segment (rare: an operator's reset). Segments no document reaches (of a batch that never
committed, or dropped by a move back) are deleted by the next owner's `acquire`.

Documents written before checksums existed have no chains: their files have no digest, and
are read as before ("no checksum recorded").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from consumer import SinkError, TopicPartition
from sinks._file_io import fsync_directory, make_directory, write_durably
from sinks._file_layout import TEMP_NAME, FileLayout, parse_data_file

log = structlog.get_logger("offsetkeeper.sink.file")

SEGMENT_KIND = "offsetkeeper-file-digests"
SEGMENT_FILE_VERSION = 1
# Digests a partition keeps inline in the checkpoint document before they are sealed into a
# segment: bounds the document (about 200 bytes a digest) and the segment writes (one per 16).
INLINE_DIGESTS = 16

_SEGMENT_NAME = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+[0-9a-f]{20}\.jsonl$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class FileDigest:
    """The checksum of one committed data file: its table, name, SHA-256 and size."""

    table: str
    file: str
    sha256: str
    size: int

    @property
    def last_offset(self) -> int:
        parsed = parse_data_file(Path(self.file))
        return -1 if parsed is None else parsed.last_offset  # names are checked when read


@dataclass(frozen=True, slots=True)
class SealedSegment:
    """A reference to a partition's newest segment: its name and SHA-256, how many segments
    the chain holds (so `acquire` sees cheaply whether any file is unreachable), and the last
    offset of its newest data file (so a move back knows whether sealed digests are affected)."""

    name: str
    sha256: str
    count: int
    through: int


@dataclass(frozen=True, slots=True)
class DigestChain:
    """A partition's digests as the checkpoint document records them."""

    topic_partition: TopicPartition
    recent: tuple[FileDigest, ...] = ()
    sealed: SealedSegment | None = None


class StoredChains(Protocol):
    """The chains of a stored checkpoint document (`_file_documents.GroupDocument`)."""

    @property
    def digests(self) -> Mapping[TopicPartition, DigestChain]: ...


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the document's part -----------------------------------------------------------------------


def chain_to_json(chain: DigestChain) -> dict[str, Any]:
    record: dict[str, Any] = {
        "topic": chain.topic_partition.topic,
        "partition": chain.topic_partition.partition,
        "recent": [_digest_to_json(d) for d in chain.recent],
    }
    if chain.sealed is not None:
        sealed = chain.sealed
        record["sealed"] = {
            "segment": sealed.name,
            "sha256": sealed.sha256,
            "count": sealed.count,
            "through": sealed.through,
        }
    return record


def _digest_to_json(digest: FileDigest) -> dict[str, Any]:
    return {
        "table": digest.table,
        "file": digest.file,
        "sha256": digest.sha256,
        "bytes": digest.size,
    }


def chain_from_json(record: Any, *, path: Path) -> DigestChain:
    """A chain from the checkpoint document at `path`; anything malformed is a `SinkError`."""
    if not (
        isinstance(record, dict)
        and isinstance(record.get("topic"), str)
        and type(record.get("partition")) is int
        and isinstance(record.get("recent"), list)
    ):
        raise SinkError("checksum entry is not {topic, partition, recent}", path=str(path))
    tp = TopicPartition(record["topic"], record["partition"])
    recent = tuple(_digest_from_json(item, tp, path=path) for item in record["recent"])
    sealed = record.get("sealed")
    if sealed is None:
        return DigestChain(tp, recent)
    if not (
        isinstance(sealed, dict)
        and _is_segment_name(sealed.get("segment"), tp)
        and _is_sha256(sealed.get("sha256"))
        and all(type(sealed.get(k)) is int for k in ("count", "through"))
    ):
        raise SinkError(
            "checksum entry's sealed segment is malformed",
            path=str(path),
            topic=tp.topic,
            partition=tp.partition,
        )
    segment = SealedSegment(sealed["segment"], sealed["sha256"], sealed["count"], sealed["through"])
    return DigestChain(tp, recent, segment)


def _digest_from_json(item: Any, tp: TopicPartition, *, path: Path | str) -> FileDigest:
    parsed = (
        parse_data_file(Path(item["file"]))
        if isinstance(item, dict) and isinstance(item.get("file"), str)
        else None
    )
    if (
        parsed is None
        or parsed.topic_partition != tp
        or not isinstance(item.get("table"), str)
        or not _is_sha256(item.get("sha256"))
        or type(item.get("bytes")) is not int
    ):
        raise SinkError(
            "checksum is not {table, file, sha256, bytes} of a data file of its partition",
            path=str(path),
            topic=tp.topic,
            partition=tp.partition,
        )
    return FileDigest(item["table"], item["file"], item["sha256"], item["bytes"])


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.match(value) is not None


def _is_segment_name(value: Any, tp: TopicPartition) -> bool:
    match = _SEGMENT_NAME.match(value) if isinstance(value, str) else None
    return match is not None and TopicPartition(match["topic"], int(match["partition"])) == tp


# -- segments ----------------------------------------------------------------------------------


def _encode_segment(
    group: str, tp: TopicPartition, previous: SealedSegment | None, digests: Iterable[FileDigest]
) -> bytes:
    body = [_json_line(_digest_to_json(d)) for d in digests]
    header = {
        "kind": SEGMENT_KIND,
        "file_version": SEGMENT_FILE_VERSION,
        "group": group,
        "topic": tp.topic,
        "partition": tp.partition,
        "previous": None if previous is None else previous.name,
        "previous_sha256": None if previous is None else previous.sha256,
        "lines": len(body),
    }
    return b"".join([_json_line(header), *body])


def _json_line(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def _segment_name(tp: TopicPartition, sha256: str) -> str:
    return f"{tp.topic}+{tp.partition}+{sha256[:20]}.jsonl"


def _seal(
    layout: FileLayout,
    group: str,
    tp: TopicPartition,
    previous: SealedSegment | None,
    digests: tuple[FileDigest, ...],
) -> SealedSegment:
    """Write `digests` as a new segment after `previous`, durably; return its reference."""
    content = _encode_segment(group, tp, previous, digests)
    digest = sha256_of(content)
    name = _segment_name(tp, digest)
    directory = layout.digest_dir(group)
    make_directory(directory)
    write_durably(directory / name, content)
    count = 1 if previous is None else previous.count + 1
    return SealedSegment(name, digest, count, max(d.last_offset for d in digests))


def _segments(
    layout: FileLayout, group: str, chain: DigestChain
) -> Iterator[tuple[SealedSegment, list[FileDigest]]]:
    """The chain's segments, newest first, each checked against the SHA-256 its referrer
    recorded. A missing, altered or foreign segment is a `SinkError` naming it."""
    tp, reference, seen = chain.topic_partition, chain.sealed, set[str]()
    while reference is not None and reference.name not in seen:
        seen.add(reference.name)
        path = layout.digest_dir(group) / reference.name
        context = {"path": str(path), "group": group, "topic": tp.topic, "partition": tp.partition}
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise SinkError("a checksum segment is missing", **context) from None
        if sha256_of(content) != reference.sha256:
            raise SinkError(
                "a checksum segment is altered",
                expected_sha256=reference.sha256,
                actual_sha256=sha256_of(content),
                **context,
            )
        try:
            header, digests = _decode_segment(content, group, tp, path)
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(
                "a checksum segment is malformed", reason=str(exc)[:80], **context
            ) from exc
        yield reference, digests
        previous = header["previous"]
        reference = (
            None
            if previous is None
            else SealedSegment(previous, header["previous_sha256"], reference.count - 1, -1)
        )


def _decode_segment(
    content: bytes, group: str, tp: TopicPartition, path: Path
) -> tuple[dict[str, Any], list[FileDigest]]:
    lines = content.splitlines()
    header = json.loads(lines[0])
    expected = {"kind": SEGMENT_KIND, "file_version": SEGMENT_FILE_VERSION, "group": group}
    expected |= {"topic": tp.topic, "partition": tp.partition, "lines": len(lines) - 1}
    if not isinstance(header, dict) or any(header.get(k) != v for k, v in expected.items()):
        raise ValueError("its header names another segment")
    previous = header.get("previous")
    if previous is not None and not (
        _is_segment_name(previous, tp) and _is_sha256(header.get("previous_sha256"))
    ):
        raise ValueError("its previous segment is malformed")
    return header, [_digest_from_json(json.loads(line), tp, path=path) for line in lines[1:]]


def chain_digests(layout: FileLayout, group: str, chain: DigestChain) -> list[FileDigest]:
    """Every digest of the chain, oldest first (reads its segments; see `_segments`)."""
    sealed = [digests for _ref, digests in _segments(layout, group, chain)]
    return [d for digests in reversed(sealed) for d in digests] + list(chain.recent)


# -- a commit's bookkeeping --------------------------------------------------------------------


def stage_chains(
    layout: FileLayout,
    group: str,
    stored: StoredChains | None,
    new: Iterable[FileDigest],
    next_offsets: Mapping[TopicPartition, int],
) -> list[DigestChain]:
    """Every chain of the group's next document: the `stored` ones, and for each partition of
    `next_offsets` (the checkpoints being saved) its chain with the digests of files at or
    beyond its new next offset dropped (a move back) and `new` appended. Segments this seals
    are written durably now (under the directory lock, before the document that names them).
    """
    chains = {} if stored is None else dict(stored.digests)
    added: dict[TopicPartition, list[FileDigest]] = {}
    for digest in new:
        parsed = parse_data_file(Path(digest.file))
        if parsed is not None:
            added.setdefault(parsed.topic_partition, []).append(digest)
    for tp, next_offset in next_offsets.items():
        chain = chains.get(tp) or DigestChain(tp)
        chain = _dropped_from(layout, group, chain, next_offset)
        recent = chain.recent + tuple(added.get(tp, ()))
        if len(recent) >= INLINE_DIGESTS:
            chain = DigestChain(tp, (), _seal(layout, group, tp, chain.sealed, recent))
        else:
            chain = replace(chain, recent=recent)
        chains[tp] = chain
    return [c for c in chains.values() if c.recent or c.sealed]


def _dropped_from(
    layout: FileLayout, group: str, chain: DigestChain, next_offset: int
) -> DigestChain:
    """`chain` without the digests of files that `next_offset` does not commit."""
    if chain.sealed is None or chain.sealed.through < next_offset:
        kept = tuple(d for d in chain.recent if d.last_offset < next_offset)
        return chain if len(kept) == len(chain.recent) else replace(chain, recent=kept)
    tp = chain.topic_partition
    kept = tuple(d for d in chain_digests(layout, group, chain) if d.last_offset < next_offset)
    log.info(
        "file_sink_checksums_moved_back",
        group=group,
        topic=tp.topic,
        partition=tp.partition,
        next_offset=next_offset,
        kept=len(kept),
    )
    return DigestChain(tp, (), _seal(layout, group, tp, None, kept) if kept else None)


def remove_unreachable_segments(
    layout: FileLayout, group: str, partitions: set[TopicPartition], stored: StoredChains | None
) -> None:
    """Delete the segments (and stale temps) of `partitions` that no chain reaches: sealed by
    a batch that never committed, or dropped by a move back. Called by `acquire`, under the
    lock. The chain is walked only where the directory holds more files than it should."""
    directory = layout.digest_dir(group)
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    listed: dict[TopicPartition, list[Path]] = {}
    for entry in entries:
        temp = TEMP_NAME.match(entry.name)
        match = _SEGMENT_NAME.match(temp["final"] if temp else entry.name)
        tp = None if match is None else TopicPartition(match["topic"], int(match["partition"]))
        if tp is not None and tp in partitions:
            listed.setdefault(tp, []).append(entry)
    removed = False
    for tp, paths in listed.items():
        chain = (None if stored is None else stored.digests.get(tp)) or DigestChain(tp)
        if len(paths) == (0 if chain.sealed is None else chain.sealed.count):
            continue  # exactly the chain's segments (a temp never counts as one)
        try:
            reachable = {ref.name for ref, _digests in _segments(layout, group, chain)}
        except SinkError as exc:  # keep everything: `checkpoint verify` reports the damage
            log.warning("file_sink_checksum_chain_damaged", error=str(exc))
            continue
        for path in paths:
            if path.name not in reachable:
                path.unlink(missing_ok=True)
                removed = True
                log.info("file_sink_removed_unreachable_checksums", path=str(path))
    if removed:
        fsync_directory(directory)
