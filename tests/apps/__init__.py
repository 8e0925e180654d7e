"""Apps used by the integration tests (imported by `offsetkeeper run --app tests.apps....`)."""
