"""The model-card section: number formatting, rendering (golden), splicing into real-world-shaped cards, CLI."""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from maxact_card import fmt
from maxact_card.card.front_matter import END_MARKER, START_MARKER, CardError, CardProblem, parse_card
from maxact_card.card.section import SUMMARY_KEY, card_summary, check_results, md_code, render_section
from maxact_card.card.splice import splice_card
from maxact_card.cli import app
from maxact_card.errors import SchemaError
from tests import paths
from tests.goldens import assert_golden

HERE = paths.TESTS
EXAMPLE = HERE / "data" / "results_example.json"
CARDS = HERE / "cards"
GOLDEN = HERE / "golden"

# A crafted quant block in the shape `measure --quant` writes (schema-valid) for the example's model:
# five checked sites; massive activations in layers 1-3 break the static INT8 policies.
QUANT_TOKENS = 91_712
# site -> (max|a|, {policy: (verdict, sqnr_db, token p05, token median, share below 20 dB, clip rate)})
QUANT_SITE_FIGURES: dict[str, tuple[float, dict[str, tuple[str, float, float, float, float, float]]]] = {
    "blocks.0.hook_resid_post": (12.5, {
        "int8-static-maxabs": ("FAIL", 24.1, 12.5, 30.0, 0.12, 0.0),
        "int8-static-percentile": ("PASS", 27.3, 24.5, 31.0, 0.003, 0.001),
        "int8-static-mse": ("PASS", 28.0, 25.25, 31.5, 0.002, 0.0002),
        "int8-dynamic-per-token": ("PASS", 36.0, 27.5, 38.0, 0.0, 0.0),
        "fp8-e4m3-static": ("PASS", 31.2, 24.0, 31.75, 0.0, 0.0),
    }),
    "blocks.1.hook_resid_post": (35_328.0, {
        "int8-static-maxabs": ("FAIL", 20.9, 3.0, 14.0, 0.62, 0.0),
        "int8-static-percentile": ("FAIL", 9.71, 14.25, 26.0, 0.08, 0.001),
        "int8-static-mse": ("FAIL", 13.5, 17.5, 27.0, 0.06, 0.0002),
        "int8-dynamic-per-token": ("PASS", 34.4, 26.0, 37.25, 0.0, 0.0),
        "fp8-e4m3-static": ("PASS", 30.5, 23.25, 31.25, 0.002, 0.0),
    }),
    "blocks.1.mlp.hook_post": (8_832.0, {
        "int8-static-maxabs": ("PASS", 35.2, 27.75, 36.5, 0.004, 0.0),
        "int8-static-percentile": ("PASS", 33.0, 29.0, 34.25, 0.002, 0.001),
        "int8-static-mse": ("PASS", 34.1, 30.0, 35.0, 0.001, 0.0001),
        "int8-dynamic-per-token": ("PASS", 31.62, 24.25, 33.5, 0.001, 0.0),
        "fp8-e4m3-static": ("PASS", 31.0, 24.75, 31.5, 0.0, 0.0),
    }),
    "blocks.2.hook_resid_post": (35_410.25, {
        "int8-static-maxabs": ("FAIL", 19.8, 1.5, 12.25, 0.66, 0.0),
        "int8-static-percentile": ("FAIL", 11.4, 16.0, 26.5, 0.07, 0.001),
        "int8-static-mse": ("FAIL", 12.06, 17.0, 27.25, 0.055, 0.0002),
        "int8-dynamic-per-token": ("PASS", 33.8, 25.5, 37.0, 0.0, 0.0),
        "fp8-e4m3-static": ("PASS", 30.1, 23.0, 31.0, 0.003, 0.0),
    }),
    "blocks.3.hook_resid_post": (36_011.5, {
        "int8-static-maxabs": ("FAIL", 18.46, 0.0, 11.0, 0.7, 0.0),
        "int8-static-percentile": ("FAIL", 10.2, 15.0, 26.25, 0.075, 0.001),
        "int8-static-mse": ("FAIL", 12.8, 17.25, 27.5, 0.05, 0.0002),
        "int8-dynamic-per-token": ("PASS", 33.1, 25.0, 36.75, 0.0, 0.0),
        "fp8-e4m3-static": ("PASS", 29.94, 22.5, 30.75, 0.004, 0.0),
    }),
}  # fmt: skip
# the percentile policy clips at the sites' q0.999 (9.0), the MSE policy a little above it
_CLIPS = {"int8-static-percentile": 9.0, "int8-static-mse": 48.0}
_QMAX = {"fp8-e4m3-static": 448.0}


