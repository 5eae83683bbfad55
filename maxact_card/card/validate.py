"""Check a card against its results: the section and the summary as rendered from them, the links,
and the weights the results were measured on (by sha256), for a local folder or a Hub repository.
"""

from __future__ import annotations

import enum
import functools
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from maxact_card import fmt
from maxact_card.card.chart import render_chart
from maxact_card.card.front_matter import CardError, CardProblem, decode_card, parse_card
from maxact_card.card.paths import CARD_FILE, DEFAULT_CHART_PATH, DEFAULT_RESULTS_PATH
from maxact_card.card.section import SUMMARY_KEY, card_summary, export_links, parse_results, render_section
from maxact_card.documents import COMPANION_SUFFIX, find_companion, sha256_file
from maxact_card.errors import UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
EXPORT_PREFIX = "maxact-"  # the default names of `maxact-card export`'s files (maxact_card.export.FORMATS)


class CheckStatus(str, enum.Enum):
    """The outcome of one validation check."""

    passed = "pass"
    failed = "fail"
    skipped = "skip"


@dataclass(frozen=True)
class Check:
    """One validation check: its name, outcome, what was found, and what to do when it failed."""

    name: str
    status: CheckStatus
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "status": self.status.value, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class ValidationReport:
    """All checks of one card; `ok` when none failed."""

    target: str
    card: str
    results: str
    checks: tuple[Check, ...] = field(default_factory=tuple)
    #: the results the card was checked against, when they were valid (not part of `to_dict`)
    results_doc: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not fail a card)."""
        return all(check.status is not CheckStatus.failed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        counts = {status.value: sum(1 for c in self.checks if c.status is status) for status in CheckStatus}
        return {
            "target": self.target,
            "card": self.card,
            "results": self.results,
            "ok": self.ok,
            "counts": counts,
            "checks": [check.to_dict() for check in self.checks],
        }


@dataclass(frozen=True)
class WeightFile:
    """A weight file as the card's repository holds it: size when known, and its sha256 on demand."""

    path: str
    size: int | None
    sha256: Callable[[], str]


class CardSource(Protocol):
    """Where a card and the files beside it come from: a local folder or a Hub repo."""

    label: str
    card_name: str
    render_hint: str

    def read(self, path: str) -> bytes | None:
        """The bytes of `path` (relative to the card's folder), or None when it does not exist."""
        ...

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """The commit the files were read at (None for a local folder) and the weight files."""
        ...


