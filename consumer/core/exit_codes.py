"""Every exit code of the `offsetkeeper` command, in one place (the README's table mirrors it)."""

from __future__ import annotations

EXIT_OK = 0
# A failure that is not about one record: configuration, the sink or Kafka beyond its retry
# deadline, a bug. Nothing of the batch in hand was committed.
EXIT_FAILED = 1
# One or more partitions halted on a bad record (policy "stop"); everything before it committed.
EXIT_PARTITIONS_STOPPED = 2
# `replay` interrupted by a signal after committing its batch in hand: resumable with --resume.
EXIT_INTERRUPTED = 3
# `checkpoint verify` found checkpoints that do not fit the log.
EXIT_PROBLEMS_FOUND = 4
# Graceful shutdown cut short (a second signal, or the shutdown deadline): the in-flight batch
# was rolled back (see consumer.runtime.shutdown).
EXIT_ABORTED = 5
