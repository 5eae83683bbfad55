"""`maxact-card diff`: the core diff on crafted pairs, and the command's three formats (golden files)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.gate.diff import diff_results
from tests import paths
from tests.gate.test_gate import PEAK, PEAK_SITE, example, quant_entry, scaled_peak, with_quant

GOLDEN = paths.TESTS / "golden"
runner = CliRunner()


def old_results() -> dict[str, Any]:
    return with_quant(
        example(),
        recommended="int8-static-maxabs",
        int8_static_maxabs=quant_entry("PASS", 31.0),
        int8_dynamic_per_token=quant_entry("PASS", 40.0),
        fp8_e4m3_static=quant_entry("FAIL", 17.0, PEAK_SITE, failing=1),
    )


def new_results() -> dict[str, Any]:
    """The example after a fine-tune: peak +25 %, layer 0 became massive and layer 1 stopped, a site
    removed and one added, static INT8 max-abs now fails and FP8 now passes."""
    new = scaled_peak(example(), PEAK * 1.25)
    new["model"]["revision"] = "v2"
    new["model"]["commit_sha"] = "b" * 40
    by_name = {s["name"]: s for s in new["sites"]}
    by_name["blocks.0.hook_resid_post"]["max_abs"] = 250.0
    by_name["blocks.1.hook_mlp_out"]["max_abs"] = 8000.0
    new["components"]["mlp"]["max_abs"] = 8000.0
    new["massive"]["layers"] = [0, 2, 3]
    removed = by_name["blocks.3.mlp.hook_post"]
    new["sites"].remove(removed)
    added = json.loads(json.dumps(by_name["blocks.3.hook_attn_out"]))
    added.update(name="blocks.3.hook_attn_in", max_abs=7.5)
    new["sites"].append(added)
    return with_quant(
        new,
        recommended="int8-dynamic-per-token",
        int8_static_maxabs=quant_entry("FAIL", 9.0, PEAK_SITE, failing=2),
        int8_dynamic_per_token=quant_entry("PASS", 38.5),
        fp8_e4m3_static=quant_entry("PASS", 27.0),
    )


# --- the core ----------------------------------------------------------------------------------------


def test_diff_of_identical_results_changes_nothing() -> None:
    diff = diff_results(example(), example())
    assert diff["peak"]["abs_change"] == 0 and diff["peak"]["pct_change"] == 0
    assert diff["site_counts"] == {"changed": 0, "unchanged": 22, "added": 0, "removed": 0}
    assert diff["massive_layers"]["became"] == diff["massive_layers"]["stopped"] == []
    assert diff["notes"] == ["the weights are the same (every weight file's sha256 agrees)"]
    assert diff["same_weights"] and diff["quant"]["policies"] == []


def test_diff_of_a_crafted_pair() -> None:
    diff = diff_results(old_results(), new_results())
    assert diff["peak"] == {
        "old": PEAK,
        "new": PEAK * 1.25,
        "abs_change": PEAK * 0.25,
        "pct_change": pytest.approx(25.0),
        "old_site": PEAK_SITE,
        "new_site": PEAK_SITE,
    }
    assert diff["site_counts"] == {"changed": 3, "unchanged": 18, "added": 1, "removed": 1}
    changed = {s["site"]: s for s in diff["sites"] if s["status"] != "unchanged"}
    assert changed["blocks.0.hook_resid_post"]["pct_change"] == pytest.approx(1900.0)
    assert changed["blocks.1.hook_mlp_out"]["abs_change"] == -832.0
    assert changed["blocks.3.hook_attn_in"] == {
        "site": "blocks.3.hook_attn_in", "component": "attention", "layer": 3, "status": "added",
        "old": None, "new": 7.5, "abs_change": None, "pct_change": None,
    }  # fmt: skip
    assert (
        changed["blocks.3.mlp.hook_post"]["status"] == "removed"
        and changed["blocks.3.mlp.hook_post"]["old"] == 11.0
    )
    assert diff["massive_layers"] == {"old": [1, 2, 3], "new": [0, 2, 3], "became": [0], "stopped": [1]}
    assert [(q["policy"], q["old"], q["new"], q["changed"]) for q in diff["quant"]["policies"]] == [
        ("int8-static-maxabs", "PASS", "FAIL", True),
        ("int8-static-percentile", "PASS", "PASS", False),
        ("int8-static-mse", "PASS", "PASS", False),
        ("int8-dynamic-per-token", "PASS", "PASS", False),
        ("fp8-e4m3-static", "FAIL", "PASS", True),
    ]
    fp8 = diff["quant"]["policies"][-1]
    assert (fp8["old_worst_sqnr_db"], fp8["new_worst_sqnr_db"]) == (17.0, 27.0)
    assert diff["quant"]["recommended"] == {"old": "int8-static-maxabs", "new": "int8-dynamic-per-token"}
    mlp = next(c for c in diff["components"] if c["component"] == "mlp")
    assert (mlp["old"], mlp["new"], mlp["status"]) == (8832.0, 8000.0, "changed")


def test_sites_are_in_model_order_whatever_the_file_order() -> None:
    old, new = old_results(), new_results()
    expected = diff_results(old, new)
    random.Random(0).shuffle(new["sites"])
    random.Random(1).shuffle(old["sites"])
    assert diff_results(old, new) == expected
    names = [s["site"] for s in expected["sites"]]
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    assert names[1:6] == [
        "blocks.0.hook_resid_post",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.mlp.hook_pre",
        "blocks.0.mlp.hook_post",
    ]


def test_diff_notes_when_runs_are_not_alike() -> None:
    new = example()
    new["run"]["dtype"] = "float16"
    new["corpus"]["id"] = "my-corpus"
    assert diff_results(example(), new)["notes"] == [
        "dtype differs: bfloat16 → float16",
        "corpus differs: maxact-builtin-v1 → my-corpus",
        "the weights are the same (every weight file's sha256 agrees): the changes come from the run settings above",
    ]


def test_diff_names_the_sites_asked_for_when_they_differ() -> None:
    """A run with --kv-cache against one without: the added sites come from the option, and the note says so
    (a file from before the option, with no such key, reads as off)."""
    old, new = example(), example()
    old["run"].pop("kv_cache", None)
    new["run"]["kv_cache"] = True
    assert diff_results(old, new)["notes"][0] == "kv_cache differs: False → True"
    assert not any("differs" in n for n in diff_results(old, example())["notes"])


def test_diff_of_the_same_weights_with_another_seed_says_so() -> None:
    """Two runs of the same weights with another --seed: the notes name the setting, not a model change."""
    new = example()
    new["run"]["seed"] = 1
    new["run"]["device"] = "NVIDIA H200"
    diff = diff_results(example(), new)
    assert diff["same_weights"] is True
    assert diff["notes"] == [
        f"seed differs: {example()['run']['seed']} → 1",
        f"device differs: {example()['run']['device']} → NVIDIA H200",
        "the weights are the same (every weight file's sha256 agrees): the changes come from the run settings above",
    ]
    other = example()
    other["model"]["weight_files"][0]["sha256"] = "f" * 64
    other["run"]["seed"] = 1
    assert diff_results(example(), other)["notes"][-1] == (
        "the weights differ, and so do run settings: not all changes are the model's")


def test_diff_from_a_zero_value_has_no_percentage() -> None:
    old = example()
    old["sites"][0]["max_abs"] = 0.0
    site = diff_results(old, example())["sites"][0]
    assert (site["site"], site["abs_change"], site["pct_change"]) == ("hook_embed", 0.25, None)
    json.dumps(diff_results(old, example()), allow_nan=False)


# --- the command -----------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(old_results()), encoding="utf-8")
    new.write_text(json.dumps(new_results()), encoding="utf-8")
    return old, new


def check_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME; MAXACT_UPDATE_GOLDEN=1 rewrites it instead."""
    path = GOLDEN / name
    if os.environ.get("MAXACT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing; run with MAXACT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("fmt", "golden"), [("text", "diff.txt"), ("markdown", "diff.md"), ("json", "diff.json")]
)
def test_diff_command_formats(pair: tuple[Path, Path], fmt: str, golden: str) -> None:
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    check_golden(golden, result.stdout)
    if fmt == "json":
        assert json.loads(result.stdout) == json.loads(json.dumps(diff_results(old_results(), new_results())))


