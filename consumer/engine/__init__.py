"""The engine: one batch loop for run, replay and dead-letter re-drive, and the contracts it
defines for what it drives (the sink, the Kafka client backend, the dead-letter producer)."""
