"""Schemas and templates ship inside the wheel; in a source checkout they are read from the top level."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def resource_dir(kind: str) -> Traversable:
    """The folder of shipped resources of `kind` ("schemas" or "templates")."""
    packaged = resources.files("maxact_card") / kind
    if packaged.is_dir():
        return packaged
    return _SOURCE_ROOT / kind


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Load a JSON schema shipped with the package, e.g. "maxact-results.schema.json"."""
    return json.loads((resource_dir("schemas") / name).read_text(encoding="utf-8"))


def template_text(name: str) -> str:
    """The source text of a shipped Jinja2 template, e.g. "section.md.j2"."""
    return (resource_dir("templates") / name).read_text(encoding="utf-8")
