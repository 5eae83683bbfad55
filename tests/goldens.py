"""Golden-file comparison shared by the rendering tests."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME; MAXACT_UPDATE_GOLDEN=1 rewrites it instead."""
    path = GOLDEN / name
    if os.environ.get("MAXACT_UPDATE_GOLDEN") == "1":
        path.write_bytes(text.encode("utf-8"))
        return
    assert path.exists(), f"golden file {path} missing: run with MAXACT_UPDATE_GOLDEN=1 once and review it"
    expected = path.read_bytes().decode("utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), f"golden/{name}", "rendered", n=1
            )
        )
        pytest.fail(f"{name} differs from the golden file (MAXACT_UPDATE_GOLDEN=1 to accept):\n{diff}")
