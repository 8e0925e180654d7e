"""Replay and backfill: a stored plan of offset ranges, run through the engine's one loop."""
