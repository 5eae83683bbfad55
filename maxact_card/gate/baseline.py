"""Results to compare against: a local results file, or `org/name@rev` on the Hub (its maxact/results.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from maxact_card import documents
from maxact_card.errors import UsageError

HUB_RESULTS_PATH = "maxact/results.json"


def parse_results(data: bytes | str, source: str) -> dict[str, Any]:
    """Parse and validate results JSON that did not come from a file (e.g. from the Hub)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc})", hint="publish results written by maxact-card"
        ) from None
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply to be a results file") from None
    documents.validate_results(doc, source=source)
    return doc


_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>\S+))?")


def load_baseline(spec: str, token: str | None = None) -> dict[str, Any]:
    """Baseline results from a local results file, or from ``org/name@rev`` on the Hub (its maxact/results.json).

    A path that exists wins over a Hub id. Without ``@rev`` the Hub's default branch is read.
    """
    path = Path(spec)
    if path.is_file():
        return documents.load_results(path)
    match = _HUB_SPEC.fullmatch(spec)
    if match is None or spec.endswith(".json"):
        raise UsageError(
            f"baseline {spec!r} is neither an existing results file nor a Hub repo id org/name[@revision]",
            hint="pass a results JSON written by maxact-card, or a model repo that has maxact/results.json",
        )
    repo_id, revision = match["repo"], match["revision"]
    from maxact_card import hub  # lazily: the gate itself never needs the network

    data = hub.read_repo_file(repo_id, HUB_RESULTS_PATH, revision, token)
    where = f"{repo_id}@{revision}" if revision else repo_id
    if data is None:
        raise UsageError(
            f"baseline {where} has no {HUB_RESULTS_PATH}",
            hint="publish results for that revision first (maxact-card publish), or pass a local results file",
        )
    return parse_results(data, f"{where}:{HUB_RESULTS_PATH}")
