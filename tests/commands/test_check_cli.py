"""`maxact-card check` through the CLI runner on a tiny Llama: every exit code, every output, card and baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.card.validate import LocalSource, validate_card
from maxact_card.cli import app
from maxact_card.errors import RuntimeFailure
from maxact_card.gate.summary import format_value
from maxact_card.measure.results import load_results
from tests import factory
from tests.hub_server import HubServer, tiny_llama_files

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Activations peak in the residual stream at a few channels.",
    "1234567890 + - * / = ( ) [ ] { } < > , . ; : ! ?",
    "Über naïve café — 東京 مرحبا Привет 🙂",
    "The lazy dog sleeps in the stream.",
    "A cat sat on the mat and looked at the dog.",
    "Numbers like 3.14159 and 2.71828 appear in text.",
    "Hello world, this is a short test sentence.",
]
PERMISSIVE = {"schema_version": 1, "name": "permissive", "limits": {"global_max_abs": 1e6}}
FAILING = {"schema_version": 1, "name": "strict", "limits": {"global_max_abs": 1e-6}}


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint, a 9-text corpus and two policies, written once."""
    root = tmp_path_factory.mktemp("check")
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8"
    )
    policies = {}
    for name, doc in (("permissive", PERMISSIVE), ("failing", FAILING)):
        policies[name] = root / f"{name}.json"
        policies[name].write_text(json.dumps(doc), encoding="utf-8")
    return {"model": factory.save("llama", root / "tiny-llama"), "corpus": corpus, **policies}


def invoke(shelf: dict[str, Path], *args: str | Path) -> Any:
    base = ["check", str(shelf["model"]), "--corpus", str(shelf["corpus"]), "--device", "cpu"]
    return CliRunner().invoke(app, base + [str(a) for a in args])


