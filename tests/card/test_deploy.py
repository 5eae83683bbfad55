"""The section's "For deployment" part: per class of quantized input, its largest max|a| and the
scheme the held-out check recommends for it, the classes not measured, and the export links."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from maxact_card import quant
from maxact_card.card.front_matter import END_MARKER, START_MARKER
from maxact_card.card.section import (
    DEPLOY_CLASSES,
    RECOMMENDATION_ORDER,
    export_links,
    md_code,
    render_section,
)
from maxact_card.card.splice import splice_card
from maxact_card.card.validate import LocalSource, validate_card
from maxact_card.cli import app
from maxact_card.documents import validate_results
from maxact_card.errors import UsageError
from tests.card.test_card import _quant_row, load_example, with_quant
from tests.card.test_hostile_card import HOSTILE, html_of
from tests.goldens import assert_golden

EXPORTS = {
    "smoothquant": "maxact-act-scales.pt",
    "kv-scales": "maxact-kv-scales.safetensors",
    "input-scales": "maxact-input-scales.safetensors",
    "outliers": "maxact-outliers.json",
}

# class -> (site name pattern, module pattern, max|a| per layer 0..3); the largest of each class is
# planted in a different layer.
PLANTED: dict[str, tuple[str, str, list[float]]] = {
    "attn_input": ("blocks.{i}.ln1.hook_normalized", "model.layers.{i}.self_attn.q_proj", [3.5, 4.0, 1_200.0, 6.0]),
    "o_proj_input": ("blocks.{i}.attn.hook_z", "model.layers.{i}.self_attn.o_proj", [2.0, 2.5, 3.0, 96.5]),
    "mlp_input": ("blocks.{i}.ln2.hook_normalized", "model.layers.{i}.mlp.gate_proj", [5.0, 640.0, 7.0, 8.0]),
    "query": ("blocks.{i}.attn.hook_rot_q", "model.layers.{i}.self_attn", [12.0, 31.0, 14.0, 15.0]),
    "key_cache": ("blocks.{i}.attn.hook_rot_k", "model.layers.{i}.self_attn", [48.25, 22.0, 25.0, 20.0]),
    "value_cache": ("blocks.{i}.attn.hook_v", "model.layers.{i}.self_attn", [1.5, 2.0, 3.0, 9.5]),
}  # fmt: skip
HEADS = 4

# class -> {layer: policies that FAIL there}; every other checked (policy, site) passes. Chosen so
# that each class gets another scheme: the first of RECOMMENDATION_ORDER passing at all its sites.
STATIC = ("fp8-e4m3-static", "int8-static-mse", "int8-static-percentile", "int8-static-maxabs")
FAILING: dict[str, dict[int, tuple[str, ...]]] = {
    "attn_input": {2: ("fp8-e4m3-static",)},
    "o_proj_input": {},
    "mlp_input": {1: ("fp8-e4m3-static", "int8-static-mse"), 3: ("int8-static-mse",)},
    "key_cache": {0: STATIC},
    "value_cache": {3: ("fp8-e4m3-static", "int8-static-mse", "int8-static-percentile")},
}
EXPECTED_SCHEME = {
    "attn_input": "int8-static-mse",
    "o_proj_input": "fp8-e4m3-static",
    "mlp_input": "int8-static-percentile",
    "key_cache": "int8-dynamic-per-token",
    "value_cache": "int8-static-maxabs",
}


def _plant_site(results: dict[str, Any], component: str, layer: int) -> None:
    """A copy of the layer's down_proj-input site, renamed and moved to `component`, its max|a| planted."""
    name_pattern, module_pattern, values = PLANTED[component]
    template = next(s for s in results["sites"] if s["name"] == f"blocks.{layer}.mlp.hook_post")
    site = copy.deepcopy(template)
    value = values[layer]
    site.update(
        name=name_pattern.format(i=layer),
        component=component,
        module=module_pattern.format(i=layer),
        max=value,
        max_abs=value,
        width=576 if component in ("attn_input", "mlp_input") else 512,
    )
    site["read"] = "output" if component in ("query", "key_cache", "value_cache") else "input"
    if component in ("query", "key_cache", "value_cache"):
        site["heads"] = HEADS
        site["head_max_abs"] = [value if h == layer % HEADS else value / 2 for h in range(HEADS)]
    else:
        site["readers"] = [site["module"]]
    site["top_k"][0].update(abs=value, value=value)
    site["top_channels"][0]["max_abs"] = value
    results["sites"].insert(results["sites"].index(template), site)
    results["layers"][layer]["max_abs"][component] = value
    best = results["components"].get(component)
    if best is None or value > best["max_abs"]:
        results["components"][component] = {
            "max_abs": value,
            "site": site["name"],
            "layer": layer,
            "location": copy.deepcopy(site["location"]),
        }


