"""Where a card's files live in a model repository, and how the card links to them."""

from __future__ import annotations

import os
from pathlib import Path

CARD_FILE = "README.md"
DEFAULT_CHART_PATH = "maxact/profile.svg"
DEFAULT_RESULTS_PATH = "maxact/results.json"


def relative_link(target: Path, base_dir: Path) -> str | None:
    """`target` relative to `base_dir` in POSIX form, or None when it lies outside `base_dir`."""
    try:
        rel = Path(os.path.relpath(Path(target).resolve(), Path(base_dir).resolve()))
    except ValueError:  # another drive on Windows
        return None
    if rel.parts and rel.parts[0] == "..":
        return None
    return rel.as_posix()