class LocalSource:
    """A card in a local folder, with the weights (if any) beside it."""

    def __init__(self, card_path: Path) -> None:
        self.card_path = Path(card_path)
        self.root = self.card_path.parent
        self.card_name = self.card_path.name
        self.label = str(self.card_path)
        self.render_hint = f"maxact-card render {{results}} --card {self.card_path}"

    def read(self, path: str) -> bytes | None:
        """Read a file beside the card; None when it is missing."""
        try:
            return (self.root / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """Every *.safetensors / *.bin / *.gguf below the card's folder (hidden folders skipped)."""
        files: list[WeightFile] = []
        for current, dirs, names in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                # our own files are not weights: the results' per-channel companion and the exports
                if name.endswith(WEIGHT_SUFFIXES) and not name.endswith(COMPANION_SUFFIX) \
                        and not name.startswith(EXPORT_PREFIX):
                    full = Path(current) / name
                    rel = full.relative_to(self.root).as_posix()
                    files.append(WeightFile(rel, full.stat().st_size, functools.partial(sha256_file, full)))
        return None, files


class HubSource:
    """A card in a Hub repo, read through maxact_card.hub (imported only when used)."""

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.card_name = CARD_FILE
        self.label = f"{repo_id}@{revision}" if revision else repo_id
        self.render_hint = (
            f"maxact-card render {{results}} --card README.md in a checkout of {repo_id}, "
            f"then `maxact-card publish`"
        )

    def read(self, path: str) -> bytes | None:
        """Download one file of the repo; None when it does not exist."""
        from maxact_card import hub

        return hub.read_repo_file(self.repo_id, path, self.revision, self.token)

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """The repo's commit and the sha256 of its weight files, from the Hub's metadata."""
        from maxact_card import hub

        commit, hashes = hub.repo_weight_state(self.repo_id, self.revision, self.token)
        return commit, [WeightFile(p, None, functools.partial(str, sha)) for p, sha in sorted(hashes.items())]


def _safe_relative(path: Any) -> str | None:
    """A path from the card's own metadata, accepted only if it stays inside the card's folder."""
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or ":" in path:
        return None
    if any(part in ("..", "") for part in path.replace("\\", "/").split("/")):
        return None
    return path


def _summary_exports(summary: Mapping[str, Any], results_path: str) -> dict[str, str] | None:
    """The export files the card's `maxact:` summary lists (relative to the card), as the `exports`
    argument of `render_section` takes them (relative to the results file); unsafe paths are left
    out, so a section that links them no longer matches."""
    listed = summary.get("exports")
    if not isinstance(listed, Mapping):
        return None
    base = posixpath.dirname(results_path) or "."
    exports = {
        str(name): posixpath.relpath(path, base)
        for name, path in listed.items()
        if _safe_relative(path) is not None
    }
    return exports or None


def _first_difference(card: str, expected: str, first_line: int) -> str:
    have, want = card.split("\n"), expected.split("\n")
    for index, (a, b) in enumerate(zip(have, want)):
        if a != b:
            return f"line {first_line + index} reads {_clip(a)!r}, the results give {_clip(b)!r}"
    if len(have) != len(want):
        return f"the section has {len(have)} lines, the results give {len(want)}"
    return "the section differs"


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_weights(results: Mapping[str, Any], source: CardSource) -> Check:
    model = results["model"]
    recorded = {w["path"]: w for w in model.get("weight_files", [])}
    if not recorded:
        return Check("weights", CheckStatus.skipped, "the results record no weight files")
    commit_now, files = source.weights()
    commit_then = model.get("commit_sha")
    actual = {f.path: f for f in files}
    measure_hint = "re-run `maxact-card measure` on the weights this card ships with, then render again"
    if not actual:
        if commit_now and commit_then and commit_now != commit_then:
            return Check(
                "weights",
                CheckStatus.failed,
                f"the results were measured at commit {commit_then[:12]}, the repo is at {commit_now[:12]}",
                measure_hint,
            )
        return Check(
            "weights",
            CheckStatus.skipped,
            f"no weight files beside the card to compare with the {len(recorded)} the results record",
        )
    stale: list[str] = []
    for path, entry in recorded.items():
        found = actual.get(path)
        if found is None:
            stale.append(f"{path} is missing")
        elif found.size is not None and found.size != entry["size"]:
            stale.append(
                f"{path} has {fmt.count(found.size)} bytes, the results measured {fmt.count(entry['size'])}"
            )
        elif found.sha256() != entry["sha256"]:
            stale.append(f"{path} has another sha256 than the one measured ({entry['sha256'][:12]}…)")
    if stale:
        at = (
            f" (measured at commit {commit_then[:12]}, repo now at {commit_now[:12]})"
            if commit_now and commit_then and commit_now != commit_then
            else ""
        )
        return Check("weights", CheckStatus.failed, "stale results: " + "; ".join(stale) + at, measure_hint)
    notes = []
    extra = sorted(set(actual) - set(recorded))
    if extra:
        notes.append(f"also present, not measured: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
    if commit_now and commit_then and commit_now != commit_then:
        notes.append(f"repo moved from {commit_then[:12]} to {commit_now[:12]} without touching the weights")
    message = ("the weight file matches the results' sha256" if len(recorded) == 1 else
               f"all {len(recorded)} weight files match the results' sha256")
    return Check("weights", CheckStatus.passed, message + (f" ({'; '.join(notes)})" if notes else ""))


def validate_card(source: CardSource, *, results_file: tuple[str, bytes] | None = None,
                  read_beside_results: Callable[[str], bytes | None] | None = None) -> ValidationReport:
    """Check a card against its results: one section, valid results, section/summary/chart/weights agree.

    `results_file` is (name, bytes) of a results file given explicitly, and `read_beside_results`
    reads a file beside it (its companion); otherwise the file named in the card's `maxact:` summary,
    or `maxact/results.json` beside the card. Raises CardError (exit 2) for an unreadable card, broken
    markers or duplicate sections, and UsageError (exit 2) when the results name a per-channel
    companion that is missing or altered (`documents.find_companion`); everything else is a check.
    """
    raw = source.read(source.card_name)
    if raw is None:
        raise CardError(
            CardProblem.unreadable_card,
            f"no {source.card_name} at {source.label}",
            hint="pass the model folder, the README.md itself, or a Hub repo id",
        )
    text = decode_card(raw, source=source.label)
    parts = parse_card(text)
    checks: list[Check] = []
    summary_now = parts.front_matter.data.get(SUMMARY_KEY) if parts.front_matter else None
    summary_now = summary_now if isinstance(summary_now, dict) else {}
    results_path = _safe_relative(summary_now.get("results")) or DEFAULT_RESULTS_PATH
    chart_path = _safe_relative(summary_now.get("chart")) or DEFAULT_CHART_PATH
    exports = _summary_exports(summary_now, results_path)
    render_hint = source.render_hint.format(results=results_path)

    if parts.section is None:
        checks.append(
            Check("section", CheckStatus.failed, "the card has no maxact section", f"run `{render_hint}`")
        )
    else:
        first, last = parts.section_lines or (0, 0)
        checks.append(Check("section", CheckStatus.passed, f"one maxact section, lines {first}–{last}"))

    results: dict[str, Any] | None = None
    results_bytes: bytes | None
    if results_file is not None:
        results_name, results_bytes = results_file
    else:
        results_name, results_bytes = results_path, source.read(results_path)
    if results_bytes is None:
        checks.append(
            Check(
                "results",
                CheckStatus.failed,
                f"{results_name} does not exist beside the card",
                "add the results file `maxact-card measure --out` wrote, or pass --results",
            )
        )
    else:
        try:
            results = parse_results(results_bytes, source=results_name)
        except UsageError as exc:
            checks.append(Check("results", CheckStatus.failed, exc.message, exc.hint))
        else:
            folder = posixpath.dirname(results_name)
            find_companion(results, results_name, read_beside_results
                           or (lambda name: source.read(posixpath.join(folder, name))))
            companion = ", its companion's sha256 matches" if results.get("channels") else ""
            checks.append(
                Check(
                    "results",
                    CheckStatus.passed,
                    f"{results_name} is valid (schema version {results['schema_version']}){companion}",
                )
            )

    dependent = ("section-text", "front-matter", "weights", "chart")
    if results is None:
        checks.extend(
            Check(name, CheckStatus.skipped, "no valid results to compare with") for name in dependent
        )
        return ValidationReport(source.label, source.card_name, results_name, tuple(checks))

    # The section, byte for byte.
    expected = render_section(
        results, chart_path=chart_path, results_path=results_path, exports=exports
    ).rstrip("\n")
    if parts.section_text is None:
        checks.append(Check("section-text", CheckStatus.skipped, "no section to compare"))
    else:
        have = parts.section_text.replace("\r\n", "\n")
        if have == expected:
            checks.append(
                Check("section-text", CheckStatus.passed, "the section matches the results byte for byte")
            )
        else:
            first_line = parts.section_lines[0] if parts.section_lines else 1
            checks.append(
                Check(
                    "section-text",
                    CheckStatus.failed,
                    "the section does not match the results: "
                    + _first_difference(have, expected, first_line),
                    f"re-render it (never edit it by hand): `{render_hint}`",
                )
            )

    # The front-matter summary.
    want = card_summary(results, chart_path=chart_path, results_path=results_path, exports=exports)
    if parts.front_matter is None or SUMMARY_KEY not in parts.front_matter.data:
        checks.append(
            Check(
                "front-matter",
                CheckStatus.failed,
                f"the front matter has no `{SUMMARY_KEY}:` summary",
                f"run `{render_hint}`",
            )
        )
    elif parts.front_matter.data[SUMMARY_KEY] != want:
        have_summary = parts.front_matter.data[SUMMARY_KEY]
        have_summary = have_summary if isinstance(have_summary, dict) else {}
        keys = [
            k
            for k in list(want) + [k for k in have_summary if k not in want]
            if have_summary.get(k) != want.get(k)
        ]
        detail = "; ".join(f"{k}: card {have_summary.get(k)!r}, results {want.get(k)!r}" for k in keys[:4])
        checks.append(
            Check(
                "front-matter",
                CheckStatus.failed,
                f"the `{SUMMARY_KEY}:` summary disagrees with the results ({detail})",
                f"re-render it: `{render_hint}`",
            )
        )
    else:
        checks.append(
            Check("front-matter", CheckStatus.passed, f"the `{SUMMARY_KEY}:` summary matches the results")
        )

    checks.append(_check_weights(results, source))

    # The chart.
    chart = source.read(chart_path)
    if chart is None:
        checks.append(
            Check(
                "chart",
                CheckStatus.failed,
                f"{chart_path} does not exist beside the card",
                f"run `{render_hint}` (it writes the chart)",
            )
        )
    elif chart != render_chart(results).encode("utf-8"):
        checks.append(
            Check(
                "chart",
                CheckStatus.failed,
                f"{chart_path} does not match the chart the results give",
                f"re-render it: `{render_hint}`",
            )
        )
    else:
        checks.append(Check("chart", CheckStatus.passed, f"{chart_path} matches the results"))
    if exports:
        checks.append(_check_exports(exports, results_path, source))
    return ValidationReport(source.label, source.card_name, results_name, tuple(checks), results)


def _check_exports(exports: Mapping[str, str], results_path: str, source: CardSource) -> Check:
    """Every export file the section links lies beside the card (a link to nothing is a broken card)."""
    linked = export_links(exports, results_path)
    absent = [path for path in linked.values() if source.read(path) is None]
    if absent:
        return Check("exports", CheckStatus.failed, f"{', '.join(absent)} linked from the section but not beside "
                     "the card", "publish them with `maxact-card publish ... --exports` "
                     f"{','.join(sorted(linked))}, or render the section without them")
    return Check("exports", CheckStatus.passed, f"the {len(linked)} linked export files lie beside the card")