def _quant_site(component: str, layer: int) -> dict[str, Any]:
    name = PLANTED[component][0].format(i=layer)
    failing = FAILING[component].get(layer, ())
    rows = {}
    for policy in quant.POLICY_ORDER:
        figures = (
            ("FAIL", 12.5, 8.0, 14.0, 0.2, 0.0)
            if policy.value in failing
            else ("PASS", 30.0, 24.0, 31.0, 0.0, 0.0)
        )
        rows[policy.value] = _quant_row(policy.value, PLANTED[component][2][layer], figures)
    return {"site": name, "component": component, "layer": layer, "policies": rows}


def _resummarize(results: dict[str, Any]) -> None:
    """The quant block's summary as `measure` writes it: `quant.summarize` over the site rows."""
    block = results["quant"]
    per_site = {row["site"]: row["policies"] for row in block["sites"]}
    peak = results["global"]["site"]
    block.update(quant.summarize(per_site, peak_site=peak if peak in per_site else None))


def deploy_results(*, classes: tuple[str, ...] = tuple(PLANTED), checked: bool = True) -> dict[str, Any]:
    """The example results (with its quant block) measured with --gemm-inputs and --kv-cache: every
    class of PLANTED has a site per layer; the held-out check covers the classes of FAILING."""
    results = with_quant(load_example()) if checked else load_example()
    for component in classes:
        for layer in range(4):
            _plant_site(results, component, layer)
    if checked:
        for component in classes:
            if component in FAILING:
                results["quant"]["sites"] += [_quant_site(component, layer) for layer in range(4)]
        _resummarize(results)
    validate_results(results, source="deploy fixture")
    return results


def deploy_part(section: str) -> str:
    start = section.index("### For deployment")
    return section[start : section.index("### Per layer", start)]


def row_of(section: str, label: str) -> str:
    return next(line for line in deploy_part(section).splitlines() if line.startswith(f"| {label} |"))


# --- the rows ----------------------------------------------------------------------------------
def test_each_class_shows_its_planted_largest_site_and_its_own_scheme() -> None:
    section = render_section(deploy_results())
    assert row_of(section, "Attention input") == (
        "| Attention input | 1,200 | 2 | `blocks.2.ln1.hook_normalized` | `int8-static-mse` |"
    )
    assert (
        row_of(section, "o_proj input")
        == "| o_proj input | 96.5 | 3 | `blocks.3.attn.hook_z` | `fp8-e4m3-static` |"
    )
    assert row_of(section, "MLP input") == (
        "| MLP input | 640 | 1 | `blocks.1.ln2.hook_normalized` | `int8-static-percentile` |"
    )
    # the example's quant block checked down_proj only in layer 1
    assert row_of(section, "down_proj input") == (
        "| down_proj input | 8,832 | 1 | `blocks.1.mlp.hook_post` | `fp8-e4m3-static` (1 of 4 sites checked) |"
    )
    assert row_of(section, "KV cache: keys") == (
        "| KV cache: keys | 48.25 | 0 | `blocks.0.attn.hook_rot_k` | `int8-dynamic-per-token` |"
    )
    assert row_of(section, "KV cache: values") == (
        "| KV cache: values | 9.5 | 3 | `blocks.3.attn.hook_v` | `int8-static-maxabs` |"
    )
    assert row_of(section, "Queries (after RoPE)") == (
        "| Queries (after RoPE) | 31 | 1 | `blocks.1.attn.hook_rot_q` | not checked |"
    )
    rows = [line for line in deploy_part(section).splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 7  # the header and one row per class, in DEPLOY_CLASSES order
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| Attention input", "| o_proj input", "| MLP input", "| down_proj input",
        "| KV cache: keys", "| KV cache: values", "| Queries (after RoPE)",
    ]  # fmt: skip
    assert "Not measured" not in deploy_part(section) and "Not in this model" not in deploy_part(section)


