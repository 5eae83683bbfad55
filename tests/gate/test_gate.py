"""The release gate: each rule passes and fails on crafted results; baselines; the job summary."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import maxact_card
from maxact_card.commands import action_outputs
from maxact_card.documents import validate_results
from maxact_card.errors import EXIT_USAGE, SchemaError, UsageError
from maxact_card.gate.baseline import load_baseline
from maxact_card.gate.diff import peak_growth_pct
from maxact_card.gate.policy import CardRules, Policy, QuantRules
from maxact_card.gate.rules import evaluate
from maxact_card.gate.summary import render_summary
from maxact_card.gate.verdict import CardStatus, RuleOutcome, Verdict
from tests import paths

EXAMPLE = paths.TESTS / "data" / "results_example.json"
PEAK = 36011.5
PEAK_SITE = "blocks.3.hook_resid_post"


# --- crafted results (also used by test_diff and test_action) --------------------------------------


def example() -> dict[str, Any]:
    """A fresh copy of tests/data/results_example.json (peak 36,011.5 at blocks.3.hook_resid_post)."""
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


QUANT_POLICIES = (
    "int8-static-maxabs",
    "int8-static-percentile",
    "int8-static-mse",
    "int8-dynamic-per-token",
    "fp8-e4m3-static",
)


def quant_entry(
    verdict: str, sqnr: float | None = 31.5, site: str = "blocks.1.mlp.hook_post", failing: int = 0
) -> dict[str, Any]:
    return {
        "verdict": verdict,
        "worst_site": site,
        "worst_sqnr_db": sqnr,
        "worst_token_sqnr_p05_db": None if sqnr is None else sqnr - 2.0,
        "failing_sites": failing,
    }


def _site_figures(policy: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A site row that agrees with a summary entry whose worst site it is."""
    sqnr, p05 = entry["worst_sqnr_db"], entry["worst_token_sqnr_p05_db"]
    clip = None if policy == "int8-dynamic-per-token" else 36_011.5
    return {
        "scale": None if clip is None else clip / (448.0 if policy == "fp8-e4m3-static" else 127.0),
        "clip": clip,
        "sqnr_db": sqnr,
        "rel_rmse": None if sqnr is None else 10 ** (-sqnr / 20),
        "rel_mae": None if sqnr is None else 0.6 * 10 ** (-sqnr / 20),
        "clip_rate": None if sqnr is None else 0.0,
        "token_sqnr_median_db": None if p05 is None else p05 + 4.0,
        "token_sqnr_p05_db": p05,
        "token_share_below": 0.0 if entry["verdict"] == "PASS" or p05 is None else 0.25,
        "tokens": 0 if p05 is None else 4_096,
        "verdict": entry["verdict"],
    }


def with_quant(
    results: dict[str, Any], recommended: str | None = None, **entries: dict[str, Any]
) -> dict[str, Any]:
    """Add a schema-valid quant block whose summary holds `entries` and a passing entry for every other
    policy; keyword names use underscores for dashes (int8_dynamic_per_token). The sites hold one row
    per worst site, each agreeing with the entries of the policies whose worst site it is; the gate
    reads the summary only. `recommended` is taken as given."""
    named = {name.replace("_", "-"): entry for name, entry in entries.items()}
    policies = {name: named.get(name, quant_entry("PASS")) for name in QUANT_POLICIES}
    worst_sites = {entry["worst_site"] for entry in policies.values()}
    by_site = {s["name"]: s for s in results["sites"]}
    site_names = [name for name in by_site if name in worst_sites]  # in results order, as measure writes them
    passing = quant_entry("PASS", 40.0)
    sites = [
        {
            "site": name,
            "component": by_site[name]["component"],
            "layer": by_site[name]["layer"],
            "policies": {
                policy: _site_figures(policy, entry if entry["worst_site"] == name else passing)
                for policy, entry in policies.items()
            },
        }
        for name in site_names
    ]
    peak = next((s for s in sites if s["site"] == results["global"]["site"]), None)
    results["quant"] = {
        "eval_fraction": 0.25,
        "eval_samples": 64,
        "eval_tokens": 40_960,
        "clip_quantile": 0.999,
        "thresholds": {"min_sqnr_db": 20.0, "min_token_sqnr_db": 20.0, "min_token_share": 0.99},
        "wall_time_s": 3.5,
        "sites": sites,
        "policies": policies,
        "recommended": recommended,
        "peak_site": None
        if peak is None
        else {
            "site": peak["site"],
            "policies": {
                policy: {key: figures[key] for key in ("sqnr_db", "token_sqnr_p05_db", "verdict")}
                for policy, figures in peak["policies"].items()
            },
        },
    }
    return results


