"""`maxact-card render`: the "Maximum activations" section, alone or spliced into a model card."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from maxact_card.card.chart import render_chart
from maxact_card.card.front_matter import decode_card
from maxact_card.card.paths import (
    CARD_FILE,
    DEFAULT_CHART_PATH,
    DEFAULT_RESULTS_PATH,
    relative_link,
)
from maxact_card.card.section import read_results, render_section
from maxact_card.card.splice import splice_card
from maxact_card.commands._common import examples_epilog, handle_errors, stderr_console
from maxact_card.documents import atomic_write_set, check_writable
from maxact_card.errors import UsageError

EXAMPLES = [
    "maxact-card render maxact/results.json            # print the section",
    "maxact-card render model/maxact/results.json --card model/README.md",
    "maxact-card render results.json --card README.md --out NEW.md \\\n    --chart-out maxact/profile.svg",
]

ResultsArg = Annotated[
    Path, typer.Argument(help="Results JSON written by `maxact-card measure`.", show_default=False, metavar="RESULTS")
]
CardOpt = Annotated[
    Path | None,
    typer.Option(
        "--card",
        help="Model card (README.md, or its folder) to splice the section into; created when missing.",
        envvar="MAXACT_CARD_CARD",
    ),
]
RenderOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the section (alone) or the new card (with --card) here instead of stdout or the card itself.",
        envvar="MAXACT_CARD_OUT",
        show_default=False,
    ),
]
ChartOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--chart-out",
        help="Where to write the SVG chart (default with --card: maxact/profile.svg beside the card).",
        envvar="MAXACT_CARD_CHART_OUT",
    ),
]


def _link(target: Path, base: Path, default: str, what: str) -> str:
    """The relative link the section uses for `target`; the default (with a warning) when it is outside."""
    link = relative_link(target, base)
    if link is None:
        stderr_console().print(
            f"warning: {what} {target} is outside {base}; the section links {default}, so copy it there "
            "(`maxact-card publish` uploads it)",
            markup=False,
        )
        return default
    return link


def run_render(results_path: Path, card: Path | None, out: Path | None, chart_out: Path | None) -> str | None:
    """Do the work; returns the section text when it goes to stdout, else None. Raises typed errors."""
    results = read_results(results_path)
    if card is None:
        return _render_alone(results, results_path, out, chart_out)
    _render_into_card(results, results_path, card, out, chart_out)
    return None


def _render_alone(
    results: dict[str, Any], results_path: Path, out: Path | None, chart_out: Path | None
) -> str | None:
    # Printed alone, the section is meant for a card whose folder holds maxact/results.json and
    # maxact/profile.svg (where `publish` puts them); written to --out, links are relative to it.
    chart_link, results_link = DEFAULT_CHART_PATH, DEFAULT_RESULTS_PATH
    if out is not None:
        if chart_out is not None:
            chart_link = _link(chart_out, out.parent, DEFAULT_CHART_PATH, "the chart")
        results_link = relative_link(results_path, out.parent) or DEFAULT_RESULTS_PATH
    section = render_section(results, chart_path=chart_link, results_path=results_link)
    files = [(chart_out, render_chart(results).encode("utf-8"))] if chart_out else []
    if out is not None:
        files.append((out, section.encode("utf-8")))
    atomic_write_set(files)
    if out is None:
        return section
    stderr_console().print(f"wrote {out}" + (f" and {chart_out}" if chart_out else ""), markup=False)
    return None


def _render_into_card(
    results: dict[str, Any], results_path: Path, card: Path, out: Path | None, chart_out: Path | None
) -> None:
    card_path = card / CARD_FILE if card.is_dir() else card
    if card_path.exists() and not card_path.is_file():
        raise UsageError(f"{card_path} is not a file", hint="pass the model card (README.md) or its folder")
    target = out or card_path
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder", hint="pass a file path for the new card")
    base = target.parent
    chart_target = chart_out or base / DEFAULT_CHART_PATH
    chart_link = _link(chart_target, base, DEFAULT_CHART_PATH, "the chart")
    # The card links its results: results from elsewhere are copied to where the link points, in
    # the same set of writes as the card and the chart, so the three always land together.
    results_link = relative_link(results_path, base)
    copy_to = None
    if results_link is None:
        results_link, copy_to = DEFAULT_RESULTS_PATH, base / DEFAULT_RESULTS_PATH
    try:
        card_text: str | None = decode_card(card_path.read_bytes(), source=str(card_path))
    except FileNotFoundError:
        card_text = None  # no card yet: a new one is written
    except OSError as exc:
        raise UsageError(f"cannot read the card {card_path}: {exc.strerror}") from None
    # Everything is rendered before anything is written: an error leaves the card untouched.
    data = splice_card(card_text, results, chart_path=chart_link, results_path=results_link).encode("utf-8")
    files = [(chart_target, render_chart(results).encode("utf-8"))]
    if copy_to is not None:
        files.append((copy_to, Path(results_path).read_bytes()))  # the very file that was validated
    unchanged = target.is_file() and target.read_bytes() == data
    if not unchanged:
        files.append((target, data))
    atomic_write_set(files)
    action = "unchanged" if unchanged else ("created" if card_text is None and out is None else "wrote")
    copied = f"; results copied to {copy_to}" if copy_to is not None else ""
    stderr_console().print(f"{action} {target}; chart {chart_target}{copied}", markup=False)


def register(app: typer.Typer) -> None:
    """Add `render` to the app."""

    @app.command(
        "render",
        help="Render the Maximum activations section from RESULTS; with --card, splice it into the card.",
        short_help="Render the section, or splice it into a model card.",
        epilog=examples_epilog(EXAMPLES),
    )
    @handle_errors
    def render(
        results: ResultsArg,
        card: CardOpt = None,
        out: RenderOutOpt = None,
        chart_out: ChartOutOpt = None,
    ) -> None:
        check_writable(out, "--out")
        check_writable(chart_out, "--chart-out")
        section = run_render(results, card, out, chart_out)
        if section is not None:
            sys.stdout.write(section)
            sys.stdout.flush()