def test_a_class_where_no_scheme_passes_says_so() -> None:
    results = deploy_results()
    for row in results["quant"]["sites"]:
        if row["component"] == "o_proj_input" and row["layer"] == 0:
            row["policies"]["int8-dynamic-per-token"]["verdict"] = "FAIL"
            for policy in STATIC:
                row["policies"][policy]["verdict"] = "FAIL"
    assert row_of(render_section(results), "o_proj input").endswith("| **none passes** |")


def test_the_class_scheme_is_what_quant_summarize_recommends_over_the_class_sites() -> None:
    results = deploy_results()
    section = render_section(results)
    for component, scheme in EXPECTED_SCHEME.items():
        sites = {r["site"]: r["policies"] for r in results["quant"]["sites"] if r["component"] == component}
        assert quant.summarize(sites)["recommended"] == scheme
        label = {"attn_input": "Attention input", "o_proj_input": "o_proj input", "mlp_input": "MLP input",
                 "key_cache": "KV cache: keys", "value_cache": "KV cache: values"}[component]  # fmt: skip
        assert row_of(section, label).endswith(f"| `{scheme}` |")
    # over all sites at once, only the dynamic policy passes: the classes' schemes are cheaper
    assert results["quant"]["recommended"] == "int8-dynamic-per-token"


def test_recommendation_order_matches_the_quant_module() -> None:
    assert RECOMMENDATION_ORDER == tuple(p.value for p in quant.RECOMMENDATION_ORDER)


def test_without_the_quant_check_every_class_is_not_checked() -> None:
    part = deploy_part(render_section(deploy_results(checked=False)))
    assert "The schemes were not checked on held-out data (`maxact-card measure --quant`)." in part
    rows = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 7 and all(row.endswith("| not checked |") for row in rows)


# --- classes not measured ----------------------------------------------------------------------
def test_the_plain_example_names_both_options() -> None:
    part = deploy_part(render_section(load_example()))
    assert (
        "Not measured: the attention, o_proj and MLP inputs (`--gemm-inputs`);\n"
        "the KV cache and the queries (`--kv-cache`).\n"
    ) in part
    assert row_of(render_section(load_example()), "down_proj input") == (
        "| down_proj input | 8,832 | 1 | `blocks.1.mlp.hook_post` | not checked |"
    )


def test_gemm_inputs_without_kv_cache_names_only_the_kv_cache() -> None:
    section = render_section(deploy_results(classes=("attn_input", "o_proj_input", "mlp_input")))
    part = deploy_part(section)
    assert "Not measured: the KV cache and the queries (`--kv-cache`).\n" in part
    assert "--gemm-inputs" not in part and "Not in this model" not in part


def test_a_class_missing_although_its_option_was_on_is_not_in_the_model() -> None:
    results = deploy_results(classes=("attn_input", "mlp_input", "value_cache"))
    del results["components"]["down_proj_input"]  # as for fused MoE experts
    results["sites"] = [s for s in results["sites"] if s["component"] != "down_proj_input"]
    part = deploy_part(render_section(results))
    # no queries: the KV cache option measures them only where the model has them
    assert "Not in this model: o_proj input, down_proj input, KV cache: keys.\n" in part
    assert "Not measured" not in part


def test_no_class_and_no_exports_means_no_part() -> None:
    results = load_example()
    del results["components"]["down_proj_input"]
    assert "For deployment" not in render_section(results)
    # with exports, the part still links them
    part = deploy_part(render_section(results, exports={"outliers": "maxact-outliers.json"}))
    assert (
        "| Input |" not in part
        and "- `outliers`: [maxact-outliers.json](maxact/maxact-outliers.json)" in part
    )


# --- export links ------------------------------------------------------------------------------
def test_exports_are_linked_beside_the_results() -> None:
    part = deploy_part(render_section(load_example(), exports=EXPORTS))
    assert part.endswith(
        "Exported for deployment tools, beside the results:\n\n"
        "- `input-scales`: [maxact-input-scales.safetensors](maxact/maxact-input-scales.safetensors)\n"
        "- `kv-scales`: [maxact-kv-scales.safetensors](maxact/maxact-kv-scales.safetensors)\n"
        "- `outliers`: [maxact-outliers.json](maxact/maxact-outliers.json)\n"
        "- `smoothquant`: [maxact-act-scales.pt](maxact/maxact-act-scales.pt)\n\n"
    )
    assert "Exported" not in render_section(load_example())


