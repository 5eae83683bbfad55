"""Environment switches that turn a fast path off (for comparison runs and as an escape hatch)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def switched_off(name: str) -> bool:
    """Whether environment variable `name` turns its feature off (0, false or off; on when unset)."""
    return os.environ.get(name, "1") in ("0", "false", "off")


@contextlib.contextmanager
def turned_off(name: str) -> Iterator[None]:
    """Switch `name` off for the block (the other side of a comparison run), then put it back as it was."""
    before = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