def scaled_peak(results: dict[str, Any], new_peak: float) -> dict[str, Any]:
    """Move the global peak (its site, component and layer entries) to `new_peak`."""
    results["global"]["max_abs"] = results["global"]["value"] = new_peak
    results["components"]["residual"]["max_abs"] = new_peak
    for site in results["sites"]:
        if site["name"] == PEAK_SITE:
            site["max_abs"] = site["max"] = new_peak
    results["layers"][3]["max_abs"]["residual"] = new_peak
    return results


def policy(**changes: Any) -> Policy:
    """A policy that checks nothing but what `changes` configures (non-finite off unless asked)."""
    base = Policy(name="test", source="test", fail_on_non_finite=False, card=CardRules(fail_on_stale=False))
    return dataclasses.replace(base, **changes)


def only(verdict: Verdict) -> RuleOutcome:
    assert len(verdict.rules) == 1, verdict.rules
    return verdict.rules[0]


def test_the_example_is_valid_results() -> None:
    validate_results(example(), source="example")


def test_crafted_quant_blocks_are_valid_results() -> None:
    validate_results(with_quant(example()), source="crafted")
    crafted = with_quant(
        example(),
        recommended="int8-dynamic-per-token",
        int8_static_maxabs=quant_entry("FAIL", None, PEAK_SITE, failing=3),
        int8_dynamic_per_token=quant_entry("PASS", 28.0),
    )
    validate_results(crafted, source="crafted")
    assert [s["site"] for s in crafted["quant"]["sites"]] == ["blocks.1.mlp.hook_post", PEAK_SITE]
    assert crafted["quant"]["peak_site"]["policies"]["int8-static-maxabs"] == {
        "sqnr_db": None, "token_sqnr_p05_db": None, "verdict": "FAIL",
    }  # fmt: skip


# --- each rule passes and fails --------------------------------------------------------------------


def test_non_finite_rule() -> None:
    results = example()
    ok = only(evaluate(results, policy(fail_on_non_finite=True)))
    assert (ok.rule, ok.passed, ok.measured, ok.limit) == ("non_finite", True, 0, 0)
    results["sites"][6]["non_finite"] = {"elements": 3, "tokens": 1}  # blocks.1.hook_resid_post
    results["sites"][11]["non_finite"] = {"elements": 7, "tokens": 2}  # blocks.2.hook_resid_post
    bad = only(evaluate(results, policy(fail_on_non_finite=True)))
    assert (bad.passed, bad.measured, bad.limit, bad.site) == (False, 10, 0, "blocks.2.hook_resid_post")
    assert "10 NaN/inf values in 2 sites" in bad.message and "bfloat16" in bad.message
    assert evaluate(results, policy(fail_on_non_finite=False)).rules == ()


def test_global_limit_rule() -> None:
    ok = only(evaluate(example(), policy(global_max_abs=40000.0)))
    assert (ok.rule, ok.passed, ok.measured, ok.limit, ok.site) == (
        "limits.global_max_abs",
        True,
        PEAK,
        40000.0,
        PEAK_SITE,
    )
    bad = only(evaluate(example(), policy(global_max_abs=30000.0)))
    assert (bad.passed, bad.measured, bad.limit, bad.site) == (False, PEAK, 30000.0, PEAK_SITE)
    assert bad.message == "global max|a| 36,012 at blocks.3.hook_resid_post exceeds the limit 30,000"
    assert only(evaluate(example(), policy(global_max_abs=PEAK))).passed  # the limit itself passes


