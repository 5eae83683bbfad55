"""`maxact-card diff OLD.json NEW.json`: what changed between two results files (information, not a gate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from maxact_card.commands._common import FormatOpt, OutputFormat, examples_epilog, handle_errors
from maxact_card.documents import load_results
from maxact_card.fmt import number
from maxact_card.gate.diff import diff_results
from maxact_card.gate.summary import percent, signed, template_environment

EXAMPLES = [
    "maxact-card diff old/results.json new/results.json",
    "maxact-card diff a.json b.json --format markdown >> \"$GITHUB_STEP_SUMMARY\"",
    "maxact-card diff old.json new.json --format json | jq .peak",
]

_HELP = (
    "Compare two results files: per-site max|a| changes (sites only in one file are added/removed), "
    "layers that became or stopped being massive, peak growth, and quantization verdict changes. "
    "Always exits 0 when both files are valid: a diff is information, not a gate (use `check --baseline`)."
)


def _value(x: float | None) -> str:
    return "—" if x is None else number(x)


def _layers(layers: list[int]) -> str:
    return ", ".join(str(n) for n in layers) if layers else "none"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Text columns two spaces apart: the first two left-aligned, the values right-aligned."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _ident(side: dict[str, Any]) -> str:
    text = str(side["model"])
    if side["revision"]:
        text += f"@{side['revision']}"
    if side["commit_sha"]:
        text += f" ({side['commit_sha'][:7]})"
    return f"{text}, {side['dtype']}, corpus {side['corpus']}, {side['samples']} samples"


def render_text(diff: dict[str, Any]) -> str:
    """Plain text for a terminal; deterministic (golden-tested)."""
    peak = diff["peak"]
    counts = diff["site_counts"]
    lines = [
        f"old: {_ident(diff['old'])}",
        f"new: {_ident(diff['new'])}",
    ]
    lines += [f"note: {note}" for note in diff["notes"]]
    lines += [
        "",
        (
            f"peak max|a|: {_value(peak['old'])} at {peak['old_site']} → {_value(peak['new'])} at {peak['new_site']}"
            f" ({signed(peak['abs_change'])}, {percent(peak['pct_change'])})"
        ),
        "",
        "components:",
    ]
    lines += _table(
        [
            [
                c["component"],
                c["status"],
                _value(c["old"]),
                "→",
                _value(c["new"]),
                signed(c["abs_change"]),
                percent(c["pct_change"]),
            ]
            for c in diff["components"]
        ]
    )
    lines += [
        "",
        (
            f"sites: {counts['changed']} changed, {counts['added']} added, {counts['removed']} removed, "
            f"{counts['unchanged']} unchanged"
        ),
    ]
    lines += _table(
        [
            [
                s["site"],
                s["status"],
                _value(s["old"]),
                "→",
                _value(s["new"]),
                signed(s["abs_change"]),
                percent(s["pct_change"]),
            ]
            for s in diff["sites"]
            if s["status"] != "unchanged"
        ]
    )
    massive = diff["massive_layers"]
    lines += [
        "",
        (
            f"massive layers: {_layers(massive['old'])} → {_layers(massive['new'])}"
            f" (became massive: {_layers(massive['became'])}; stopped: {_layers(massive['stopped'])})"
        ),
        f"non-finite values: {diff['non_finite']['old']:,} → {diff['non_finite']['new']:,}",
    ]
    quant = diff["quant"]
    if quant["policies"]:
        lines += ["", "quantization verdicts:"]
        lines += _table(
            [
                [
                    q["policy"],
                    "changed" if q["changed"] else "same",
                    str(q["old"] or "—"),
                    "→",
                    str(q["new"] or "—"),
                ]
                for q in quant["policies"]
            ]
        )
        rec = quant["recommended"]
        if rec["old"] != rec["new"]:
            lines.append(f"  recommended: {rec['old'] or '—'} → {rec['new'] or '—'}")
    return "\n".join(lines) + "\n"


def render_markdown(diff: dict[str, Any]) -> str:
    """GitHub-flavoured Markdown (a PR comment or job summary); deterministic (golden-tested)."""
    return template_environment().get_template("diff.md.j2").render(diff=diff, ident=_ident)


def render_json(diff: dict[str, Any]) -> str:
    """The diff dictionary as JSON."""
    return json.dumps(diff, indent=2, ensure_ascii=False) + "\n"


RENDERERS = {
    OutputFormat.text: render_text,
    OutputFormat.markdown: render_markdown,
    OutputFormat.json: render_json,
}


def register(app: typer.Typer) -> None:
    """Add the `diff` command to the CLI."""

    @app.command("diff", help=_HELP, short_help="Compare two results files, site by site.",
                 epilog=examples_epilog(EXAMPLES))
    @handle_errors
    def diff(
        old: Annotated[Path, typer.Argument(help="The earlier results JSON.", show_default=False, metavar="OLD")],
        new: Annotated[Path, typer.Argument(help="The later results JSON.", show_default=False, metavar="NEW")],
        fmt: FormatOpt = OutputFormat.text,
    ) -> None:
        result = diff_results(load_results(old), load_results(new))
        typer.echo(RENDERERS[fmt](result), nl=False)
