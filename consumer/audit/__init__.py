"""`offsetkeeper audit`: recompute a range of the log through the app in memory and compare
the result with what the sink holds (and the overwrite count of `replay --overwrite-newer
--dry-run`)."""
