"""URLs in logs and output: passwords masked."""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@]*)@")


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and output."""
    return _PASSWORD.sub(r"\1:***@", url)
