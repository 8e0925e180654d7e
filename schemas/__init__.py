"""Avro schemas shipped as data: every checkpoint format ever released, and example events."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def checkpoint_schema_text(format_version: int) -> str:
    """The Avro schema (JSON text) of checkpoint format `format_version`."""
    path = resources.files(__name__).joinpath("checkpoint", f"v{format_version}.avsc")
    return path.read_text(encoding="utf-8")


def released_checkpoint_versions() -> list[int]:
    """Every checkpoint format version whose schema ships in this package, ascending."""
    folder = resources.files(__name__).joinpath("checkpoint")
    versions = []
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith("v") and name.endswith(".avsc") and name[1:-5].isdigit():
            versions.append(int(name[1:-5]))
    return sorted(versions)


def examples_dir() -> Path:
    """The directory of the example event schemas (`orders-v1.avsc`, `orders-v2.avsc`), wherever
    the package is installed: usable as `--schema-dir` and as a reader schema's directory."""
    return Path(str(resources.files(__name__).joinpath("examples")))
