"""Where everything lives in a file sink's directory, and how data files are named.

    DIR/<table>/<group>/<topic>+<partition>+<first offset:020d>+<last offset:020d>.jsonl
    DIR/_offsetkeeper/lock                        the directory's lock (`_file_lock`)
    DIR/_offsetkeeper/checkpoints/<group>.json    the group's checkpoints, one JSON document
    DIR/_offsetkeeper/leases/<group>.json         the group's fencing epochs
    DIR/_offsetkeeper/jobs/<job>.json             replay job documents
    DIR/_offsetkeeper/state/<group>/<topic>+<partition>+<seq:020d>.<base|delta>.jsonl
                                                  keyed state files (`_file_state_files`)
    DIR/_offsetkeeper/digests/<group>/<topic>+<partition>+<20 hex>.jsonl
                                                  sealed checksum segments (`_file_digests`)

Group and job names are percent-encoded to be file-system safe (`safe_name`). A file being
written is a hidden temp file next to its final name (`temp_path`).
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from consumer import ConfigError, TopicPartition

OWN_DIR = "_offsetkeeper"
OWN_SUBDIRS = ("checkpoints", "leases", "jobs")
DATA_SUFFIX = ".jsonl"

# Kafka topic names are [A-Za-z0-9._-], so "+" separates the fields unambiguously.
_DATA_NAME = re.compile(
    r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+(?P<last>\d{20})"
    + re.escape(DATA_SUFFIX)
    + "$"
)
# ".<final name>.<pid>.<random>.tmp": hidden, and names the data file it would become.
TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.\d+\.[0-9a-f]+\.tmp$")


def safe_name(name: str) -> str:
    """`name` as one file name: percent-encoded, and never hidden or a `.`/`..` entry."""
    if not name:
        raise ConfigError("an empty name cannot name a file")
    encoded = quote(name, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def data_file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    return f"{topic}+{partition}+{first_offset:020d}+{last_offset:020d}{DATA_SUFFIX}"


@dataclass(frozen=True, slots=True)
class DataFile:
    """One committed (or, before the checkpoint moves past it, pending) data file."""

    path: Path
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    # What the checkpoint document recorded when the file was committed (None: committed by a
    # version before checksums, or not committed yet).
    sha256: str | None = None
    size: int | None = None

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def parse_data_file(path: Path) -> DataFile | None:
    match = _DATA_NAME.match(path.name)
    if match is None:
        return None
    return DataFile(
        path=path,
        topic=match["topic"],
        partition=int(match["partition"]),
        first_offset=int(match["first"]),
        last_offset=int(match["last"]),
    )


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


@dataclass(frozen=True, slots=True)
class FileLayout:
    """The paths of one file sink directory."""

    root: Path

    @property
    def own(self) -> Path:
        return self.root / OWN_DIR

    @property
    def lock(self) -> Path:
        return self.own / "lock"

    def checkpoint_path(self, group: str) -> Path:
        return self.own / "checkpoints" / f"{safe_name(group)}.json"

    def lease_path(self, group: str) -> Path:
        return self.own / "leases" / f"{safe_name(group)}.json"

    def job_path(self, job_id: str) -> Path:
        return self.own / "jobs" / f"{safe_name(job_id)}.json"

    def state_dir(self, group: str) -> Path:
        return self.own / "state" / safe_name(group)

    def digest_dir(self, group: str) -> Path:
        return self.own / "digests" / safe_name(group)

    def data_dir(self, table: str, group: str) -> Path:
        return self.root / table / safe_name(group)

    def data_dirs(self, group: str) -> list[Path]:
        """The group's directory in every table directory (tables of other apps included)."""
        try:
            tables = [p for p in self.root.iterdir() if p.is_dir() and p.name != OWN_DIR]
        except FileNotFoundError:
            return []
        return [table / safe_name(group) for table in tables if (table / safe_name(group)).is_dir()]
