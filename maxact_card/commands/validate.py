"""`maxact-card validate`: does a card's maxact section still tell the truth about its results and weights?"""

from __future__ import annotations

import json
import posixpath
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from maxact_card.card.paths import CARD_FILE
from maxact_card.card.validate import (
    CardSource,
    CheckStatus,
    HubSource,
    LocalSource,
    ValidationReport,
    validate_card,
)
from maxact_card.commands._common import (
    FormatOpt,
    OutputFormat,
    RevisionOpt,
    TokenOpt,
    examples_epilog,
    handle_errors,
)
from maxact_card.documents import reader_beside
from maxact_card.errors import EXIT_GATE, EXIT_PASS, UsageError

EXAMPLES = [
    "maxact-card validate ./my-model         # README.md and maxact/ in a folder",
    "maxact-card validate ./my-model/README.md --results runs/results.json",
    "maxact-card validate my-org/my-model --revision main --format json",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

TargetArg = Annotated[
    str,
    typer.Argument(
        help="A model folder, its README.md, or a Hub repo id (org/name).",
        show_default=False,
        metavar="PATH_OR_REPO",
    ),
]
ResultsOpt = Annotated[
    Path | None,
    typer.Option(
        "--results",
        help="Results file to check against (default: the one the card names, else maxact/results.json beside it).",
        envvar="MAXACT_CARD_RESULTS",
    ),
]


def resolve_source(target: str, *, revision: str | None, token: str | None) -> CardSource:
    """A local folder or README.md, else a Hub repo id; anything else is bad input (exit 2)."""
    path = Path(target)
    if path.exists():
        if revision:
            raise UsageError(
                "--revision applies to Hub repos only", hint=f"drop it, {target} is a local path"
            )
        return LocalSource(path / CARD_FILE if path.is_dir() else path)
    if _REPO_ID.fullmatch(target):
        return HubSource(target, revision=revision, token=token)
    raise UsageError(
        f"{target} is neither a local file or folder nor a Hub repo id",
        hint="pass a model folder, its README.md, or org/name",
    )


def read_results_option(results: Path, source: CardSource) -> tuple[str, bytes, Callable[[str], bytes | None]]:
    """An explicit --results: a local file, or (for a Hub repo) a path inside the repo; with a reader
    of the files beside it (its per-channel companion)."""
    if results.is_file():
        return str(results), results.read_bytes(), reader_beside(results.parent)
    if isinstance(source, HubSource):
        data = source.read(results.as_posix())
        if data is not None:
            folder = posixpath.dirname(results.as_posix())
            return results.as_posix(), data, lambda name: source.read(posixpath.join(folder, name))
    raise UsageError(
        f"results file {results} does not exist", hint="pass the file `maxact-card measure --out` wrote"
    )


def format_text(report: ValidationReport) -> str:
    """One line per check (fails say what to do), then a count."""
    width = max(len(check.name) for check in report.checks)
    lines = []
    for check in report.checks:
        line = f"{check.status.value.upper():4}  {check.name:<{width}}  {check.message}"
        if check.status is CheckStatus.failed and check.fix:
            line += f"; fix: {check.fix}"
        lines.append(line)
    counts = report.to_dict()["counts"]
    verdict = "valid" if report.ok else "NOT valid"
    lines.append(
        f"{report.target}: {verdict} ({counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped)"
    )
    return "\n".join(lines) + "\n"


def format_markdown(report: ValidationReport) -> str:
    """A Markdown table, for job summaries and PR comments."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    icon = {CheckStatus.passed: "✅ pass", CheckStatus.failed: "❌ fail", CheckStatus.skipped: "➖ skip"}
    lines = [
        f"### maxact-card validate: `{report.target}` {'is valid' if report.ok else 'is NOT valid'}",
        "",
        "| Check | Result | Details | What to do |",
        "|---|---|---|---|",
    ]
    for check in report.checks:
        lines.append(
            f"| {check.name} | {icon[check.status]} | {cell(check.message)} | "
            f"{cell(check.fix) if check.fix and check.status is CheckStatus.failed else ''} |"
        )
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add `validate` to the app."""

    @app.command(
        "validate",
        help=(
            "Check a card: one maxact section, valid results, section and front matter matching the results, "
            "results measured on the weights the card ships with, chart present. "
            "Exit 0 all pass, 1 a check failed, 2 bad input."
        ),
        short_help="Check that a card's section tells the truth about its weights.",
        epilog=examples_epilog(EXAMPLES),
    )
    @handle_errors
    def validate(
        target: TargetArg,
        results: ResultsOpt = None,
        revision: RevisionOpt = None,
        token: TokenOpt = None,
        output_format: FormatOpt = OutputFormat.text,
    ) -> None:
        source = resolve_source(target, revision=revision, token=token)
        if results is not None:
            name, data, beside = read_results_option(results, source)
            report = validate_card(source, results_file=(name, data), read_beside_results=beside)
        else:
            report = validate_card(source)
        if output_format is OutputFormat.json:
            text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
        elif output_format is OutputFormat.markdown:
            text = format_markdown(report)
        else:
            text = format_text(report)
        sys.stdout.write(text)
        sys.stdout.flush()
        raise typer.Exit(EXIT_PASS if report.ok else EXIT_GATE)