def _quant_row(
    policy: str, max_abs: float, figures: tuple[str, float, float, float, float, float]
) -> dict[str, Any]:
    verdict, sqnr, p05, median, share, clip_rate = figures
    clip = None if policy == "int8-dynamic-per-token" else _CLIPS.get(policy, max_abs)
    rel_rmse = 10 ** (-sqnr / 20)
    return {
        "scale": None if clip is None else clip / _QMAX.get(policy, 127.0),
        "clip": clip,
        "sqnr_db": sqnr,
        "rel_rmse": rel_rmse,
        "rel_mae": rel_rmse * 0.6,
        "clip_rate": clip_rate,
        "token_sqnr_median_db": median,
        "token_sqnr_p05_db": p05,
        "token_share_below": share,
        "tokens": QUANT_TOKENS,
        "verdict": verdict,
    }


def _quant_site(name: str) -> dict[str, Any]:
    max_abs, figures = QUANT_SITE_FIGURES[name]
    layer = int(name.split(".")[1])
    return {
        "site": name,
        "component": "down_proj_input" if name.endswith("mlp.hook_post") else "residual",
        "layer": layer,
        "policies": {policy: _quant_row(policy, max_abs, row) for policy, row in figures.items()},
    }


QUANT: dict[str, Any] = {
    "eval_fraction": 1 / 3,
    "eval_samples": 128,
    "eval_tokens": QUANT_TOKENS,
    "clip_quantile": 0.999,
    "thresholds": {"min_sqnr_db": 20.0, "min_token_sqnr_db": 20.0, "min_token_share": 0.99},
    "wall_time_s": 4.2,
    "sites": [_quant_site(name) for name in QUANT_SITE_FIGURES],
    # what maxact_card.quant.summarize makes of the sites (tests/quant/test_quant_schema.py checks it)
    "policies": {
        "int8-static-maxabs": {
            "verdict": "FAIL",
            "worst_site": "blocks.3.hook_resid_post",
            "worst_sqnr_db": 18.46,
            "worst_token_sqnr_p05_db": 0.0,
            "failing_sites": 4,
        },
        "int8-static-percentile": {
            "verdict": "FAIL",
            "worst_site": "blocks.1.hook_resid_post",
            "worst_sqnr_db": 9.71,
            "worst_token_sqnr_p05_db": 14.25,
            "failing_sites": 3,
        },
        "int8-static-mse": {
            "verdict": "FAIL",
            "worst_site": "blocks.2.hook_resid_post",
            "worst_sqnr_db": 12.06,
            "worst_token_sqnr_p05_db": 17.0,
            "failing_sites": 3,
        },
        "int8-dynamic-per-token": {
            "verdict": "PASS",
            "worst_site": "blocks.1.mlp.hook_post",
            "worst_sqnr_db": 31.62,
            "worst_token_sqnr_p05_db": 24.25,
            "failing_sites": 0,
        },
        "fp8-e4m3-static": {
            "verdict": "PASS",
            "worst_site": "blocks.3.hook_resid_post",
            "worst_sqnr_db": 29.94,
            "worst_token_sqnr_p05_db": 22.5,
            "failing_sites": 0,
        },
    },
    "recommended": "fp8-e4m3-static",
    "peak_site": {
        "site": "blocks.3.hook_resid_post",
        "policies": {
            "int8-static-maxabs": {"sqnr_db": 18.46, "token_sqnr_p05_db": 0.0, "verdict": "FAIL"},
            "int8-static-percentile": {"sqnr_db": 10.2, "token_sqnr_p05_db": 15.0, "verdict": "FAIL"},
            "int8-static-mse": {"sqnr_db": 12.8, "token_sqnr_p05_db": 17.25, "verdict": "FAIL"},
            "int8-dynamic-per-token": {"sqnr_db": 33.1, "token_sqnr_p05_db": 25.0, "verdict": "PASS"},
            "fp8-e4m3-static": {"sqnr_db": 29.94, "token_sqnr_p05_db": 22.5, "verdict": "PASS"},
        },
    },
}

