"""The per-layer SVG profile: golden file, valid standalone XML, deterministic, edge cases."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from typing import Any

from maxact_card.card.chart import render_chart
from tests import paths
from tests.goldens import assert_golden

HERE = paths.TESTS
EXAMPLE = HERE / "data" / "results_example.json"
GOLDEN = HERE / "golden"
SVG = "{http://www.w3.org/2000/svg}"


def load_example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))




def texts(root: ET.Element) -> list[str]:
    return ["".join(el.itertext()) for el in root.iter(f"{SVG}text")]


def test_chart_golden() -> None:
    assert_golden("profile_example.svg", render_chart(load_example()))


def test_chart_is_deterministic() -> None:
    results = load_example()
    assert render_chart(results) == render_chart(copy.deepcopy(results))


def test_chart_is_valid_standalone_svg() -> None:
    text = render_chart(load_example())
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == f"{SVG}svg"
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    title = root.find(f"{SVG}title")
    assert title is not None and "example-org/tiny-llama" in (title.text or "")
    labels = texts(root)
    assert "Layer" in labels and "max |a| (log scale)" in labels
    # Legend entries for each per-layer component, and the peak marked with its value.
    for name in (
        "Residual stream",
        "Attention output",
        "MLP output",
        "Gate pre-activation",
        "down_proj input",
    ):
        assert name in labels
    assert "peak 36,012 (layer 3, residual)" in labels
    # Decade ticks 10^0 … 10^5 cover 8 … 36,011.5; layer ticks 0 … 3.
    assert [t for t in labels if t.startswith("10")] == [f"10{e}" for e in range(6)]
    assert [t for t in labels if t in {"0", "1", "2", "3"}] == ["0", "1", "2", "3"]
    assert len(root.findall(f".//{SVG}polyline")) == 5


def test_chart_numbers_have_fixed_format() -> None:
    text = render_chart(load_example())
    numbers = re.findall(r'\s(?:x|y|x1|y1|x2|y2|cx|cy|r)="([^"]+)"', text)
    assert numbers and all(re.fullmatch(r"-?\d+\.\d\d", n) for n in numbers)


def test_chart_peak_sits_on_the_highest_point() -> None:
    root = ET.fromstring(render_chart(load_example()).encode("utf-8"))
    peak = next(c for c in root.iter(f"{SVG}circle") if c.get("stroke") == "#C00000")
    residual = root.findall(f".//{SVG}polyline")[0].get("points", "").split()
    assert f"{peak.get('cx')},{peak.get('cy')}" == residual[-1]
    assert min(float(p.split(",")[1]) for p in residual) == float(peak.get("cy", "nan"))


def test_chart_zero_breaks_the_line_and_one_layer_works() -> None:
    results = load_example()
    results["layers"][2]["max_abs"]["attention"] = 0.0
    root = ET.fromstring(render_chart(results).encode("utf-8"))
    attention = root.findall(f".//{SVG}polyline")[1]
    assert len(attention.get("points", "").split()) == 2  # layers 0–1; layer 3 stands alone as a dot

    single = load_example()
    single["layers"] = single["layers"][3:]
    root = ET.fromstring(render_chart(single).encode("utf-8"))
    assert "peak 36,012 (layer 3, residual)" in texts(root)


def test_chart_without_layers_says_so() -> None:
    results = load_example()
    results["layers"] = []
    root = ET.fromstring(render_chart(results).encode("utf-8"))
    assert "no per-layer measurements" in texts(root)
    assert root.find(f"{SVG}title") is not None


def test_chart_many_layers_thins_ticks_and_marks_a_non_layer_peak() -> None:
    results = load_example()
    results["layers"] = [
        {"layer": i, "max_abs": {"residual": 10.0 * (i + 1), "mlp": 1.0 + i}, "massive_tokens": 0}
        for i in range(80)
    ]
    results["global"].update(component="final_norm", layer=None, site="ln_final.hook_normalized")
    root = ET.fromstring(render_chart(results).encode("utf-8"))
    layer_ticks = ["".join(t.itertext()) for t in root.findall(f"{SVG}g[@text-anchor='middle']/{SVG}text")]
    assert 5 <= len(layer_ticks) <= 17 and layer_ticks[-1] == "79"
    assert "largest per-layer value 800 (layer 79, residual)" in texts(root)
    assert not root.findall(f".//{SVG}polyline/../{SVG}circle[@r='2.50']")  # no per-point dots at 80 layers


def test_the_last_layer_tick_is_not_crowded_by_a_step_tick() -> None:
    """30 layers tick every 2; 28 would sit beside 29, the last, and is left out."""
    results = load_example()
    results["layers"] = [
        {"layer": i, "max_abs": {"residual": 10.0 * (i + 1)}, "massive_tokens": 0} for i in range(30)
    ]
    root = ET.fromstring(render_chart(results).encode("utf-8"))
    layer_ticks = ["".join(t.itertext()) for t in root.findall(f"{SVG}g[@text-anchor='middle']/{SVG}text")]
    assert layer_ticks == [str(i) for i in range(0, 27, 2)] + ["29"]


def test_chart_escapes_model_id() -> None:
    results = load_example()
    results["model"]["id"] = "org/<model>&co"
    root = ET.fromstring(render_chart(results).encode("utf-8"))
    assert "org/<model>&co" in (root.find(f"{SVG}title").text or "")  # type: ignore[union-attr]
