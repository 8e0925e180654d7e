"""What the SQL sinks (SQLite, PostgreSQL) share: their own tables' names and columns."""

from __future__ import annotations

DEFAULT_CHECKPOINT_TABLE = "offsetkeeper_checkpoints"
DEFAULT_LEASE_TABLE = "offsetkeeper_leases"
JOB_TABLE = "offsetkeeper_replay_jobs"

# Checkpoint columns after the v1 ones (group_id, topic, partition, next_offset,
# format_version, updated_at): added by format v2. Sinks add them to a v1 table on open.
CHECKPOINT_V2_COLUMNS = ("epoch", "leader_epoch", "writer_version", "state", "state_version")