# Cards that splice cleanly, and the ones that must be refused with a named problem.
GOOD_CARDS = [
    "empty.md",
    "no_front_matter.md",
    "big_front_matter.md",
    "old_section.md",
    "crlf.md",
    "non_ascii.md",
    "marker_words.md",
    "no_trailing_newline.md",
    "front_matter_only.md",
    "bom.md",
]
BAD_CARDS = {
    "broken_start_only.md": CardProblem.broken_markers,
    "broken_end_first.md": CardProblem.broken_markers,
    "duplicate.md": CardProblem.duplicate_sections,
    "bad_front_matter.md": CardProblem.unreadable_front_matter,
    "unclosed_front_matter.md": CardProblem.unreadable_front_matter,
}


def load_example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def with_quant(results: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(results)
    out["quant"] = copy.deepcopy(QUANT)
    out["corpus"]["eval_samples"] = QUANT["eval_samples"]
    return out


def with_new_peak(results: dict[str, Any], peak: float = 52_480.0) -> dict[str, Any]:
    """A copy whose peak (layer 3 residual) moved: the global, component, layer, site and bootstrap."""
    out = copy.deepcopy(results)
    out["global"]["max_abs"] = out["global"]["value"] = peak
    out["global"]["bootstrap"].update(median=peak, p95=peak, p05=peak - 100)
    out["components"]["residual"]["max_abs"] = peak
    out["layers"][3]["max_abs"]["residual"] = peak
    for site in out["sites"]:
        if site["name"] == "blocks.3.hook_resid_post":
            site["max"] = site["max_abs"] = peak
            site["top_k"][0]["abs"] = site["top_k"][0]["value"] = peak
            site["top_channels"][0]["max_abs"] = peak
    return out


def read_card(name: str) -> str:
    return (CARDS / name).read_bytes().decode("utf-8")


# --- number formatting ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (35328.0, "35,328"),
        (35328, "35,328"),
        (7.0e5, "7.0×10^5"),
        (712_345.0, "7.1×10^5"),
        (99_999.6, "1.0×10^5"),
        (0.0123, "0.0123"),
        (0.25, "0.25"),
        (12.5, "12.5"),
        (8.0, "8"),
        (180.5, "180.5"),
        (283.555, "283.6"),
        (0.00176332, "0.001763"),
        (1.2345e-5, "1.2×10^-5"),
        (-35328.0, "-35,328"),
        (-0.0123, "-0.0123"),
        (-7.0e5, "-7.0×10^5"),
        (0, "0"),
        (0.0, "0"),
        (-0.0, "0"),
        (999.96, "1,000"),
        (float("inf"), "∞"),
        (float("nan"), "NaN"),
        (None, "n/a"),
    ],
)
def test_number(value: float, text: str) -> None:
    assert fmt.number(value) == text


def test_number_significant_digits() -> None:
    assert fmt.number(0.0017633, sig=2) == "0.0018"
    assert fmt.number(3.14159, sig=3) == "3.14"


def test_other_formats() -> None:
    assert fmt.count(183424) == "183,424"
    assert fmt.count(0) == "0"
    assert fmt.ratio(2400.0) == "2,400×"
    assert fmt.db(18.46) == "18.5 dB"
    assert fmt.db(-0.04) == "0.0 dB"
    assert fmt.db(None) == "n/a"
    assert fmt.layer_ranges([3, 1, 2, 7, 9, 10]) == "1–3, 7, 9–10"
    assert fmt.layer_ranges([]) == ""


