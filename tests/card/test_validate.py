"""`maxact-card validate`: a freshly rendered card passes; hand edits, stale weights and gaps are caught."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.card.chart import render_chart
from maxact_card.card.splice import splice_card
from maxact_card.card.validate import LocalSource, validate_card
from maxact_card.cli import app
from tests import paths

HERE = paths.TESTS
EXAMPLE = HERE / "data" / "results_example.json"
CARDS = HERE / "cards"
WEIGHTS = b"tiny weights, version 1"
CHECKS = ["section", "results", "section-text", "front-matter", "weights", "chart"]

runner = CliRunner()


def results_for(weights: bytes, *, commit: str | None = None) -> dict[str, Any]:
    results = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    results["model"]["weight_files"] = [
        {"path": "model.safetensors", "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    ]
    if commit is not None:
        results["model"]["commit_sha"] = commit
    return results


def render(model: Path) -> None:
    result = runner.invoke(
        app, ["render", str(model / "maxact" / "results.json"), "--card", str(model / "README.md")]
    )
    assert result.exit_code == 0, result.output


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model folder: weights, results measured on them, and a card rendered from the results."""
    folder = tmp_path / "tiny-llama"
    (folder / "maxact").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "maxact" / "results.json").write_text(
        json.dumps(results_for(WEIGHTS), indent=1), encoding="utf-8"
    )
    (folder / "README.md").write_bytes((CARDS / "big_front_matter.md").read_bytes())
    render(folder)
    return folder


def validate(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *args])
    return result.exit_code, result.stdout, result.stderr