def test_global_limit_message_is_exact_when_rounding_would_hide_the_difference() -> None:
    bad = only(evaluate(scaled_peak(example(), 36011.875), policy(global_max_abs=36011.625)))
    assert not bad.passed
    assert "36,011.875 at blocks.3.hook_resid_post exceeds the limit 36,011.625" in bad.message


def test_component_limit_rule() -> None:
    limits = (("attention", 100.0), ("mlp", 1000.0), ("router", 1.0))
    verdict = evaluate(example(), policy(component_max_abs=limits))
    attention, mlp, router = verdict.rules
    assert (attention.rule, attention.passed, attention.measured, attention.site) == (
        "limits.components.attention",
        True,
        11.0,
        "blocks.3.hook_attn_out",
    )
    assert (mlp.rule, mlp.passed, mlp.measured, mlp.limit, mlp.site) == (
        "limits.components.mlp",
        False,
        8832.0,
        1000.0,
        "blocks.1.hook_mlp_out",
    )
    assert "mlp max|a| 8,832 at blocks.1.hook_mlp_out exceeds the limit 1,000" == mlp.message
    assert router.passed and router.skipped and "no router sites" in router.message  # a dense model
    assert not verdict.passed and [r.rule for r in verdict.failed] == ["limits.components.mlp"]


def test_quant_require_pass_rule() -> None:
    rules = QuantRules(require_pass=("int8-static-maxabs", "int8-dynamic-per-token"))
    results = with_quant(
        example(),
        int8_static_maxabs=quant_entry("FAIL", 4.5, PEAK_SITE, failing=3),
        int8_dynamic_per_token=quant_entry("PASS"),
    )
    static, dynamic = evaluate(results, policy(quant=rules)).rules
    assert (static.rule, static.passed, static.measured, static.limit, static.site) == (
        "quant.require_pass.int8-static-maxabs",
        False,
        "FAIL",
        "PASS",
        PEAK_SITE,
    )
    assert "worst SQNR 4.5 dB" in static.message and "3 failing sites" in static.message
    assert (dynamic.rule, dynamic.passed, dynamic.measured) == (
        "quant.require_pass.int8-dynamic-per-token",
        True,
        "PASS",
    )


def test_quant_min_sqnr_rule() -> None:
    results = with_quant(example(), int8_dynamic_per_token=quant_entry("PASS", 28.0))
    rules = QuantRules(require_pass=("int8-dynamic-per-token",), min_sqnr_db=30.0)
    verdict_rule, sqnr = evaluate(results, policy(quant=rules)).rules
    assert verdict_rule.passed
    assert (sqnr.rule, sqnr.passed, sqnr.measured, sqnr.limit, sqnr.site) == (
        "quant.min_sqnr_db.int8-dynamic-per-token",
        False,
        28.0,
        30.0,
        "blocks.1.mlp.hook_post",
    )
    assert "28 dB" in sqnr.message and "below 30 dB" in sqnr.message
    rules = dataclasses.replace(rules, min_sqnr_db=25.0)
    assert evaluate(results, policy(quant=rules)).passed
    results["quant"]["policies"]["int8-dynamic-per-token"]["worst_sqnr_db"] = None
    assert not evaluate(results, policy(quant=rules)).passed  # no number: cannot show the minimum is met


