"""The results schema's quant block: what `measure --quant` writes validates, degenerate figures stay
valid JSON, broken copies fail naming their JSON path, and schema and code agree on every name and range."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from maxact_card import quant as quant_mod
from maxact_card.cli import app
from maxact_card.documents import RESULTS_SCHEMA, dumps, load_results, validate_results, write_results
from maxact_card.errors import SchemaError
from maxact_card.measure.stats import HIST_BINS
from maxact_card.quant.heldout import QuantAccumulator, summarize
from maxact_card.quant.schemes import POLICY_ORDER, Thresholds, static_scales
from maxact_card.resources import load_schema
from tests import factory
from tests.card.test_card import QUANT, load_example, with_quant

SCHEMA = load_schema(RESULTS_SCHEMA)
DEFS = SCHEMA["$defs"]
POLICY_NAMES = [p.value for p in POLICY_ORDER]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama measured through the CLI with the INT8/FP8 check at every site."""
    root = tmp_path_factory.mktemp("quant-schema")
    checkpoint = factory.save("llama", root / "ckpt")
    corpus = factory.write_corpus(root / "corpus.jsonl")
    out = root / "r.json"
    args = ["measure", str(checkpoint), "--corpus", str(corpus), "--quant", "--quant-sites", "all"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    return load_results(out)  # validates


# --- what the code writes validates ------------------------------------------------------------------


def test_a_measured_quant_block_validates(measured: dict[str, Any]) -> None:
    quant = measured["quant"]
    assert sorted(quant) == sorted(DEFS["quant"]["required"])  # every key written, none the schema lacks
    assert quant["eval_samples"] == measured["corpus"]["eval_samples"] == 2  # 6 texts, a third held out
    # --quant-sites all: every measured site, in results order
    assert [row["site"] for row in quant["sites"]] == [s["name"] for s in measured["sites"]]
    for row in quant["sites"]:
        assert list(row["policies"]) == POLICY_NAMES
        assert row["policies"]["int8-dynamic-per-token"]["scale"] is None
    assert list(quant["policies"]) == POLICY_NAMES
    assert quant["peak_site"]["site"] == measured["global"]["site"]
    assert quant["recommended"] in [*POLICY_NAMES, None]


def test_the_card_fixture_is_valid_and_its_summary_is_what_the_code_makes() -> None:
    validate_results(with_quant(load_example()), source="fixture")
    per_site = {row["site"]: row["policies"] for row in QUANT["sites"]}
    summary = summarize(per_site, peak_site=QUANT["peak_site"]["site"])
    assert summary == {key: QUANT[key] for key in ("policies", "recommended", "peak_site")}
    thresholds = QUANT["thresholds"]
    for row in QUANT["sites"]:
        for name, figures in row["policies"].items():
            passes = (
                figures["sqnr_db"] >= thresholds["min_sqnr_db"]
                and 1 - figures["token_share_below"] >= thresholds["min_token_share"]
            )
            assert figures["verdict"] == ("PASS" if passes else "FAIL"), (row["site"], name)


def _accumulate(x: torch.Tensor | None, calibrated_max: float) -> dict[str, dict[str, Any]]:
    empty_histogram = torch.zeros(HIST_BINS, dtype=torch.int64)
    accumulator = QuantAccumulator(static_scales(calibrated_max, empty_histogram), device="cpu")
    if x is not None:
        accumulator.update(x, torch.ones(x.shape[:2], dtype=torch.bool))
    return accumulator.result()


def test_degenerate_figures_are_valid_json_and_valid_results() -> None:
    """No elements, all zeros, NaN, inf and float32 overflow: capped or null, never a non-finite number."""
    per_site = {
        "hook_embed": _accumulate(None, 1.0),  # nothing measured
        # all zero: quantized exactly, and no token has an SQNR
        "blocks.0.hook_resid_post": _accumulate(torch.zeros(1, 4, 8), 0.0),
        "blocks.1.hook_resid_post": _accumulate(torch.full((1, 2, 8), math.nan), 1.0),
        "blocks.2.hook_resid_post": _accumulate(torch.full((1, 2, 8), math.inf), 1.0),
        "blocks.3.hook_resid_post": _accumulate(torch.full((1, 2, 8), 1e30), 1.0),  # x^2 overflows float32
    }
    maxabs = {site: figures["int8-static-maxabs"] for site, figures in per_site.items()}
    assert maxabs["hook_embed"]["sqnr_db"] is None and maxabs["hook_embed"]["clip_rate"] is None
    assert maxabs["blocks.0.hook_resid_post"]["sqnr_db"] == quant_mod.SQNR_CAP_DB  # zero noise, capped
    assert maxabs["blocks.0.hook_resid_post"]["token_sqnr_median_db"] is None  # no non-zero token
    assert maxabs["blocks.1.hook_resid_post"]["sqnr_db"] is None  # NaN in the sums
    assert (
        maxabs["blocks.2.hook_resid_post"]["rel_rmse"] is None
        and maxabs["blocks.2.hook_resid_post"]["clip_rate"] == 1.0
    )
    assert per_site["blocks.3.hook_resid_post"]["int8-dynamic-per-token"]["sqnr_db"] == quant_mod.SQNR_CAP_DB

    results = load_example()
    by_name = {s["name"]: s for s in results["sites"]}
    results["quant"] = {
        "eval_fraction": 0.5,
        "eval_samples": 1,
        "eval_tokens": 4,
        "clip_quantile": 0.999,
        "thresholds": dataclasses.asdict(Thresholds()),
        "wall_time_s": 0.0,
        "sites": [
            {
                "site": name,
                "component": by_name[name]["component"],
                "layer": by_name[name]["layer"],
                "policies": figures,
            }
            for name, figures in per_site.items()
        ],
        **summarize(per_site, peak_site="blocks.3.hook_resid_post"),
    }
    validate_results(results, source="degenerate")
    assert json.loads(dumps(results)) == results  # dumps refuses NaN and inf, so this proves there are none


def test_an_uncapped_sqnr_is_refused_before_anything_is_written(
    measured: dict[str, Any], tmp_path: Path
) -> None:
    doc = copy.deepcopy(measured)
    doc["quant"]["sites"][0]["policies"]["int8-static-mse"]["sqnr_db"] = math.inf
    with pytest.raises(SchemaError, match=r"int8-static-mse\.sqnr_db: inf is not a finite number"):
        write_results(doc, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


# --- schema and code agree ---------------------------------------------------------------------------


def test_schema_names_every_policy_key_and_range_the_code_uses() -> None:
    quant = DEFS["quant"]["properties"]
    assert quant["sites"]["items"]["properties"]["policies"]["required"] == POLICY_NAMES
    assert quant["policies"]["required"] == POLICY_NAMES
    assert quant["peak_site"]["properties"]["policies"]["required"] == POLICY_NAMES
    assert quant["recommended"]["enum"] == [*POLICY_NAMES, None]
    assert DEFS["quant_verdict"]["enum"] == [quant_mod.PASS, quant_mod.FAIL]
    assert sorted(quant["thresholds"]["required"]) == sorted(f.name for f in dataclasses.fields(Thresholds))

    figures = _accumulate(torch.ones(1, 1, 4), 1.0)
    for name, row in figures.items():
        assert sorted(row) == sorted(DEFS["quant_figures"]["required"]), name
    summary = summarize({"blocks.0.hook_resid_post": figures}, peak_site="blocks.0.hook_resid_post")
    assert sorted(summary["policies"]["fp8-e4m3-static"]) == sorted(DEFS["quant_summary"]["required"])
    assert sorted(summary["peak_site"]["policies"]["fp8-e4m3-static"]) == sorted(
        quant["peak_site"]["properties"]["policies"]["properties"]["fp8-e4m3-static"]["required"]
    )

    assert DEFS["sqnr_db"]["maximum"] == quant_mod.SQNR_CAP_DB
    for grid in (DEFS["token_sqnr_db"], DEFS["token_sqnr_db_or_null"]):
        assert (grid["minimum"], grid["maximum"], grid["multipleOf"]) == (
            quant_mod.TOKEN_SQNR_LOW_DB,
            quant_mod.TOKEN_SQNR_HIGH_DB,
            quant_mod.TOKEN_SQNR_STEP_DB,
        )


# --- broken copies fail naming their JSON path --------------------------------------------------------


def _site_policy(doc: dict[str, Any], policy: str, site: int = 0) -> dict[str, Any]:
    return doc["quant"]["sites"][site]["policies"][policy]


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], Any], str, str]] = {
    "unknown policy in the summary": (
        lambda d: d["quant"]["policies"].__setitem__("int4-awq", d["quant"]["policies"]["int8-static-mse"]),
        "$.quant.policies",
        "'int4-awq' was unexpected",
    ),
    "unknown policy at a site": (
        lambda d: d["quant"]["sites"][0]["policies"].__setitem__(
            "int4-awq", _site_policy(d, "int8-static-mse")
        ),
        "$.quant.sites[0].policies",
        "'int4-awq' was unexpected",
    ),
    "unknown recommended policy": (
        lambda d: d["quant"].__setitem__("recommended", "int4-awq"),
        "$.quant.recommended",
        "'int4-awq' is not one of",
    ),
    "a policy missing from the summary": (
        lambda d: d["quant"]["policies"].pop("fp8-e4m3-static"),
        "$.quant.policies",
        "'fp8-e4m3-static' is a required property",
    ),
    "clip rate above 1": (
        lambda d: _site_policy(d, "int8-static-maxabs").__setitem__("clip_rate", 1.5),
        "$.quant.sites[0].policies.int8-static-maxabs.clip_rate",
        "1.5 is greater than the maximum of 1",
    ),
    "missing verdict at a site": (
        lambda d: _site_policy(d, "fp8-e4m3-static").pop("verdict"),
        "$.quant.sites[0].policies.fp8-e4m3-static",
        "'verdict' is a required property",
    ),
    "missing verdict in the summary": (
        lambda d: d["quant"]["policies"]["int8-static-mse"].pop("verdict"),
        "$.quant.policies.int8-static-mse",
        "'verdict' is a required property",
    ),
    "unknown verdict at the peak": (
        lambda d: d["quant"]["peak_site"]["policies"]["int8-dynamic-per-token"].__setitem__("verdict", "OK"),
        "$.quant.peak_site.policies.int8-dynamic-per-token.verdict",
        "'OK' is not one of ['PASS', 'FAIL']",
    ),
    "extra key in the block": (
        lambda d: d["quant"].__setitem__("notes", "hand-edited"),
        "$.quant",
        "'notes' was unexpected",
    ),
    "extra key in a site's figures": (
        lambda d: _site_policy(d, "int8-static-mse", site=1).__setitem__("note", "x"),
        "$.quant.sites[1].policies.int8-static-mse",
        "'note' was unexpected",
    ),
    "a scale for the dynamic policy": (
        lambda d: _site_policy(d, "int8-dynamic-per-token").__setitem__("scale", 0.01),
        "$.quant.sites[0].policies.int8-dynamic-per-token.scale",
        "0.01 is not of type 'null'",
    ),
    "no scale for a static policy": (
        lambda d: _site_policy(d, "int8-static-percentile").__setitem__("scale", None),
        "$.quant.sites[0].policies.int8-static-percentile.scale",
        "None is not of type 'number'",
    ),
    "token SQNR off the histogram grid": (
        lambda d: _site_policy(d, "int8-static-mse").__setitem__("token_sqnr_p05_db", 16.9),
        "$.quant.sites[0].policies.int8-static-mse.token_sqnr_p05_db",
        "16.9 is not a multiple of 0.25",
    ),
    "token share above 1": (
        lambda d: _site_policy(d, "int8-static-mse").__setitem__("token_share_below", 2.0),
        "$.quant.sites[0].policies.int8-static-mse.token_share_below",
        "2.0 is greater than the maximum of 1",
    ),
    "eval fraction of 1": (
        lambda d: d["quant"].__setitem__("eval_fraction", 1.0),
        "$.quant.eval_fraction",
        "1.0 is greater than or equal to the maximum of 1",
    ),
    "no sites": (
        lambda d: d["quant"].__setitem__("sites", []),
        "$.quant.sites",
        "[] should be non-empty",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_quant_block_names_its_json_path(measured: dict[str, Any], case: str) -> None:
    break_it, path, words = BROKEN[case]
    doc = copy.deepcopy(measured)
    break_it(doc)
    with pytest.raises(SchemaError) as info:
        validate_results(doc, source="r.json")
    line = info.value.line()
    assert line.startswith(f"r.json::{path}: "), line
    assert words in line, line


def test_render_refuses_a_broken_quant_block_in_one_line(measured: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(measured)
    _site_policy(doc, "int8-static-maxabs")["clip_rate"] = 1.5
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    res = CliRunner().invoke(app, ["render", str(path)])
    assert res.exit_code == 2 and res.stdout == ""
    where = "$.quant.sites[0].policies.int8-static-maxabs.clip_rate"
    assert res.stderr.startswith(f"error: {path}::{where}: 1.5 is greater than the maximum of 1")
    assert res.stderr.count("\n") == 1


def test_the_named_quant_site_sets() -> None:
    from maxact_card.measure.run import quant_sites

    components = ["embedding", "residual", "attn_input", "o_proj_input", "attention", "mlp_input", "mlp", "gate",
                  "down_proj_input", "final_norm"]
    results = {"sites": [{"name": f"s{i}.{c}", "component": c} for i, c in enumerate(components)],
               "global": {"site": "s6.mlp"}}
    linear = ["s2.attn_input", "s3.o_proj_input", "s5.mlp_input", "s8.down_proj_input"]
    # what a W8A8 deployment quantizes, the residual and the peak; in results order
    assert quant_sites("default", results) == ["s1.residual", "s2.attn_input", "s3.o_proj_input", "s5.mlp_input",
                                               "s6.mlp", "s8.down_proj_input"]
    assert quant_sites("linear", results) == linear
    assert quant_sites("residual", results) == ["s1.residual"]
    assert quant_sites("peak", results) == ["s6.mlp"]
    assert quant_sites("s9.final_norm, s0.embedding", results) == ["s0.embedding", "s9.final_norm"]