def statuses(stdout: str) -> dict[str, str]:
    """{check name: PASS/FAIL/SKIP} from the text report."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("PASS", "FAIL", "SKIP"):
            out[parts[1]] = parts[0]
    return out


def json_report(target: Path | str, *extra: str) -> tuple[int, dict[str, Any]]:
    code, stdout, _ = validate(str(target), "--format", "json", *extra)
    return code, json.loads(stdout)


def test_fresh_card_passes(model: Path) -> None:
    code, stdout, _ = validate(str(model))
    assert code == 0, stdout
    assert statuses(stdout) == dict.fromkeys(CHECKS, "PASS")
    assert stdout.rstrip().endswith("valid (6 passed, 0 failed, 0 skipped)")
    # The README.md itself is an accepted target too.
    assert validate(str(model / "README.md"))[0] == 0


def test_fresh_crlf_card_passes(model: Path) -> None:
    (model / "README.md").write_bytes((CARDS / "crlf.md").read_bytes())
    render(model)
    assert b"\r\n" in (model / "README.md").read_bytes()
    code, stdout, _ = validate(str(model))
    assert code == 0, stdout


def test_edited_number_in_section_fails(model: Path) -> None:
    card = model / "README.md"
    text = card.read_text(encoding="utf-8")
    assert "| 1 | 35,328 |" in text
    card.write_text(text.replace("| 1 | 35,328 |", "| 1 | 35,329 |"), encoding="utf-8")
    code, stdout, _ = validate(str(model))
    assert code == 1
    assert statuses(stdout)["section-text"] == "FAIL"
    line = next(line for line in stdout.splitlines() if line.startswith("FAIL  section-text"))
    assert "35,329" in line and "35,328" in line and "fix: re-render it" in line
    assert statuses(stdout)["front-matter"] == "PASS"


def test_edited_front_matter_summary_fails(model: Path) -> None:
    card = model / "README.md"
    text = card.read_text(encoding="utf-8")
    card.write_text(text.replace("global_max_abs: 36011.5", "global_max_abs: 3601.5"), encoding="utf-8")
    code, stdout, _ = validate(str(model))
    assert code == 1
    assert statuses(stdout)["front-matter"] == "FAIL"
    assert "global_max_abs: card 3601.5, results 36011.5" in stdout


def test_missing_chart_fails(model: Path) -> None:
    (model / "maxact" / "profile.svg").unlink()
    code, stdout, _ = validate(str(model))
    assert code == 1
    assert statuses(stdout)["chart"] == "FAIL"
    assert "maxact/profile.svg does not exist" in stdout and "fix: run `maxact-card render" in stdout


def test_changed_chart_fails(model: Path) -> None:
    chart = model / "maxact" / "profile.svg"
    chart.write_text(chart.read_text(encoding="utf-8").replace("36,012", "36,013"), encoding="utf-8")
    code, stdout, _ = validate(str(model))
    assert code == 1 and statuses(stdout)["chart"] == "FAIL"


@pytest.mark.parametrize("new_weights", [b"tiny weights, version 2", b"retrained, and longer than before"])
def test_stale_weight_hashes_fail(model: Path, new_weights: bytes) -> None:
    (model / "model.safetensors").write_bytes(new_weights)
    code, stdout, _ = validate(str(model))
    assert code == 1
    assert statuses(stdout)["weights"] == "FAIL"
    assert "stale results: model.safetensors" in stdout and "re-run `maxact-card measure`" in stdout


def test_missing_weight_file_fails_and_no_weights_at_all_skips(model: Path) -> None:
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    code, stdout, _ = validate(str(model))
    assert code == 1 and "model.safetensors is missing" in stdout
    (model / "model-00001-of-00002.safetensors").unlink()
    code, stdout, _ = validate(str(model))
    assert code == 0 and statuses(stdout)["weights"] == "SKIP"


def test_missing_section_fails(model: Path) -> None:
    (model / "README.md").write_bytes((CARDS / "non_ascii.md").read_bytes())
    code, stdout, _ = validate(str(model))
    assert code == 1
    found = statuses(stdout)
    assert found["section"] == "FAIL" and found["front-matter"] == "FAIL" and found["section-text"] == "SKIP"
    assert "the card has no maxact section; fix: run `maxact-card render maxact/results.json --card" in stdout


def test_schema_invalid_results_fail(model: Path) -> None:
    path = model / "maxact" / "results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    results["global"]["max_abs"] = -5
    path.write_text(json.dumps(results), encoding="utf-8")
    code, stdout, _ = validate(str(model))
    assert code == 1
    found = statuses(stdout)
    assert found["results"] == "FAIL"
    assert "maxact/results.json::$.global.max_abs:" in stdout
    assert [found[name] for name in CHECKS[2:]] == ["SKIP"] * 4


@pytest.mark.parametrize("explicit", [False, True])
def test_results_of_schema_version_1_fail_with_the_rerun_line(
    model: Path, tmp_path: Path, explicit: bool
) -> None:
    """validate reports bad results as a failed check (exit 1), in the words every other command uses."""
    path = model / "maxact" / "results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    results["schema_version"] = 1
    if explicit:
        path = tmp_path / "v1.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    code, stdout, stderr = validate(str(model), *(["--results", str(path)] if explicit else []))
    assert code == 1 and stderr == ""
    found = statuses(stdout)
    assert found["results"] == "FAIL" and [found[name] for name in CHECKS[2:]] == ["SKIP"] * 4
    name = str(path) if explicit else "maxact/results.json"
    assert (
        f"FAIL  results       {name}::$.schema_version: schema version 1 is older than 2; "
        "fix: re-run `maxact-card measure` to write a valid results file"
    ) in stdout.splitlines()


def test_missing_results_fail_but_missing_explicit_results_is_bad_input(model: Path) -> None:
    (model / "maxact" / "results.json").unlink()
    code, stdout, _ = validate(str(model))
    assert code == 1 and statuses(stdout)["results"] == "FAIL"
    code, _, stderr = validate(str(model), "--results", str(model / "nope.json"))
    assert code == 2 and "does not exist" in stderr


def test_explicit_results_file(model: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    (model / "maxact" / "results.json").rename(elsewhere)
    code, stdout, _ = validate(str(model), "--results", str(elsewhere))
    assert code == 0, stdout
    newer = results_for(WEIGHTS)
    newer["global"]["bootstrap"]["p05"] = 35000.0
    elsewhere.write_text(json.dumps(newer), encoding="utf-8")
    code, stdout, _ = validate(str(model), "--results", str(elsewhere))
    assert (
        code == 1
        and statuses(stdout)["section-text"] == "FAIL"
        and statuses(stdout)["front-matter"] == "PASS"
    )


@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("broken_start_only.md", "broken markers"),
        ("broken_end_first.md", "broken markers"),
        ("duplicate.md", "duplicate sections"),
        ("bad_front_matter.md", "unreadable front matter"),
    ],
)
def test_bad_cards_are_bad_input(model: Path, card: str, problem: str) -> None:
    (model / "README.md").write_bytes((CARDS / card).read_bytes())
    code, stdout, stderr = validate(str(model))
    assert code == 2
    assert stdout == ""
    assert stderr.startswith(f"error: {problem}: ")


def test_unreadable_card_is_bad_input(tmp_path: Path) -> None:
    code, _, stderr = validate(str(tmp_path))
    assert code == 2 and "unreadable card: no README.md" in stderr
    (tmp_path / "README.md").write_bytes(b"\xff\xfe not utf-8")
    code, _, stderr = validate(str(tmp_path))
    assert code == 2 and "not UTF-8" in stderr
    code, _, stderr = validate(str(tmp_path / "no" / "such" / "dir"))
    assert code == 2 and "neither a local file or folder nor a Hub repo id" in stderr


def test_json_and_markdown_reports(model: Path) -> None:
    code, report = json_report(model)
    assert code == 0 and report["ok"] is True
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert report["counts"] == {"pass": 6, "fail": 0, "skip": 0}
    (model / "maxact" / "profile.svg").unlink()
    code, report = json_report(model)
    assert code == 1 and report["ok"] is False
    chart = next(c for c in report["checks"] if c["name"] == "chart")
    assert chart["status"] == "fail" and chart["fix"]
    code, stdout, _ = validate(str(model), "--format", "markdown")
    assert code == 1 and "| chart | ❌ fail |" in stdout


def test_core_report_without_cli(model: Path) -> None:
    report = validate_card(LocalSource(model / "README.md"))
    assert report.ok and [c.name for c in report.checks] == CHECKS


def test_card_rendered_with_other_paths_validates(tmp_path: Path) -> None:
    """The `maxact:` summary records where the results and chart are; validate follows it."""
    folder = tmp_path / "m"
    (folder / "runs").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    results_file = folder / "runs" / "r1.json"
    results_file.write_text(json.dumps(results_for(WEIGHTS)), encoding="utf-8")
    result = runner.invoke(
        app,
        ["render", str(results_file), "--card", str(folder), "--chart-out", str(folder / "img" / "p.svg")],
    )
    assert result.exit_code == 0, result.output
    assert "](img/p.svg)" in (folder / "README.md").read_text(encoding="utf-8")
    code, stdout, _ = validate(str(folder))
    assert code == 0, stdout


# --- Hub repos, through maxact_card.hub against the local test Hub server -----------------------
hub_server_module = pytest.importorskip("tests.hub_server", reason="the local Hub test server is not there")
hub_module = pytest.importorskip("maxact_card.hub", reason="maxact_card.hub is not written yet")
hub_server = hub_server_module.hub_server  # the fixture


@pytest.fixture
def hub_repo(hub_server: Any, tmp_path: Path) -> tuple[Any, str]:
    repo = "org/tiny-card"
    commit = hub_server.create_repo(repo, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    results = results_for(WEIGHTS, commit=commit)
    card = splice_card((CARDS / "big_front_matter.md").read_text(encoding="utf-8"), results)
    hub_server.commit(
        repo,
        {
            "README.md": card.encode("utf-8"),
            "maxact/results.json": json.dumps(results).encode("utf-8"),
            "maxact/profile.svg": render_chart(results).encode("utf-8"),
        },
        message="add maxact section",
    )
    return hub_server, repo


def test_hub_repo_passes_and_notes_the_moved_commit(hub_repo: tuple[Any, str]) -> None:
    _, repo = hub_repo
    code, report = json_report(repo)
    assert code == 0, report
    weights = next(c for c in report["checks"] if c["name"] == "weights")
    assert weights["status"] == "pass" and "without touching the weights" in weights["message"]


def test_hub_repo_with_new_weights_fails(hub_repo: tuple[Any, str]) -> None:
    server, repo = hub_repo
    server.commit(repo, {"model.safetensors": b"retrained weights"}, message="retrain")
    code, report = json_report(repo)
    assert code == 1
    weights = next(c for c in report["checks"] if c["name"] == "weights")
    assert weights["status"] == "fail" and "stale results" in weights["message"]
    assert "measured at commit" in weights["message"]


def test_hub_repo_missing_chart_and_revision(hub_repo: tuple[Any, str]) -> None:
    server, repo = hub_repo
    server.commit(repo, delete=["maxact/profile.svg"], revision="no-chart", message="drop chart")
    code, report = json_report(repo, "--revision", "no-chart")
    assert code == 1
    assert next(c for c in report["checks"] if c["name"] == "chart")["status"] == "fail"
    assert json_report(repo, "--revision", "main")[0] == 0


def test_hub_repo_without_card_is_bad_input(hub_server: Any) -> None:
    hub_server.create_repo("org/no-card", {"model.safetensors": WEIGHTS})
    code, _, stderr = validate("org/no-card")
    assert code == 2 and "unreadable card" in stderr


def test_results_copy_is_not_mutated() -> None:
    results = results_for(WEIGHTS)
    snapshot = copy.deepcopy(results)
    splice_card(None, results)
    render_chart(results)
    assert results == snapshot