def test_md_code_escapes_pipes_and_backticks() -> None:
    assert md_code("<|im_start|>") == "`<\\|im_start\\|>`"
    assert md_code("<|im_start|>", in_table=False) == "`<|im_start|>`"
    assert md_code("a`b") == "``a`b``"
    assert md_code("`x") == "`` `x ``"


# --- the rendered section ------------------------------------------------------------------------
def test_section_golden() -> None:
    assert_golden("section_example.md", render_section(load_example()))


def test_section_with_quant_golden() -> None:
    assert_golden("section_example_quant.md", render_section(with_quant(load_example())))


def test_section_is_deterministic() -> None:
    results = load_example()
    assert render_section(results) == render_section(copy.deepcopy(results))


def test_section_headline_and_meaning_derive_from_the_numbers() -> None:
    text = render_section(load_example())
    assert text.startswith(START_MARKER + "\n") and text.endswith(END_MARKER + "\n")
    assert "## Maximum activations" in text
    assert "**Peak |a| = 36,012**" in text
    assert "channel 82" in text and '`"<|im_start|>"`' in text
    # 36,011.5 / 127 = 283.56 per step; the site's median |a| 0.5 is 0.0018 of a step.
    assert "36,012 / 127 = 283.6" in text
    assert "median |a| (0.5) is 0.0018 of a step and rounds to zero" in text
    assert "at least 99.99% of its activations" in text
    assert "layers 1–3" in text
    assert "35328.0" not in text and "35,328" in text
    assert "90% interval 35,990 to 36,012" in text
    assert "INT8 / FP8" not in text and "SQNR" not in text  # no verdicts without a quant block


def test_section_meaning_when_the_median_survives() -> None:
    results = load_example()
    results["global"]["max_abs"] = results["global"]["value"] = 12.5
    text = render_section(results)
    # step 12.5/127 = 0.09843; median 0.5 → 5.08 steps; half a step is 9.8% of the median.
    assert "lies 5.08 steps from zero" in text
    assert "at most half a step (0.04921), 9.8% of the median" in text


def test_section_with_quant_shows_verdicts() -> None:
    text = render_section(with_quant(load_example()))
    assert "### INT8 / FP8 activation scales" in text
    assert (
        "| `int8-static-maxabs` | **FAIL** | `blocks.3.hook_resid_post` | 18.5 dB | 0.0 dB | 4 | 18.5 dB |"
        in text
    )
    assert "**Recommended: `fp8-e4m3-static`**" in text
    assert "`min_token_share` = 0.99" in text


def test_section_is_markdown_with_table_headings_and_details() -> None:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(render_section(with_quant(load_example())))
    types = [t.type for t in tokens]
    assert types.count("table_open") == 4  # components, quant policies, for deployment, per layer
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0] == "Maximum activations"
    assert {
        "Per component", "Per layer", "How this was measured", "INT8 / FP8 activation scales", "For deployment"
    } <= set(headings)  # fmt: skip
    html_blocks = [t.content for t in tokens if t.type == "html_block"]
    assert any(block.startswith("<details>") for block in html_blocks)
    assert any(block.startswith("</details>") for block in html_blocks)
    assert any(START_MARKER in block for block in html_blocks)
    assert any(END_MARKER in block for block in html_blocks)
    # The token `"<|im_start|>"` sits in table cells without breaking them: every body row of the
    # component table has exactly seven cells.
    html = md.render(render_section(load_example()))
    assert "<code>&quot;&lt;|im_start|&gt;&quot;</code>" in html
    image = [c for t in tokens if t.type == "inline" for c in (t.children or []) if c.type == "image"]
    assert [img.attrs["src"] for img in image] == ["maxact/profile.svg"]


