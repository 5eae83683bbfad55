"""The terminal: reports that fit 80, 100 and 120 columns and stay unwrapped in a pipe, help that
keeps its examples whole, `--version`, and model-controlled text that cannot break a line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import maxact_card
from maxact_card.cli import app
from maxact_card.commands import check, measure
from maxact_card.commands._text import Column, table
from maxact_card.fmt import printable
from maxact_card.gate.policy import DEFAULT_POLICY
from maxact_card.gate.rules import evaluate
from maxact_card.gate.verdict import RuleOutcome, Verdict
from tests import paths

ROOT = paths.ROOT
EXAMPLE = ROOT / "docs" / "example" / "maxact" / "results.json"
WIDTHS = (80, 100, 120)
LONG = ("global max|a| 70,000 at blocks.27.hook_resid_post exceeds the limit 65,504 (the float16 maximum): "
        "it overflows to inf when the model is served in float16")


def verdict() -> Verdict:
    return Verdict(False, (
        RuleOutcome("non_finite", True, 0, 0, None, "no NaN or inf in 152 sites"),
        RuleOutcome("limits.global_max_abs", False, 70000.0, 65504.0, "blocks.27.hook_resid_post", LONG),
        RuleOutcome("quant.require_pass.int8-dynamic-per-token", True, "PASS", "PASS", "blocks.24.mlp.hook_post",
                    "int8-dynamic-per-token passes (worst SQNR 25.28 dB at blocks.24.mlp.hook_post)"),
        RuleOutcome("baseline.max_peak_growth_pct", True, None, 25.0, None, "no baseline given; skipped",
                    skipped=True),
    ), "default")


def words(lines: list[str]) -> list[str]:
    return " ".join(lines).split()


@pytest.mark.parametrize("width", WIDTHS)
def test_the_gate_fits_the_terminal_and_keeps_every_word(width: int) -> None:
    lines = check.rule_lines(verdict(), width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert all(line == line.rstrip() for line in lines)
    for rule in verdict().rules:  # result and rule whole on one line, the message readable in full
        result = "skipped" if rule.skipped else ("PASS" if rule.passed else "FAIL")
        assert any(line.startswith(result) and f" {rule.rule} " in line for line in lines), rule.rule
        assert " ".join(rule.message.split()) in " ".join(words(lines))
    header = next(line for line in lines if line.startswith("result"))
    assert header.split() == ["result", "rule", "measured", "limit"]  # the message went under its rule


def test_the_gate_in_a_pipe_is_one_unpadded_line_per_rule() -> None:
    lines = check.rule_lines(verdict(), None)
    assert lines[1].split() == ["result", "rule", "measured", "limit", "message"]
    failing = [line for line in lines if line.startswith("FAIL")]
    assert len(failing) == 1 and failing[0].endswith(LONG)
    assert all(line == line.rstrip() for line in lines) and len(lines) == 2 + len(verdict().rules)


def test_a_table_too_narrow_for_its_grid_stacks_each_row() -> None:
    cols = [Column("site"), Column("value", right=True), Column("reason", wrap=True)]
    lines = table("t", cols, [["blocks.0.hook_resid_post", "1", "because " * 12]], 30)
    assert lines[:3] == ["t", "blocks.0.hook_resid_post", "  value:   1"]
    assert all(len(line) <= 30 for line in lines)


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="the example results are part of the repository")
@pytest.mark.parametrize("width", WIDTHS)
def test_the_summary_of_a_real_run_fits_the_terminal(width: int) -> None:
    results = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    lines = measure.summary_lines(results, width) + check.rule_lines(evaluate(results, DEFAULT_POLICY), width)
    assert all(len(line) <= width for line in lines), "\n".join(line for line in lines if len(line) > width)
    text = "\n".join(lines)
    assert "global max|a|  28,616 (" in text and "the median |a| of its site)" in text
    assert "int8-dynamic-per-token  PASS" in text and "blocks.24.mlp.hook_post" in text


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="the example results are part of the repository")
def test_a_gpu_run_says_which_code_updated_its_statistics() -> None:
    results = json.loads(EXAMPLE.read_text(encoding="utf-8"))  # a CPU run: nothing to say
    assert not any(line.startswith("updates") for line in measure.summary_lines(results, None))
    run = results["run"]
    run["device_type"], run["dtype"] = "cuda", "bfloat16"
    run["forward"]["statistics"] = {"cuda": 3458, "triton": 0, "torch": 0}
    [line] = [line for line in measure.summary_lines(results, None) if line.startswith("updates")]
    assert line.split(None, 1)[1] == "3,458 by the CUDA scan"
    run["forward"]["statistics"] = {"cuda": 0, "triton": 3458, "torch": 2}  # the CUDA scan could not be built
    [line] = [line for line in measure.summary_lines(results, 80) if line.startswith("updates")]
    assert line.split(None, 1)[1].startswith("3,458 by the Triton scan, 2 by torch (a bf16 update leaves")
    lines = measure.summary_lines(results, 80)
    assert all(len(line) <= 80 for line in lines)


@pytest.mark.parametrize("hostile", ["a\rb", "a\nb", "a\u2028b", "a\u2029b", "a\x1b[31mb", "a\u202eb", "a\x00b"])
def test_printable_keeps_hostile_text_on_its_line(hostile: str) -> None:
    shown = printable(hostile)
    assert shown.startswith("a\\") and shown.endswith("b") and shown.isprintable()
    lines = table(None, [Column("token"), Column("n")], [[printable(hostile), "1"]], None)
    assert len(lines) == 2


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"maxact-card {maxact_card.__version__}\n"


@pytest.mark.parametrize("command", ["measure", "check", "render", "validate", "publish", "diff"])
def test_help_keeps_examples_whole_and_fits_80_columns(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    examples = lines[lines.index("  Examples:") + 1:] if "  Examples:" in lines else lines[lines.index("Examples:") + 1:]
    shown = [line.strip() for line in examples if line.strip()]
    assert shown and shown[0].startswith(f"maxact-card {command} ")
    for line, after in zip(shown, [*shown[1:], ""]):  # a continued example goes on with an option
        assert line.startswith(("maxact-card ", "--")), line
        if line.endswith("\\"):
            assert after.startswith("--"), after


def test_help_shows_defaults_as_people_write_them() -> None:
    res = CliRunner().invoke(app, ["check", "--help"], terminal_width=200)
    assert "(default: 1/3)" in " ".join(res.stdout.split()) and "0.3333" not in res.stdout


def test_the_command_list_is_not_cut_off() -> None:
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}, terminal_width=80)
    listed = re.findall(r"^  (\w+)\s{2,}(.+)$", res.stdout, flags=re.MULTILINE)
    assert {name for name, _ in listed} >= {"measure", "check", "render", "validate", "publish", "diff"}
    assert not [summary for _, summary in listed if summary.endswith("...")]


def test_the_module_entry_point_prints_the_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "maxact_card", "--version"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"maxact-card {maxact_card.__version__}"


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maxact_card", *argv], capture_output=True, text=True, check=False,
                          timeout=120)


@pytest.mark.parametrize(("argv", "says"), [
    (["measure", "--nope"], "error: No such option: --nope"),
    (["measure"], "error: Missing argument 'MODEL'; see `maxact-card measure --help`"),
    (["frob"], "error: No such command 'frob'; see `maxact-card --help`"),
    (["measure", "m", "--samples", "abc"], "error: Invalid value for '--samples'"),
])
def test_usage_errors_are_one_line_with_the_fix(argv: list[str], says: str) -> None:
    proc = _cli(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(says), proc.stderr


def test_a_bare_command_prints_the_help() -> None:
    proc = _cli()
    assert proc.returncode == 2 and proc.stderr.startswith("Usage: maxact-card [OPTIONS] COMMAND")
