"""offsetkeeper's version, written here only: pyproject.toml reads it for the package metadata,
and `offsetkeeper --version`, `consumer.__version__` and every checkpoint's `writer_version`
report it."""

__version__ = "0.2.0"
