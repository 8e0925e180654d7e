"""The `offsetkeeper` command line: the composition root that turns settings into a backend,
a sink (found by URL scheme through entry points) and an app, and hands them to the engine."""
