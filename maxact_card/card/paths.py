"""Where a card's files live in a model repository, and how the card links to them."""

from __future__ import annotations

import os
from pathlib import Path

from maxact_card.card.front_matter import CardError, CardProblem

CARD_FILE = "README.md"
DEFAULT_CHART_PATH = "maxact/profile.svg"
DEFAULT_RESULTS_PATH = "maxact/results.json"


def decode_card(data: bytes, *, source: str) -> str:
    """A card's bytes as text; a card that is not UTF-8 is unreadable (exit 2)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(
            CardProblem.unreadable_card,
            f"{source} is not UTF-8 text (byte {exc.start})",
            hint="save the card as UTF-8",
        ) from None


def relative_link(target: Path, base_dir: Path) -> str | None:
    """`target` relative to `base_dir` in POSIX form, or None when it lies outside `base_dir`."""
    try:
        rel = Path(os.path.relpath(Path(target).resolve(), Path(base_dir).resolve()))
    except ValueError:  # another drive on Windows
        return None
    if rel.parts and rel.parts[0] == "..":
        return None
    return rel.as_posix()
