"""The built-in topic library (``library.yaml``) and its loader."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import yaml


@lru_cache(maxsize=1)
def builtin_topics() -> dict[str, dict]:
    """Built-in topics by key, as plain dicts (validated by the matrix)."""
    text = resources.files(__package__).joinpath("library.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)