def test_diff_command_of_identical_files(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(example()), encoding="utf-8")
    result = runner.invoke(app, ["diff", str(path), str(path)])
    assert result.exit_code == 0
    check_golden("diff_identical.txt", result.stdout)


def test_diff_format_from_the_environment(pair: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1])], env={"MAXACT_CARD_FORMAT": "json"})
    assert result.exit_code == 0 and json.loads(result.stdout)["diff_version"] == 1


def test_diff_a_failing_gate_is_still_exit_0(tmp_path: Path) -> None:
    """A diff is information: even a peak that doubled exits 0."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(example()), encoding="utf-8")
    new.write_text(json.dumps(scaled_peak(example(), PEAK * 2)), encoding="utf-8")
    result = runner.invoke(app, ["diff", str(old), str(new)])
    assert result.exit_code == 0 and "+100.0%" in result.stdout


def test_diff_rejects_invalid_results_with_their_path(pair: tuple[Path, Path]) -> None:
    bad = json.loads(pair[1].read_text(encoding="utf-8"))
    bad["sites"][2]["max_abs"] = -1.0
    pair[1].write_text(json.dumps(bad), encoding="utf-8")
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1])])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"error: {pair[1]}::$.sites[2].max_abs: -1.0 is less than the minimum of 0"
    )


@pytest.mark.parametrize(("content", "expected"), [(None, "does not exist"), ("{", "is not valid JSON")])
def test_diff_rejects_missing_or_broken_files(
    pair: tuple[Path, Path], tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "other.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = runner.invoke(app, ["diff", str(path), str(pair[1])])
    assert result.exit_code == 2 and expected in result.stderr


def test_diff_rejects_an_unknown_format(pair: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--format", "html"])
    assert result.exit_code == 2