def test_export_targets_follow_the_results_path_and_are_encoded() -> None:
    section = render_section(
        load_example(),
        results_path="runs/r 1.json",
        exports={"smoothquant": "scales (v2).pt", "kv": "../kv.json"},
    )
    assert "- `smoothquant`: [scales (v2).pt](runs/scales%20%28v2%29.pt)" in section
    assert "- `kv`: [../kv.json](kv.json)" in section
    assert export_links({"a": "x.pt"}, "results.json") == {"a": "x.pt"}


@pytest.mark.parametrize("name", ["../../x.pt", "/etc/passwd", ""])
def test_export_files_outside_the_card_folder_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        render_section(load_example(), exports={"smoothquant": name})


# --- hostile names -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_site_module_and_export_names_render_inertly(text: str) -> None:
    results = deploy_results()
    for site in results["sites"]:
        if site["component"] in DEPLOY_CLASSES:
            site["module"] = "m" + text
    for entry in (results["components"][c] for c in DEPLOY_CLASSES):
        entry["site"] = "s" + text
    for row in results["quant"]["sites"]:
        row["site"] = "s" + text
    card = splice_card("# A card\n", results, exports={"f" + text: "scales" + text + ".pt"})
    assert splice_card(card, results, exports={"f" + text: "scales" + text + ".pt"}) == card
    # the front matter is YAML, quoted by yaml.safe_dump; the section starts at the marker's own line
    body = card[card.index(f"\n{START_MARKER}\n") :]
    assert all(
        h.startswith((START_MARKER, "<!-- Generated by", "<details>", "</details>", END_MARKER))
        for h in html_of(body)
    )
    part = deploy_part(card)
    assert not any(ch in part for ch in "\r\u2028\u2029\x1b\x00\u202e")
    tokens = MarkdownIt("commonmark").enable("table").parse(part)
    cells_per_row: list[int] = []
    for token in tokens:
        if token.type == "tr_open":
            cells_per_row.append(0)
        elif token.type in ("td_open", "th_open"):
            cells_per_row[-1] += 1
    assert cells_per_row == [5] * (1 + 7)  # the header and one row per class, each with its 5 cells
    # each site cell holds the whole name as one code span (a table cell unescapes its pipes)
    span = md_code("s" + text, in_table=False)
    assert sum(1 for t in tokens if t.type == "inline" and t.content == span) == 7
    links = [line for line in part.splitlines() if line.startswith("- ")]
    assert len(links) == 1 and "](maxact/scales" in links[0] and " " not in links[0].rsplit("](", 1)[1]


# --- the golden, and the validator ----------------------------------------------------------------
def test_deploy_section_golden() -> None:
    assert_golden("section_example_deploy.md", render_section(deploy_results(), exports=EXPORTS))


runner = CliRunner()