def test_quant_require_any_pass_rule() -> None:
    rules = QuantRules(require_any_pass=("int8-static-maxabs", "int8-static-mse"), min_sqnr_db=20.0)
    results = with_quant(
        example(),
        int8_static_maxabs=quant_entry("FAIL", 4.5, PEAK_SITE),
        int8_static_mse=quant_entry("PASS", 25.0),
    )
    ok = only(evaluate(results, policy(quant=rules)))
    assert (ok.rule, ok.passed, ok.measured, ok.limit) == (
        "quant.require_any_pass",
        True,
        "int8-static-mse",
        "any of int8-static-maxabs, int8-static-mse",
    )
    results["quant"]["policies"]["int8-static-mse"]["worst_sqnr_db"] = 15.0  # PASS, but below the floor
    bad = only(evaluate(results, policy(quant=rules)))
    assert (bad.passed, bad.measured) == (False, "none")
    assert "none of int8-static-maxabs, int8-static-mse passes with worst SQNR ≥ 20 dB" == bad.message


@pytest.mark.parametrize("if_missing", ["fail", "skip"])
def test_quant_rules_without_a_quant_block(if_missing: str) -> None:
    rules = QuantRules(
        require_pass=("int8-dynamic-per-token",), require_any_pass=("fp8-e4m3-static",), if_missing=if_missing
    )
    verdict = evaluate(example(), policy(quant=rules))
    assert [r.rule for r in verdict.rules] == [
        "quant.require_pass.int8-dynamic-per-token",
        "quant.require_any_pass",
    ]
    assert all("no quant block" in r.message for r in verdict.rules)
    if if_missing == "fail":
        assert not verdict.passed and all("--quant" in r.message for r in verdict.failed)
    else:
        assert verdict.passed and all(r.skipped for r in verdict.rules)


def test_quant_block_without_the_named_policy() -> None:
    results = with_quant(example(), int8_static_maxabs=quant_entry("PASS"))
    # the schema requires every policy; a hand-edited block without one still gets a clear rule
    del results["quant"]["policies"]["fp8-e4m3-static"]
    rule = only(evaluate(results, policy(quant=QuantRules(require_pass=("fp8-e4m3-static",)))))
    assert not rule.passed and "no verdict for fp8-e4m3-static in the quant block" in rule.message


def test_baseline_growth_rule() -> None:
    baseline = scaled_peak(example(), 30000.0)
    grown = only(evaluate(example(), policy(max_peak_growth_pct=10.0), baseline=baseline))
    growth = (PEAK - 30000.0) / 30000.0 * 100
    assert (grown.rule, grown.passed, grown.measured, grown.limit, grown.site) == (
        "baseline.max_peak_growth_pct",
        False,
        pytest.approx(growth),
        10.0,
        PEAK_SITE,
    )
    assert (
        "peak grew +20.0%" in grown.message
        and "30,000 at blocks.3.hook_resid_post (example-org/tiny-llama@main)" in grown.message
    )
    ok = only(evaluate(example(), policy(max_peak_growth_pct=25.0), baseline=baseline))
    assert ok.passed and ok.measured == pytest.approx(growth)
    shrunk = only(
        evaluate(scaled_peak(example(), 100.0), policy(max_peak_growth_pct=0.0), baseline=example())
    )
    assert shrunk.passed and shrunk.measured < 0  # a smaller peak is never a failure
    skipped = only(evaluate(example(), policy(max_peak_growth_pct=25.0)))
    assert skipped.passed and skipped.skipped and "no baseline given" in skipped.message


def test_peak_growth_pct() -> None:
    assert peak_growth_pct(100.0, 125.0) == 25.0
    assert peak_growth_pct(0.0, 0.0) == 0.0
    assert peak_growth_pct(0.0, 1.0) is None


