"""Checkpoints and user state: the versioned checkpoint format with its adapters (every older
format upgrades in memory; a newer one is refused), the user-state upgrade chain, and the
reader of Spark Structured Streaming checkpoints that `checkpoint adopt` uses."""