def test_component_table_rows_have_seven_cells() -> None:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(render_section(load_example()))
    first_table = tokens.index(next(t for t in tokens if t.type == "table_open"))
    end = tokens.index(next(t for t in tokens[first_table:] if t.type == "table_close"))
    cells_per_row: list[int] = []
    for token in tokens[first_table:end]:
        if token.type == "tr_open":
            cells_per_row.append(0)
        elif token.type in ("td_open", "th_open"):
            cells_per_row[-1] += 1
    assert cells_per_row == [7] * 8  # header + 7 components (no router in a dense model)


def test_custom_paths_are_linked() -> None:
    text = render_section(load_example(), chart_path="assets/my chart.svg", results_path="runs/r.json")
    assert "](assets/my%20chart.svg)" in text
    assert "[runs/r.json](runs/r.json)" in text


def test_section_handles_peak_outside_layers_and_moe_router() -> None:
    results = load_example()
    results["global"].update(
        site="ln_final.hook_normalized",
        component="final_norm",
        layer=None,
        module="model.norm",
        max_abs=40000.0,
        value=-40000.0,
    )
    results["components"]["router"] = {
        "max_abs": 12.0,
        "site": "blocks.0.mlp.hook_router_logits",
        "layer": 0,
        "location": results["components"]["attention"]["location"],
    }
    text = render_section(results)
    assert "in the output of the final norm" in text
    assert "(a negative value, -40,000)" in text
    assert "| MoE output |" in text and "| Router logits |" in text


def test_check_results_names_path_and_count() -> None:
    results = load_example()
    results["global"]["max_abs"] = -1
    del results["run"]["dtype"]
    with pytest.raises(SchemaError) as info:
        check_results(results, source="r.json")
    assert info.value.message.startswith("r.json::$.")
    assert "(1 other error)" in info.value.message


# --- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "problem"), sorted(BAD_CARDS.items()))
def test_bad_cards_are_refused_with_a_named_problem(name: str, problem: CardProblem) -> None:
    with pytest.raises(CardError) as info:
        parse_card(read_card(name))
    assert info.value.problem is problem
    assert info.value.exit_code == 2
    assert problem.value in info.value.line()
    with pytest.raises(CardError):
        splice_card(read_card(name), load_example())


def test_marker_words_in_prose_and_code_are_not_markers() -> None:
    parts = parse_card(read_card("marker_words.md"))
    assert parts.section is None


def test_parse_finds_the_section_and_front_matter() -> None:
    text = read_card("old_section.md")
    parts = parse_card(text)
    assert parts.section_lines == (20, 29)
    assert parts.section_text is not None and parts.section_text.startswith(START_MARKER)
    assert parts.front_matter is not None and parts.front_matter.data["license"] == "mit"
    assert parts.eol == "\n"
    assert parse_card(read_card("crlf.md")).eol == "\r\n"