def test_baseline_growth_from_zero_fails_without_an_infinite_number() -> None:
    rule = only(evaluate(example(), policy(max_peak_growth_pct=25.0), baseline=scaled_peak(example(), 0.0)))
    assert not rule.passed and rule.measured is None
    json.dumps(rule.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("card", "passed", "skipped", "measured"),
    [
        (None, False, False, "not checked"),
        (CardStatus(present=False), False, False, "missing"),
        (CardStatus(present=True, stale=True), True, False, "present"),
    ],
)
def test_card_require_section_rule(
    card: CardStatus | None, passed: bool, skipped: bool, measured: str
) -> None:
    rule = only(
        evaluate(example(), policy(card=CardRules(require_section=True, fail_on_stale=False)), card=card)
    )
    assert (rule.rule, rule.passed, rule.skipped, rule.measured, rule.limit) == (
        "card.require_section",
        passed,
        skipped,
        measured,
        "present",
    )


@pytest.mark.parametrize(
    ("card", "passed", "skipped"),
    [
        (None, True, True),
        (CardStatus(present=False), True, True),
        (CardStatus(present=True, stale=None), True, True),
        (CardStatus(present=True, stale=False), True, False),
        (CardStatus(present=True, stale=True), False, False),
    ],
)
def test_card_stale_rule(card: CardStatus | None, passed: bool, skipped: bool) -> None:
    rule = only(
        evaluate(example(), policy(card=CardRules(require_section=False, fail_on_stale=True)), card=card)
    )
    assert (rule.rule, rule.passed, rule.skipped) == ("card.fail_on_stale", passed, skipped)
    if not passed:
        assert (rule.measured, rule.limit) == ("stale", "up to date") and "re-render" in rule.message


# --- the default policy ----------------------------------------------------------------------------


def test_default_policy_passes_the_example_and_reports_what_it_skipped() -> None:
    verdict = evaluate(example())
    assert verdict.passed and verdict.policy == "default"
    assert [(r.rule, r.skipped) for r in verdict.rules] == [
        ("non_finite", False),
        ("limits.global_max_abs", False),
        ("quant.require_pass.int8-dynamic-per-token", True),  # no quant block: report-only
        ("baseline.max_peak_growth_pct", True),  # no baseline given
        ("card.fail_on_stale", True),  # no card checked
    ]


def test_default_policy_fails_above_the_float16_maximum() -> None:
    verdict = evaluate(scaled_peak(example(), 70000.0))
    assert [r.rule for r in verdict.failed] == ["limits.global_max_abs"]
    assert "exceeds the limit 65,504 (the float16 maximum)" in verdict.failed[0].message


def test_default_policy_requires_int8_dynamic_per_token_when_quant_was_measured() -> None:
    results = with_quant(
        example(),
        int8_static_maxabs=quant_entry("FAIL", 3.0, PEAK_SITE),  # static failing alone is not a gate
        int8_dynamic_per_token=quant_entry("PASS"),
    )
    assert evaluate(results).passed
    results["quant"]["policies"]["int8-dynamic-per-token"]["verdict"] = "FAIL"
    assert [r.rule for r in evaluate(results).failed] == ["quant.require_pass.int8-dynamic-per-token"]


def test_default_policy_growth_and_card_and_non_finite() -> None:
    assert evaluate(example(), baseline=scaled_peak(example(), PEAK / 1.25)).passed  # exactly +25 %
    grown = evaluate(example(), baseline=scaled_peak(example(), 28000.0))
    assert [r.rule for r in grown.failed] == ["baseline.max_peak_growth_pct"]
    stale = evaluate(example(), card=CardStatus(present=True, stale=True))
    assert [r.rule for r in stale.failed] == ["card.fail_on_stale"]
    assert evaluate(example(), card=CardStatus(present=False)).passed  # a missing section is not a failure
    broken = example()
    broken["sites"][0]["non_finite"] = {"elements": 1, "tokens": 1}
    assert [r.rule for r in evaluate(broken).failed] == ["non_finite"]


# --- the verdict -----------------------------------------------------------------------------------