@pytest.fixture
def card_folder(tmp_path: Path) -> Path:
    """A card rendered from the deployment results, with export links, as `publish --exports` writes it."""
    folder = tmp_path / "model"
    (folder / "maxact").mkdir(parents=True)
    results = deploy_results()
    (folder / "maxact" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    from maxact_card.card.chart import render_chart

    (folder / "maxact" / "profile.svg").write_text(render_chart(results), encoding="utf-8")
    (folder / "README.md").write_text(splice_card(None, results, exports=EXPORTS), encoding="utf-8")
    for name in EXPORTS.values():  # the files publish puts beside the results
        (folder / "maxact" / name).write_bytes(b"export")
    return folder


def _status(folder: Path) -> dict[str, str]:
    report = validate_card(LocalSource(folder / "README.md"))
    return {check.name: check.status.value for check in report.checks}


def test_a_card_with_deployment_figures_and_exports_validates(card_folder: Path) -> None:
    assert _status(card_folder)["section-text"] == "pass"
    assert _status(card_folder)["front-matter"] == "pass"
    assert _status(card_folder)["exports"] == "pass"
    result = runner.invoke(app, ["validate", str(card_folder)])
    assert result.exit_code == 0, result.stdout


def test_a_linked_export_missing_beside_the_card_fails(card_folder: Path) -> None:
    (card_folder / "maxact" / "maxact-kv-scales.safetensors").unlink()
    assert _status(card_folder)["exports"] == "fail"
    assert _status(card_folder)["section-text"] == "pass"  # the section is right; the file is gone
    result = runner.invoke(app, ["validate", str(card_folder)])
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL  exports"))
    assert "maxact/maxact-kv-scales.safetensors linked from the section but not beside the card" in line


def test_a_card_without_exports_has_no_exports_check(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "maxact").mkdir(parents=True)
    results = deploy_results()
    (folder / "maxact" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (folder / "README.md").write_text(splice_card(None, results), encoding="utf-8")
    assert "exports" not in _status(folder)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("| Attention input | 1,200 | 2 |", "| Attention input | 1,100 | 2 |"),  # a figure
        (
            "`blocks.2.ln1.hook_normalized` | `int8-static-mse` |",
            "`blocks.2.ln1.hook_normalized` | `fp8-e4m3-static` |",
        ),
        ("| KV cache: keys | 48.25 | 0 |", "| KV cache: keys | 48.25 | 1 |"),  # where
        ("](maxact/maxact-outliers.json)", "](maxact/other.json)"),  # a link
    ],
)
def test_an_edited_deployment_part_is_stale(card_folder: Path, old: str, new: str) -> None:
    card = card_folder / "README.md"
    text = card.read_text(encoding="utf-8")
    assert text.count(old) == 1
    card.write_text(text.replace(old, new), encoding="utf-8")
    assert _status(card_folder)["section-text"] == "fail"
    result = runner.invoke(app, ["validate", str(card_folder)])
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL  section-text"))
    edited = next(n for n in text.replace(old, new).splitlines() if new in n)
    assert f"reads {edited[:40]}" in line.replace("'", "")


def test_new_results_make_the_deployment_part_stale(card_folder: Path) -> None:
    results = json.loads((card_folder / "maxact" / "results.json").read_text(encoding="utf-8"))
    for row in results["quant"]["sites"]:
        if row["component"] == "attn_input":
            row["policies"]["fp8-e4m3-static"]["verdict"] = "PASS"
    _resummarize(results)
    (card_folder / "maxact" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert _status(card_folder)["section-text"] == "fail"


@pytest.mark.parametrize("results_dir", ["maxact", "."])
def test_export_names_given_in_another_spelling_validate(tmp_path: Path, results_dir: str) -> None:
    folder = tmp_path / "model"
    results_path = f"{results_dir}/results.json" if results_dir != "." else "results.json"
    results = deploy_results()
    (folder / results_dir).mkdir(parents=True, exist_ok=True)
    (folder / results_path).write_text(json.dumps(results), encoding="utf-8")
    from maxact_card.card.chart import render_chart

    (folder / "maxact").mkdir(exist_ok=True)
    (folder / "maxact" / "profile.svg").write_text(render_chart(results), encoding="utf-8")
    exports = {
        "smoothquant": "./scales.pt",
        "outliers": "sub/../outliers.json",
        "kv-scales": "kv/k.safetensors",
    }
    card = splice_card(None, results, results_path=results_path, exports=exports)
    (folder / "README.md").write_text(card, encoding="utf-8")
    prefix = "" if results_dir == "." else "maxact/"
    assert f"- `smoothquant`: [scales.pt]({prefix}scales.pt)" in card
    assert f"- `outliers`: [outliers.json]({prefix}outliers.json)" in card
    assert f"- `kv-scales`: [kv/k.safetensors]({prefix}kv/k.safetensors)" in card
    assert _status(folder)["section-text"] == "pass" and _status(folder)["front-matter"] == "pass"


def test_an_export_dropped_from_the_summary_is_stale(card_folder: Path) -> None:
    card = card_folder / "README.md"
    text = card.read_text(encoding="utf-8")
    listed = ", outliers: maxact/maxact-outliers.json"
    assert text.count(listed) == 1
    card.write_text(text.replace(listed, ""), encoding="utf-8")
    assert _status(card_folder)["section-text"] == "fail"
