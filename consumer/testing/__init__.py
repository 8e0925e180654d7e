"""The test kit for users' apps: `run_app` runs an `App` over given records (values, keys,
headers, timestamps, partitions) through the real engine (the same batch loop, bad-record
policy, dead letters and keyed state as `offsetkeeper run`) into a temporary SQLite sink,
with an in-memory client backend instead of Kafka, and returns the rows, the state, the dead
letters and the stopped partitions. Public, like `consumer`: import from here."""

from consumer.testing.kit import BASE_TIMESTAMP_MS, AppRun, Message, encode_value, run_app
from consumer.testing.memory_backend import ManualClock, MemoryBackend

__all__ = [
    "BASE_TIMESTAMP_MS",
    "AppRun",
    "ManualClock",
    "MemoryBackend",
    "Message",
    "encode_value",
    "run_app",
]


def _report_public_module() -> None:
    """Public classes and functions say they live in `consumer.testing`."""
    for name in __all__:
        value = globals()[name]
        if isinstance(value, type) or callable(value):
            value.__module__ = __name__


_report_public_module()
