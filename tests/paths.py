"""Where the suite's files are: the repository, the tests folder and its data."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
SMOLLM2_DIR = ROOT / ".cache" / "smollm2"
