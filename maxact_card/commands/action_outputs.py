"""The GitHub Action's post-processing: ``python -m maxact_card.commands.action_outputs RESULTS_JSON CHECK_JSON``.

Reads the results file written by ``check --out`` and the JSON that ``check --format json`` printed
(``{"results_path", "verdict": {...}, "pr_url"}``; a bare verdict object is accepted too), then

* appends the step outputs ``verdict`` (PASS, FAIL or ERROR), ``global-max``, ``peak-site``,
  ``results-path`` and ``pr-url`` to ``$GITHUB_OUTPUT``;
* appends the Markdown job summary to ``$GITHUB_STEP_SUMMARY``;
* prints one line for the log, and one ``::error`` workflow command per failed rule (or one for a
  check that produced no verdict), which GitHub shows as annotations.

It never changes the step's outcome itself: it exits 0 whenever its own arguments are usable; the
Action's step exits with the code of ``maxact-card check``, or 1 when that code is 0 but the
verdict (``--verdict-file``) is not PASS. Without the GitHub variables it prints
the outputs to stdout, so it can be tried locally.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maxact_card.fmt import printable
from maxact_card.gate.summary import format_value, render_summary
from maxact_card.gate.verdict import Verdict


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _verdict_doc(check: Any) -> tuple[Mapping[str, Any] | None, str, str]:
    """(verdict dict, pr_url, results_path) from check's JSON or a bare verdict."""
    if not isinstance(check, Mapping):
        return None, "", ""
    if isinstance(check.get("verdict"), Mapping):
        return check["verdict"], str(check.get("pr_url") or ""), str(check.get("results_path") or "")
    if "rules" in check and "passed" in check:
        return check, "", ""
    return None, "", ""


def escape_data(text: str) -> str:
    """Escape a workflow-command message (GitHub's toolkit escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow-command property such as ``title`` (GitHub's toolkit escapeProperty)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation_lines(verdict: Verdict | None, exit_code: int | None) -> list[str]:
    """``::error`` lines: one per failed rule, or one saying that the check produced no verdict."""
    if verdict is None:
        code = "" if exit_code is None else f" (exit code {exit_code})"
        return [
            f"::error title={escape_property('maxact-card check')}::"
            + escape_data(f"maxact-card check failed before producing a verdict{code}; see the step log")
        ]
    lines = []
    for rule in verdict.failed:
        where = f" at {rule.site}" if rule.site else ""
        text = (
            f"{rule.message} (measured {format_value(rule.rule, rule.measured)}, "
            f"limit {format_value(rule.rule, rule.limit)}{where})"
        )
        lines.append(f"::error title={escape_property('maxact-card: ' + rule.rule)}::{escape_data(text)}")
    return lines


def error_summary(exit_code: int | None) -> str:
    """The job summary when there is no verdict (bad input, runtime failure)."""
    code = "an error" if exit_code is None else f"exit code {exit_code}"
    return (
        "## maxact-card release gate: ⚠️ ERROR\n\n"
        f"`maxact-card check` stopped with {code} before it produced a verdict "
        "(2: bad input or usage, 3: a runtime or infrastructure failure). The step log says what to fix.\n"
    )


def _write_outputs(outputs: Mapping[str, str], path: str | None) -> None:
    if not path:
        for name, value in outputs.items():
            print(f"{name}={value}")
        return
    with open(path, "a", encoding="utf-8") as handle:
        for name, value in outputs.items():
            # The multi-line form, with a delimiter that cannot occur in the value.
            delimiter = f"ghadelimiter_{secrets.token_hex(8)}"
            handle.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def _append(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m maxact_card.commands.action_outputs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", type=Path, help="results JSON written by `check --out`")
    parser.add_argument("check", type=Path, help="what `check --format json` printed (or a verdict JSON)")
    parser.add_argument("--exit-code", type=int, default=None, help="the exit code of `maxact-card check`")
    parser.add_argument(
        "--section", type=Path, default=None, help="a Markdown file with the card section preview"
    )
    parser.add_argument(
        "--verdict-file", type=Path, default=None, help="also write the verdict word (PASS, FAIL, ERROR) here"
    )
    args = parser.parse_args(argv)

    verdict_doc, pr_url, results_path = _verdict_doc(_read_json(args.check))
    results = _read_json(args.results)
    if not isinstance(results, Mapping) or "global" not in results:
        results = None
    verdict: Verdict | None = None
    if verdict_doc is not None:
        try:
            verdict = Verdict.from_dict(verdict_doc)
        except (KeyError, TypeError, ValueError):
            verdict = None
    section = ""
    if args.section is not None and args.section.is_file():
        section = args.section.read_text(encoding="utf-8")

    ok = verdict is not None and results is not None
    peak = results["global"] if results is not None else {}
    outputs = {
        "verdict": verdict.word if ok and verdict is not None else "ERROR",
        "global-max": repr(float(peak["max_abs"])) if "max_abs" in peak else "",
        "peak-site": str(peak.get("site", "")),
        "results-path": str(Path(results_path or args.results).resolve()) if results is not None else "",
        "pr-url": pr_url,
    }
    _write_outputs(outputs, os.environ.get("GITHUB_OUTPUT"))
    if args.verdict_file is not None:
        args.verdict_file.write_text(outputs["verdict"] + "\n", encoding="utf-8")
    if ok and verdict is not None and results is not None:
        summary = render_summary(results, verdict, section=section)
    else:
        summary = error_summary(args.exit_code)
    _append(os.environ.get("GITHUB_STEP_SUMMARY"), summary)
    if ok and verdict is not None:
        # one log line whatever the site or path holds: a newline there could start a workflow command
        print(
            f"maxact-card check: {verdict.word} ({len(verdict.failed)} of {len(verdict.rules)} rules failed); "
            f"global max|a| {outputs['global-max']} at {printable(outputs['peak-site'])}; "
            f"results in {printable(outputs['results-path'])}"
        )
    for line in annotation_lines(verdict if ok else None, args.exit_code):
        print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