@pytest.fixture(scope="module")
def passed(shelf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One passing run (permissive policy, text output) whose results the other tests reuse."""
    out = tmp_path_factory.mktemp("passed") / "results.json"
    return invoke(shelf, "--policy", shelf["permissive"], "--out", out), out


def test_pass_exits_0_with_valid_results_and_a_quant_block(passed: tuple[Any, Path]) -> None:
    res, out = passed
    assert res.exit_code == 0, res.stderr
    results = load_results(out)  # validates against the schema
    assert results["quant"]["policies"]  # the INT8/FP8 check is on by default
    assert "release gate (policy permissive)" in res.stdout
    assert "verdict: PASS (0 of 3 rules failed, policy permissive)" in res.stdout
    assert "per component" in res.stdout  # measure's summary tables come first
    assert f"results written to {out}" in res.stderr


def test_failing_policy_exits_1_and_names_the_rule(shelf: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = invoke(shelf, "--policy", shelf["failing"], "--out", out, "--no-quant")
    assert res.exit_code == 1, res.stderr
    peak = load_results(out)["global"]
    measured = format_value("limits.global_max_abs", peak["max_abs"])
    assert "verdict: FAIL (1 of 3 rules failed, policy strict)" in res.stdout
    assert (
        f"FAIL limits.global_max_abs: measured {measured}, limit 1.0×10^-6 at {peak['site']}: " in res.stdout
    ), res.stdout
    assert "quant" not in load_results(out)  # --no-quant


def test_failing_policy_json(shelf: dict[str, Path], tmp_path: Path) -> None:
    out, verdict_out = tmp_path / "r.json", tmp_path / "verdict.json"
    res = invoke(
        shelf, "--policy", shelf["failing"], "--out", out, "--format", "json", "--verdict-out", verdict_out
    )
    assert res.exit_code == 1, res.stderr
    doc = json.loads(res.stdout)  # stdout carries JSON even when the gate fails
    assert doc["results_path"] == str(out) and doc["pr_url"] is None
    verdict = doc["verdict"]
    assert verdict["verdict"] == "FAIL" and verdict["failed"] == ["limits.global_max_abs"]
    (rule,) = [r for r in verdict["rules"] if r["rule"] == "limits.global_max_abs"]
    peak = load_results(out)["global"]
    assert (rule["measured"], rule["limit"], rule["site"]) == (peak["max_abs"], 1e-6, peak["site"])
    assert json.loads(verdict_out.read_text(encoding="utf-8")) == verdict


def test_baseline_growth_fails(shelf: dict[str, Path], passed: tuple[Any, Path], tmp_path: Path) -> None:
    results = load_results(passed[1])
    results["global"]["max_abs"] /= 2  # the new peak is twice the baseline's: +100% > 25%
    results["global"]["value"] /= 2
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(results), encoding="utf-8")
    res = invoke(shelf, "--baseline", baseline, "--format", "json")  # the default policy
    assert res.exit_code == 1, res.stderr
    verdict = json.loads(res.stdout)["verdict"]
    assert verdict["policy"] == "default" and verdict["failed"] == ["baseline.max_peak_growth_pct"]
    (rule,) = [r for r in verdict["rules"] if r["rule"] == "baseline.max_peak_growth_pct"]
    assert rule["measured"] == pytest.approx(100.0) and rule["limit"] == 25.0
    assert json.loads(res.stdout)["results_path"] is None  # nothing written without --out or --card


def test_card_is_written_and_validates(shelf: dict[str, Path], tmp_path: Path) -> None:
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("# My model\n\nSome words.\n", encoding="utf-8")
    res = invoke(shelf, "--policy", shelf["permissive"], "--card", card, "--format", "markdown")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("## maxact-card release gate: ✅ PASS")
    assert (card.parent / "maxact" / "profile.svg").read_text(encoding="utf-8").rstrip().endswith("</svg>")
    load_results(card.parent / "maxact" / "results.json")
    text = card.read_text(encoding="utf-8")
    assert "Some words." in text and "<!-- maxact-card:start -->" in text
    report = validate_card(LocalSource(card))
    assert report.ok, report.to_dict()
    # the card as given had no section: nothing to be stale (the verdict is never about the card it wrote)
    assert "`card.fail_on_stale` | skipped" in res.stdout
    again = invoke(shelf, "--policy", shelf["permissive"], "--card", card, "--format", "markdown")
    assert again.exit_code == 0 and "`card.fail_on_stale` | pass" in again.stdout, again.stdout


def test_a_stale_card_fails_and_gets_the_fresh_section(shelf: dict[str, Path], tmp_path: Path) -> None:
    """A card whose section came from other weights: FAIL, exit 1, and the fresh section is left in place."""
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("# My model\n", encoding="utf-8")
    assert invoke(shelf, "--policy", shelf["permissive"], "--card", card).exit_code == 0
    linked = card.parent / "maxact" / "results.json"
    other = json.loads(linked.read_text(encoding="utf-8"))
    other["model"]["weight_files"][0]["sha256"] = "0" * 64  # the section now describes other weights
    linked.write_text(json.dumps(other), encoding="utf-8")
    res = invoke(shelf, "--policy", shelf["permissive"], "--card", card)
    assert res.exit_code == 1, res.stdout + res.stderr
    assert "FAIL card.fail_on_stale" in res.stdout
    assert f"the card's maxact section was stale; the fresh one is now in {card}" in res.stderr
    fresh = json.loads(linked.read_text(encoding="utf-8"))
    assert fresh["model"]["weight_files"][0]["sha256"] != "0" * 64
    assert invoke(shelf, "--policy", shelf["permissive"], "--card", card).exit_code == 0  # one commit away


def test_a_card_edited_by_hand_is_stale(shelf: dict[str, Path], tmp_path: Path) -> None:
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("# My model\n", encoding="utf-8")
    assert invoke(shelf, "--policy", shelf["permissive"], "--card", card).exit_code == 0
    text = card.read_text(encoding="utf-8")
    card.write_text(text.replace("**Peak |a| = ", "**Peak |a| = 1"), encoding="utf-8")  # other numbers
    res = invoke(shelf, "--policy", shelf["permissive"], "--card", card)
    assert res.exit_code == 1 and "FAIL card.fail_on_stale" in res.stdout


def test_create_pr_opens_a_pull_request_when_the_gate_passes(
    shelf: dict[str, Path], hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private Hub cache: the shared one must not keep org/tiny for the tests of the hub module.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub_server.create_repo("org/tiny", tiny_llama_files(tmp_path))
    hub_server.add_token("hf_write", "alice", write=True)
    base = ["check", "org/tiny", "--corpus", str(shelf["corpus"]), "--device", "cpu", "--token", "hf_write"]
    strict = CliRunner().invoke(
        app, [*base, "--policy", str(shelf["failing"]), "--create-pr", "--format", "json"]
    )
    assert strict.exit_code == 1, strict.stderr
    assert json.loads(strict.stdout)["pr_url"] is None and "no pull request was opened" in strict.stderr
    res = CliRunner().invoke(
        app, [*base, "--policy", str(shelf["permissive"]), "--create-pr", "--format", "json"]
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["pr_url"].endswith("/org/tiny/discussions/1") and doc["results_path"] is None
    published = json.loads(hub_server.read("org/tiny", "maxact/results.json", "refs/pr/1") or b"null")
    assert published["global"]["max_abs"] > 0
    assert b"<!-- maxact-card:start -->" in (hub_server.read("org/tiny", "README.md", "refs/pr/1") or b"")


def test_schema_invalid_policy_exits_2_before_measuring(
    shelf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("maxact_card.measure.run.measure_run", _must_not_run)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "limits": {"global_max_abs": "big"}}), encoding="utf-8")
    res = invoke(shelf, "--policy", bad)
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith(f"error: {bad}::$.limits.global_max_abs: "), res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "missing.json"], "baseline 'missing.json' is neither an existing results file"),
        (["--create-pr"], "--create-pr needs a Hub repo id org/name"),
        (["--create-pr", "--exports", "smoothquant"],
         "--exports smoothquant needs the input of every Linear layer; add --gemm-inputs"),
        (["--create-pr", "--exports", "outliers,kv-scales", "--gemm-inputs"],
         "--exports kv-scales needs the keys and values of the KV cache; add --kv-cache"),
        (["--exports", "outliers"], "--exports adds files to the --create-pr commit"),
    ],
)
def test_bad_input_exits_2_before_measuring(
    shelf: dict[str, Path], monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setattr("maxact_card.measure.run.measure_run", _must_not_run)
    res = invoke(shelf, *args)
    assert res.exit_code == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_missing_model_exits_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["check", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith("error:")


def test_runtime_failure_exits_3(shelf: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeFailure("the device fell over", hint="try --device cpu")

    monkeypatch.setattr("maxact_card.measure.run.measure_run", broken)
    res = invoke(shelf, "--format", "json")
    assert res.exit_code == 3
    assert res.stderr.strip() == "error: the device fell over; try --device cpu"
    assert res.stdout == ""


def test_help_documents_the_default_policy() -> None:
    res = CliRunner().invoke(app, ["check", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    for needle in (
        "NaN or inf",
        "65504",
        "int8-dynamic-per-token",
        "25%",
        "--no-quant",
        "Exit 0 pass, 1 the gate failed",
    ):
        assert needle in text


def _must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("bad input must fail before the measurement")


@pytest.mark.parametrize("card_text", [
    "# Card\n<!-- maxact-card:start -->\nhalf a section\n",
    "# Card\n<!-- maxact-card:end -->\n",
    "---\nlicense: [unclosed\n---\n# Card\n",
])
def test_a_card_that_cannot_take_the_section_fails_before_measuring(
    shelf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card_text: str
) -> None:
    monkeypatch.setattr("maxact_card.measure.run.measure_run", _must_not_run)
    card = tmp_path / "README.md"
    card.write_text(card_text, encoding="utf-8")
    res = invoke(shelf, "--card", card)
    assert res.exit_code == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "broken markers" in res.stderr or "front matter" in res.stderr
    assert card.read_text(encoding="utf-8") == card_text
    assert not (tmp_path / "maxact").exists()  # nothing written beside it


def test_create_pr_measures_a_tag_and_opens_the_pull_request_against_the_branch(
    shelf: dict[str, Path], hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--revision v1.0` is what is measured; the PR goes to main (or --pr-base), pinned to v1.0's commit."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    sha = hub_server.create_repo("org/tagged", tiny_llama_files(tmp_path))
    hub_server.create_tag("org/tagged", "v1.0")
    hub_server.add_token("hf_write", "alice", write=True)
    base = ["check", "org/tagged", "--revision", "v1.0", "--corpus", str(shelf["corpus"]), "--device", "cpu",
            "--token", "hf_write", "--policy", str(shelf["permissive"]), "--create-pr", "--format", "json"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["pr_url"].endswith("/org/tagged/discussions/1")
    pr = hub_server.repo_state("org/tagged")["pull_requests"][1]
    assert pr["base"] == "main"
    published = json.loads(hub_server.read("org/tagged", "maxact/results.json", "refs/pr/1") or b"null")
    assert published["model"]["revision"] == "v1.0" and published["model"]["commit_sha"] == sha


@pytest.mark.parametrize(("extra", "token", "says"), [
    (["--pr-base", "v1.0"], "hf_write", "'v1.0' in org/tagged is a tag; a pull request can only target a branch"),
    (["--pr-base", "nope"], "hf_write", "'nope' in org/tagged is not a branch"),
    ([], "hf_read", "this token can only read"),
    ([], None, "publishing needs a Hub token with write access"),
])
def test_create_pr_that_cannot_be_published_fails_before_measuring(
    shelf: dict[str, Path], hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    extra: list[str], token: str | None, says: str,
) -> None:
    monkeypatch.setattr("maxact_card.measure.run.measure_run", _must_not_run)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login either
    hub_server.create_repo("org/tagged", tiny_llama_files(tmp_path))
    hub_server.create_tag("org/tagged", "v1.0")
    hub_server.add_token("hf_write", "alice", write=True)
    hub_server.add_token("hf_read", "bob", write=False)
    argv = ["check", "org/tagged", "--device", "cpu", "--create-pr", *extra] + (["--token", token] if token else [])
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.stdout + res.stderr
    assert says in res.stderr and len(res.stderr.splitlines()) == 1