def test_every_failed_rule_carries_measured_limit_and_site() -> None:
    strict = Policy(
        name="strict",
        global_max_abs=1.0,
        component_max_abs=(("mlp", 1.0),),
        quant=QuantRules(require_pass=("int8-static-maxabs",), min_sqnr_db=40.0),
    )
    results = with_quant(example(), int8_static_maxabs=quant_entry("FAIL", 3.0, PEAK_SITE))
    verdict = evaluate(results, strict)
    assert len(verdict.failed) == 4
    for rule in verdict.failed:
        assert rule.measured is not None and rule.limit is not None and rule.site and rule.message


def test_verdict_to_dict_round_trips_and_is_strict_json() -> None:
    verdict = evaluate(scaled_peak(example(), 70000.0), baseline=example(), card=CardStatus(True, True))
    doc = verdict.to_dict()
    assert doc["verdict"] == "FAIL" and doc["passed"] is False and doc["policy"] == "default"
    assert doc["failed"] == ["limits.global_max_abs", "baseline.max_peak_growth_pct", "card.fail_on_stale"]
    assert set(doc["rules"][0]) == {"rule", "passed", "skipped", "measured", "limit", "site", "message"}
    text = json.dumps(doc, allow_nan=False)
    assert Verdict.from_dict(json.loads(text)) == verdict


# --- baselines -------------------------------------------------------------------------------------


def test_baseline_from_a_results_file(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps(scaled_peak(example(), 20000.0)), encoding="utf-8")
    baseline = load_baseline(str(path), None)
    assert baseline["global"]["max_abs"] == 20000.0
    verdict = evaluate(example(), baseline=baseline)
    assert [r.rule for r in verdict.failed] == ["baseline.max_peak_growth_pct"]
    assert verdict.failed[0].measured == pytest.approx(80.0575)