# --- splicing ---------------------------------------------------------------------------------------
def _changed_lines(before: str, after: str) -> list[str]:
    """Lines of `before` that `after` deleted or replaced."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    removed = []
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag in ("delete", "replace"):
            removed.extend(a[i1:i2])
    return removed


def _front_matter(text: str) -> dict[str, Any]:
    parts = parse_card(text)
    assert parts.front_matter is not None
    return parts.front_matter.data


@pytest.mark.parametrize("name", GOOD_CARDS)
def test_splice_keeps_everything_else(name: str) -> None:
    original = read_card(name)
    results = load_example()
    spliced = splice_card(original, results)
    parts = parse_card(spliced)
    assert parts.section_text is not None
    assert parts.section_text.replace("\r\n", "\n") == render_section(results).rstrip("\n")
    data = _front_matter(spliced)
    assert data[SUMMARY_KEY] == card_summary(results)
    # Every line of the original card survives, except an older section and `maxact:` block.
    removed = _changed_lines(original, spliced)
    if name == "old_section.md":
        old = parse_card(original)
        assert old.section_text is not None
        allowed = set(old.section_text.splitlines(keepends=True)) | {
            line for line in original.splitlines(keepends=True) if line.startswith(("  ", "maxact:"))
        }
        assert removed and set(removed) <= allowed | {old.section_text.splitlines()[-1]}
    elif name == "bom.md":
        assert removed == [original.splitlines(keepends=True)[0]]  # only the BOM went, the line stayed
        assert spliced.startswith("---\n") and original.splitlines()[0].lstrip("\ufeff") in spliced
    elif name == "no_trailing_newline.md":
        last = original.splitlines()[-1]
        assert removed == [last]  # the line is kept; the section follows it after one blank line
        assert last + "\n\n" + START_MARKER in spliced
    else:
        assert removed == [], f"{name}: lines changed: {removed!r}"
    # Keys of existing front matter keep their values and order; `maxact` is added or kept in place.
    if original.lstrip("\ufeff").startswith("---") and name != "old_section.md":
        before = _front_matter(original)
        assert list(data) == [*before, SUMMARY_KEY]
        assert {k: v for k, v in data.items() if k != SUMMARY_KEY} == before
    if name == "old_section.md":
        assert list(data) == ["license", SUMMARY_KEY, "tags"]
    # Line endings and the trailing newline are those of the original.
    if "\r\n" in original:
        assert spliced.count("\n") == spliced.count("\r\n")
    else:
        assert "\r" not in spliced
    if original.strip():
        assert spliced.endswith("\n") == original.endswith("\n")


@pytest.mark.parametrize("name", [*GOOD_CARDS, None])
def test_render_twice_is_byte_identical(name: str | None) -> None:
    results = load_example()
    once = splice_card(read_card(name) if name else None, results)
    assert splice_card(once, results) == once
    assert splice_card(splice_card(once, with_quant(results)), results) == once


@pytest.mark.parametrize("name", ["big_front_matter.md", "crlf.md", "non_ascii.md", "old_section.md", None])
def test_new_results_change_only_the_section_and_summary(name: str | None) -> None:
    results = load_example()
    first = splice_card(read_card(name) if name else None, results)
    second = splice_card(first, with_new_peak(results))
    assert second != first
    first_parts, second_parts = parse_card(first), parse_card(second)
    assert (
        first_parts.section
        and second_parts.section
        and first_parts.front_matter
        and second_parts.front_matter
    )
    # Outside the section and the front matter, the bytes are identical.
    assert first[: first_parts.front_matter.start] == second[: second_parts.front_matter.start]
    assert (
        first[first_parts.front_matter.end : first_parts.section[0]]
        == (second[second_parts.front_matter.end : second_parts.section[0]])
    )
    assert first[first_parts.section[1] :] == second[second_parts.section[1] :]
    # Inside the front matter only lines of the `maxact:` block changed.
    fm_first = first[first_parts.front_matter.start : first_parts.front_matter.end].splitlines(keepends=True)
    fm_second = second[second_parts.front_matter.start : second_parts.front_matter.end].splitlines(
        keepends=True
    )
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=fm_first, b=fm_second, autojunk=False).get_opcodes():
        if tag != "equal":
            assert all(line.startswith("  global_max_abs:") for line in fm_first[i1:i2] + fm_second[j1:j2])
    assert _front_matter(second)[SUMMARY_KEY]["global_max_abs"] == 52_480.0
    if name == "crlf.md":
        assert second.count("\n") == second.count("\r\n")
    # The section changed where the peak is shown.
    assert "52,480" in (second_parts.section_text or "")


def test_new_card_has_valid_metadata() -> None:
    from huggingface_hub import ModelCard

    text = splice_card(None, load_example())
    card = ModelCard(text, ignore_metadata_errors=False)
    assert card.data.to_dict()["library_name"] == "transformers"
    assert card.data.to_dict()[SUMMARY_KEY]["site"] == "blocks.3.hook_resid_post"
    assert "# example-org/tiny-llama" in text
    assert text.endswith(END_MARKER + "\n")


def test_card_without_front_matter_gets_one_hf_can_read() -> None:
    from huggingface_hub import ModelCard

    text = splice_card(read_card("no_front_matter.md"), load_example())
    assert text.startswith("---\nlibrary_name: transformers\nmaxact:\n")
    # the summary carries the results' own version (the example is a version 2 file, still read)
    assert ModelCard(text).data.to_dict()[SUMMARY_KEY]["schema_version"] == load_example()["schema_version"]


@pytest.mark.parametrize("name", ["big_front_matter.md", "crlf.md", "non_ascii.md", "old_section.md"])
def test_huggingface_hub_reads_the_spliced_metadata(name: str) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard(splice_card(read_card(name), load_example()), ignore_metadata_errors=False)
    assert card.data.to_dict()[SUMMARY_KEY] == card_summary(load_example())
    if name == "big_front_matter.md":
        assert card.data.eval_results is not None and len(card.data.eval_results) == 2


def test_quant_verdicts_go_into_the_summary() -> None:
    text = splice_card(read_card("big_front_matter.md"), with_quant(load_example()))
    summary = _front_matter(text)[SUMMARY_KEY]
    assert summary["quant"]["int8-static-maxabs"] == "FAIL"
    assert summary["quant_recommended"] == "fp8-e4m3-static"
    # The whole front matter still parses as YAML and the model-index is untouched.
    data = _front_matter(text)
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 61.53


def test_flow_style_front_matter_is_refused_not_corrupted() -> None:
    card = "---\n{license: mit, tags: [a]}\n---\n\n# x\n"
    with pytest.raises(CardError) as info:
        splice_card(card, load_example())
    assert info.value.problem is CardProblem.unreadable_front_matter
    assert "block-style" in info.value.line()


# --- CLI -------------------------------------------------------------------------------------------
runner = CliRunner()


def _write_results(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def test_cli_render_prints_the_section() -> None:
    result = runner.invoke(app, ["render", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == render_section(load_example())


def test_cli_render_out_file(tmp_path: Path) -> None:
    out = tmp_path / "section.md"
    chart = tmp_path / "maxact" / "profile.svg"
    result = runner.invoke(app, ["render", str(EXAMPLE), "--out", str(out), "--chart-out", str(chart)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == render_section(load_example())
    assert chart.read_text(encoding="utf-8").startswith("<?xml")


@pytest.mark.parametrize("name", ["crlf.md", "big_front_matter.md", "non_ascii.md"])
def test_cli_render_splices_card_and_writes_chart(tmp_path: Path, name: str) -> None:
    results_file = _write_results(tmp_path / "maxact" / "results.json", load_example())
    card = tmp_path / "README.md"
    card.write_bytes((CARDS / name).read_bytes())
    result = runner.invoke(app, ["render", str(results_file), "--card", str(card)])
    assert result.exit_code == 0, result.output
    assert card.read_bytes().decode("utf-8") == splice_card(read_card(name), load_example())
    assert (tmp_path / "maxact" / "profile.svg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "maxact"]  # no temp files left
    again = runner.invoke(app, ["render", str(results_file), "--card", str(tmp_path)])  # a folder works too
    assert again.exit_code == 0
    assert card.read_bytes().decode("utf-8") == splice_card(read_card(name), load_example())


def test_cli_render_creates_a_missing_card(tmp_path: Path) -> None:
    results_file = _write_results(tmp_path / "maxact" / "results.json", load_example())
    result = runner.invoke(app, ["render", str(results_file), "--card", str(tmp_path / "README.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == splice_card(None, load_example())


def test_cli_render_to_other_out_keeps_the_card(tmp_path: Path) -> None:
    results_file = _write_results(tmp_path / "maxact" / "results.json", load_example())
    card = tmp_path / "README.md"
    card.write_bytes((CARDS / "non_ascii.md").read_bytes())
    out = tmp_path / "new" / "README.md"
    result = runner.invoke(app, ["render", str(results_file), "--card", str(card), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert card.read_bytes() == (CARDS / "non_ascii.md").read_bytes()
    assert (tmp_path / "new" / "maxact" / "profile.svg").exists()
    # The results are outside the new card's folder: they are copied where the card links them.
    assert "maxact/results.json" in out.read_text(encoding="utf-8")
    copied = tmp_path / "new" / "maxact" / "results.json"
    assert copied.read_bytes() == results_file.read_bytes()
    assert f"results copied to {copied}" in result.stderr
    validated = runner.invoke(app, ["validate", str(out)])
    assert validated.exit_code == 0, validated.stdout


@pytest.mark.parametrize("name", sorted(BAD_CARDS))
def test_cli_render_refuses_bad_cards_and_leaves_them_untouched(tmp_path: Path, name: str) -> None:
    results_file = _write_results(tmp_path / "maxact" / "results.json", load_example())
    card = tmp_path / "README.md"
    original = (CARDS / name).read_bytes()
    card.write_bytes(original)
    before = card.stat().st_mtime_ns
    result = runner.invoke(app, ["render", str(results_file), "--card", str(card)])
    assert result.exit_code == 2
    assert BAD_CARDS[name].value in result.stderr
    assert card.read_bytes() == original and card.stat().st_mtime_ns == before
    assert not (tmp_path / "maxact" / "profile.svg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "maxact"]


def test_cli_render_schema_invalid_results_exit_2(tmp_path: Path) -> None:
    results = load_example()
    results["global"]["max_abs"] = "big"
    results["run"]["samples"] = 0
    bad = _write_results(tmp_path / "bad.json", results)
    card = tmp_path / "README.md"
    card.write_bytes((CARDS / "crlf.md").read_bytes())
    result = runner.invoke(app, ["render", str(bad), "--card", str(card)])
    assert result.exit_code == 2
    assert re.search(r"bad\.json::\$\.\S+: ", result.stderr), result.stderr
    assert "1 other error" in result.stderr
    assert card.read_bytes() == (CARDS / "crlf.md").read_bytes()


def test_cli_render_missing_or_broken_results_exit_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["render", str(tmp_path / "nope.json")]).exit_code == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    result = runner.invoke(app, ["render", str(broken)])
    assert result.exit_code == 2 and "not valid JSON" in result.stderr


def test_summary_yaml_is_only_the_maxact_block() -> None:
    text = splice_card(read_card("big_front_matter.md"), load_example())
    fm = text.split("---\n")[1]
    # The hand-written parts keep their comments, quoting and flow style.
    assert "  - llama   # trained in-house\n" in fm
    assert 'datasets: [HuggingFaceFW/fineweb-edu, "allenai/c4"]\n' in fm
    assert fm.endswith(
        f"maxact:\n  schema_version: {load_example()['schema_version']}\n  results: maxact/results.json\n"
        "  chart: maxact/profile.svg\n"
        "  global_max_abs: 36011.5\n  site: blocks.3.hook_resid_post\n  component: residual\n"
        "  layer: 3\n  massive_layers: [1, 2, 3]\n"
    )
    assert yaml.safe_load(fm)["extra_gated_prompt"].startswith("You agree")


@pytest.mark.parametrize(
    "front_matter",
    [
        "license: mit\nmaxact: {schema_version: 0}\n# a comment at column 0\ntags:\n- a\n",
        "license: mit\nmaxact:\n  old: 1\n\n  older:\n  - 2\n  - 3\n\ntags:\n- a\n",
        "maxact:\n- a list, once\ntags:\n- a\n",
        "license: mit\n\n",
        "",
    ],
)
def test_summary_block_replaced_in_place(front_matter: str) -> None:
    card = f"---\n{front_matter}---\n\n# x\n"
    spliced = splice_card(card, load_example())
    data = _front_matter(spliced)
    assert data[SUMMARY_KEY] == card_summary(load_example())
    before = yaml.safe_load(front_matter) or {}
    assert list(data) == list(before) + ([] if SUMMARY_KEY in before else [SUMMARY_KEY])
    kept = [line for line in front_matter.splitlines() if not line.startswith(("maxact", " ", "-"))]
    new_fm = spliced.split("---\n")[1]
    assert all(line in new_fm.splitlines() for line in kept)
    assert splice_card(spliced, load_example()) == spliced
