"""Environment switches that turn a fast path off (for comparison runs and as an escape hatch)."""

from __future__ import annotations

import os


def switched_off(name: str) -> bool:
    """Whether environment variable `name` turns its feature off (0, false or off; on when unset)."""
    return os.environ.get(name, "1") in ("0", "false", "off")