def test_baseline_file_must_be_valid_results(tmp_path: Path) -> None:
    bad = example()
    del bad["global"]["site"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(SchemaError) as info:
        load_baseline(str(path), None)
    assert info.value.message == f"{path}::$.global: 'site' is a required property"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_baseline(str(path), None)


@pytest.mark.parametrize("spec", ["missing.json", "not a repo id", "a/b/c"])
def test_baseline_that_is_neither_file_nor_repo(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        load_baseline(spec, None)
    assert info.value.exit_code == EXIT_USAGE
    assert "neither an existing results file nor a Hub repo id" in info.value.message


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """A stand-in for maxact_card.hub that serves one repo; records the calls."""
    calls: list[tuple[Any, ...]] = []
    files = {("org/model", "v1"): json.dumps(scaled_peak(example(), 30000.0)).encode()}

    def read_repo_file(repo_id: str, path: str, revision: str | None, token: str | None) -> bytes | None:
        calls.append((repo_id, path, revision, token))
        return files.get((repo_id, revision))

    module = types.ModuleType("maxact_card.hub")
    module.read_repo_file = read_repo_file  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "maxact_card.hub", module)
    monkeypatch.setattr(maxact_card, "hub", module, raising=False)
    return calls


def test_baseline_from_the_hub_reads_maxact_results(fake_hub: list[tuple[Any, ...]]) -> None:
    baseline = load_baseline("org/model@v1", "hf_secret")
    assert fake_hub == [("org/model", "maxact/results.json", "v1", "hf_secret")]
    assert baseline["global"]["max_abs"] == 30000.0
    with pytest.raises(UsageError) as info:
        load_baseline("org/model", None)
    assert fake_hub[-1] == ("org/model", "maxact/results.json", None, None)
    assert info.value.message == "baseline org/model has no maxact/results.json"
    assert "publish" in (info.value.hint or "")


def test_baseline_from_the_local_hub_server(hub_server: Any) -> None:
    old = scaled_peak(example(), 25000.0)
    hub_server.create_repo(
        "org/model", files={"maxact/results.json": json.dumps(old).encode(), "README.md": b"# m\n"}
    )
    hub_server.create_tag("org/model", "v1")
    hub_server.commit("org/model", {"maxact/results.json": json.dumps(example()).encode()})
    baseline = load_baseline("org/model@v1", None)
    assert baseline["global"]["max_abs"] == 25000.0
    assert load_baseline("org/model", None)["global"]["max_abs"] == PEAK  # main moved on
    verdict = evaluate(example(), baseline=baseline)
    assert [r.rule for r in verdict.failed] == ["baseline.max_peak_growth_pct"]
    hub_server.create_repo("org/empty", files={"README.md": b"# e\n"})
    with pytest.raises(UsageError, match=r"baseline org/empty@main has no maxact/results.json"):
        load_baseline("org/empty@main", None)


# --- the job summary -------------------------------------------------------------------------------


def test_render_summary_passing() -> None:
    results = with_quant(
        example(),
        recommended="int8-dynamic-per-token",
        int8_static_maxabs=quant_entry("FAIL", 3.25, PEAK_SITE, failing=4),
        int8_dynamic_per_token=quant_entry("PASS"),
    )
    text = render_summary(results, evaluate(results), section="## Maximum activations\n\nThe peak is 36,012.")
    assert text.startswith("## maxact-card release gate: ✅ PASS\n")
    assert (
        "| `example-org/tiny-llama` | main (`aaaaaaa`) | 36,012 | `blocks.3.hook_resid_post` (residual, layer 3) | **PASS** |"
        in text
    )
    assert "All rules passed." in text and "### Failed rules" not in text
    assert "| `int8-static-maxabs` | FAIL | 3.25 dB | 1.25 dB | `blocks.3.hook_resid_post` | 4 |" in text
    assert "Recommended: `int8-dynamic-per-token`" in text
    assert (
        "<details><summary>Model card section preview</summary>\n\n## Maximum activations\n\nThe peak is 36,012.\n\n</details>"
        in text
    )
    assert "183,424 tokens" in text


def test_render_summary_failing_lists_each_failed_rule() -> None:
    results = scaled_peak(example(), 70000.0)
    text = render_summary(results, evaluate(results, baseline=example()))
    assert text.startswith("## maxact-card release gate: ❌ FAIL\n")
    failed = text.split("### Failed rules", 1)[1].split("<details>", 1)[0]
    assert (
        "| `limits.global_max_abs` | 70,000 | 65,504 | `blocks.3.hook_resid_post` | "
        "global max\\|a\\| 70,000 at blocks.3.hook_resid_post exceeds the limit 65,504 (the float16 maximum) |"
    ) in failed
    assert "| `baseline.max_peak_growth_pct` | 94.4% | 25.0% | `blocks.3.hook_resid_post` |" in failed
    assert "### Quantization verdicts" not in text  # no quant block
    assert "Model card section preview" not in text  # no section


# --- the action's post-processing (python -m maxact_card.commands.action_outputs) ---------------------------


def _run_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: Any, results: Any, *extra: str
) -> tuple[dict[str, str], str, str]:
    out, summary = tmp_path / "out", tmp_path / "summary"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    check_path, results_path = tmp_path / "check.json", tmp_path / "results.json"
    if check is not None:
        check_path.write_text(check if isinstance(check, str) else json.dumps(check), encoding="utf-8")
    if results is not None:
        results_path.write_text(json.dumps(results), encoding="utf-8")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert action_outputs.main([str(results_path), str(check_path), *extra]) == 0
    return (
        parse_github_output(out.read_text(encoding="utf-8")),
        summary.read_text(encoding="utf-8"),
        stdout.getvalue(),
    )


def parse_github_output(text: str) -> dict[str, str]:
    """Parse a $GITHUB_OUTPUT file (``name=value`` and ``name<<DELIM`` forms), as the runner does."""
    outputs: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            value = []
            for body in lines:
                if body == delimiter:
                    break
                value.append(body)
            outputs[name] = "\n".join(value)
        elif "=" in line:
            name, value_text = line.split("=", 1)
            outputs[name] = value_text
    return outputs


