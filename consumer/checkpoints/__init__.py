"""Checkpoints and user state: the versioned checkpoint format with its adapters, the
state upgrade chain, and what the `offsetkeeper checkpoint` tools do."""