def test_action_outputs_for_a_failed_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = scaled_peak(example(), 70000.0)
    verdict = evaluate(results)
    check = {
        "results_path": str(tmp_path / "results.json"),
        "verdict": verdict.to_dict(),
        "pr_url": "https://hf.co/org/m/discussions/3",
    }
    outputs, summary, stdout = _run_outputs(tmp_path, monkeypatch, check, results)
    assert outputs == {
        "verdict": "FAIL",
        "global-max": "70000.0",
        "peak-site": PEAK_SITE,
        "results-path": str((tmp_path / "results.json").resolve()),
        "pr-url": "https://hf.co/org/m/discussions/3",
    }
    assert summary == render_summary(results, verdict)
    assert stdout.splitlines() == [
        (
            "maxact-card check: FAIL (1 of 5 rules failed); global max|a| 70000.0 at blocks.3.hook_resid_post; "
            f"results in {(tmp_path / 'results.json').resolve()}"
        ),
        (
            "::error title=maxact-card%3A limits.global_max_abs::global max|a| 70,000 at blocks.3.hook_resid_post "
            "exceeds the limit 65,504 (the float16 maximum) (measured 70,000, limit 65,504 at blocks.3.hook_resid_post)"
        ),
    ]


def test_action_outputs_accepts_a_bare_verdict_and_a_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = tmp_path / "section.md"
    section.write_text("## Max activations\n", encoding="utf-8")
    outputs, summary, stdout = _run_outputs(
        tmp_path, monkeypatch, evaluate(example()).to_dict(), example(), "--section", str(section)
    )
    assert outputs["verdict"] == "PASS" and outputs["global-max"] == "36011.5" and outputs["pr-url"] == ""
    assert "## Max activations" in summary
    assert stdout.startswith("maxact-card check: PASS (0 of 5 rules failed)") and "::error" not in stdout


@pytest.mark.parametrize("check", [None, "", "not json", {"unexpected": 1}])
def test_action_outputs_without_a_verdict_reports_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: Any
) -> None:
    outputs, summary, stdout = _run_outputs(tmp_path, monkeypatch, check, None, "--exit-code", "2")
    assert outputs == {
        "verdict": "ERROR",
        "global-max": "",
        "peak-site": "",
        "results-path": "",
        "pr-url": "",
    }
    assert summary.startswith("## maxact-card release gate: ⚠️ ERROR") and "exit code 2" in summary
    assert stdout.startswith(
        "::error title=maxact-card check::maxact-card check failed before producing a verdict (exit code 2)"
    )


def test_workflow_command_escaping() -> None:
    assert action_outputs.escape_data("50% a\nb\r") == "50%25 a%0Ab%0D"
    assert action_outputs.escape_property("a: b, c") == "a%3A b%2C c"
    verdict = Verdict(False, (RuleOutcome("r", False, 1.0, 0.5, None, "two\nlines"),))
    assert action_outputs.annotation_lines(verdict, 1) == [
        "::error title=maxact-card%3A r::two%0Alines (measured 1, limit 0.5)"
    ]


@pytest.mark.parametrize("hostile", ["\n::warning::pwned", "\r\n::add-mask::secret", "\u2028::error::x", "%0A::debug::y"])
def test_action_outputs_keep_a_hostile_site_inside_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: str
) -> None:
    """A site name (model-controlled) with a line break cannot start a workflow command of its own."""
    results = scaled_peak(example(), 70000.0)
    site = PEAK_SITE + hostile
    results["global"]["site"] = site
    verdict = evaluate(results)
    outputs, _, stdout = _run_outputs(tmp_path, monkeypatch, verdict.to_dict(), results)
    assert outputs["verdict"] == "FAIL"
    lines = stdout.rstrip("\n").split("\n")  # the runner reads a command per line ending in \n
    assert lines[0].startswith("maxact-card check: FAIL") and all(line.startswith("::error ") for line in lines[1:])
    assert len(lines) == 1 + len(verdict.failed)
