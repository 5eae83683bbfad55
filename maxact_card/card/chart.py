"""The per-layer profile chart: max|a| per layer on a log axis, one line per component, the peak marked.

Pure Python, no plotting dependency. The output is a standalone SVG (xmlns, <title>, axis labels,
legend) and deterministic: every coordinate is written with two decimals, so the same results
always give the same bytes.
"""

from __future__ import annotations

import math
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from maxact_card import fmt

#: Plot order and look of each component. Colours are Okabe–Ito (safe for colour-blind readers);
#: dash patterns keep lines apart where two components have the same values.
COMPONENT_STYLE: dict[str, tuple[str, str, str]] = {
    # component: (label, colour, stroke-dasharray or "")
    "residual": ("Residual stream", "#0072B2", ""),
    "attn_input": ("Attention input", "#E69F00", "1 3"),
    "query": ("Queries", "#F0E442", "1 3"),
    "key_cache": ("KV cache: keys", "#F0E442", ""),
    "value_cache": ("KV cache: values", "#F0E442", "7 4"),
    "o_proj_input": ("o_proj input", "#E69F00", "3 2 1 2"),
    "attention": ("Attention output", "#E69F00", "7 4"),
    "mlp_input": ("MLP input", "#009E73", "1 3"),
    "mlp": ("MLP output", "#009E73", ""),
    "gate": ("Gate pre-activation", "#CC79A7", "2 3"),
    "down_proj_input": ("down_proj input", "#D55E00", "9 3 2 3"),
    "router": ("Router logits", "#56B4E9", "4 2"),
    "embedding": ("Embedding", "#999999", "1 2"),
    "final_norm": ("Final norm", "#000000", "1 2"),
}

WIDTH = 760
HEIGHT = 390
LEFT, RIGHT, TOP, BOTTOM = 72.0, 580.0, 48.0, 336.0  # plot area; the legend sits right of RIGHT
FONT = "Helvetica, Arial, sans-serif"


def _f(x: float) -> str:
    """Fixed float formatting: the same number always gives the same characters."""
    text = f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def _text(x: float, y: float, body: str, *, size: int = 12, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size}" text-anchor="{anchor}"{extra}>{body}</text>'


def _power_label(exponent: int) -> str:
    """`10` with the exponent raised, as SVG text content."""
    return f'10<tspan dy="-6" font-size="9">{exponent}</tspan>'


def _plotted_components(layers: list[dict[str, Any]]) -> list[str]:
    present = {name for row in layers for name in row.get("max_abs", {})}
    known = [name for name in COMPONENT_STYLE if name in present]
    return known + sorted(present - set(COMPONENT_STYLE))


def _line_width(index: int, count: int) -> float:
    """3.5 for the first line down to 1.5 for the last, so lines drawn over others leave them visible."""
    return 1.5 + 2.0 * (count - 1 - index) / max(count - 1, 1)


def _x_step(n_layers: int) -> int:
    for step in (1, 2, 4, 5, 10, 20, 25, 50, 100):
        if n_layers / step <= 16:
            return step
    return max(1, n_layers // 16)


def render_chart(results: dict[str, Any]) -> str:
    """The per-layer max|a| profile of `results` as a standalone SVG document (deterministic)."""
    layers = sorted(results.get("layers", []), key=lambda row: row["layer"])
    components = _plotted_components(layers)
    model_id = str(results.get("model", {}).get("id", "model"))
    title = f"max |a| per layer (log scale), {model_id}"

    values = [
        float(row["max_abs"][c]) for row in layers for c in components if float(row["max_abs"].get(c, 0)) > 0
    ]
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="maxact-title maxact-desc" '
            f'font-family={quoteattr(FONT)} fill="#222222">'
        ),
        f'<title id="maxact-title">{escape(title)}</title>',
    ]
    glob = results.get("global", {})
    desc = (
        f"Peak max |a| {fmt.number(glob.get('max_abs'))} at {glob.get('site', '?')}. "
        f"One line per component over {len(layers)} layers."
    )
    out.append(f'<desc id="maxact-desc">{escape(desc)}</desc>')
    # An opaque background keeps the dark text readable on dark-mode pages.
    out.append(f'<rect x="{_f(0)}" y="{_f(0)}" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>')
    out.append(_text(LEFT, 24, escape(title), size=15, extra=' font-weight="bold"'))

    if not layers or not values:
        out.append(
            f'<rect x="{_f(LEFT)}" y="{_f(TOP)}" width="{_f(RIGHT - LEFT)}" '
            f'height="{_f(BOTTOM - TOP)}" fill="none" stroke="#888888"/>'
        )
        out.append(
            _text((LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2, "no per-layer measurements", anchor="middle")
        )
        out.append("</svg>")
        return "\n".join(out) + "\n"

    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo + 1
    first_layer, last_layer = layers[0]["layer"], layers[-1]["layer"]
    span = max(last_layer - first_layer, 1)

    def x_of(layer: int) -> float:
        if last_layer == first_layer:
            return (LEFT + RIGHT) / 2
        return LEFT + 12 + (RIGHT - LEFT - 24) * (layer - first_layer) / span

    def y_of(value: float) -> float:
        return BOTTOM - (BOTTOM - TOP) * (math.log10(value) - lo) / (hi - lo)

    # Grid and y ticks, one per decade (every other decade when the range is wide).
    decade_step = 1 if hi - lo <= 8 else 2
    out.append('<g stroke="#e3e3e3" stroke-width="1">')
    for exponent in range(lo, hi + 1, decade_step):
        y = y_of(10.0**exponent)
        out.append(f'<line x1="{_f(LEFT)}" y1="{_f(y)}" x2="{_f(RIGHT)}" y2="{_f(y)}"/>')
    out.append("</g>")
    out.append('<g font-size="12" text-anchor="end">')
    for exponent in range(lo, hi + 1, decade_step):
        y = y_of(10.0**exponent)
        out.append(f'<text x="{_f(LEFT - 8)}" y="{_f(y + 4)}">{_power_label(exponent)}</text>')
    out.append("</g>")

    # X ticks.
    step = _x_step(span + 1)
    out.append('<g font-size="12" text-anchor="middle">')
    for row in layers:
        layer = row["layer"]
        # every step-th layer, and the last one; a step tick closer to the last than a step would crowd it
        if layer == last_layer or ((layer - first_layer) % step == 0 and last_layer - layer >= step):
            x = x_of(layer)
            out.append(
                f'<line x1="{_f(x)}" y1="{_f(BOTTOM)}" x2="{_f(x)}" y2="{_f(BOTTOM + 5)}" stroke="#888888"/>'
            )
            out.append(f'<text x="{_f(x)}" y="{_f(BOTTOM + 19)}">{layer}</text>')
    out.append("</g>")

    # Axes and their labels.
    out.append(
        f'<path d="M{_f(LEFT)} {_f(TOP)}V{_f(BOTTOM)}H{_f(RIGHT)}" fill="none" stroke="#888888" stroke-width="1"/>'
    )
    out.append(_text((LEFT + RIGHT) / 2, BOTTOM + 40, "Layer", size=13, anchor="middle"))
    mid_y = (TOP + BOTTOM) / 2
    out.append(
        f'<text x="{_f(20)}" y="{_f(mid_y)}" font-size="13" text-anchor="middle" '
        f'transform="rotate(-90 {_f(20)} {_f(mid_y)})">max |a| (log scale)</text>'
    )

    # One line per component; a zero (nothing to draw on a log axis) breaks the line. Earlier lines
    # are drawn wider, so a line hidden under a later one with the same values still shows at its edges.
    markers = len(layers) <= 48
    for index, component in enumerate(components):
        width = _line_width(index, len(components))
        label, colour, dash = COMPONENT_STYLE.get(component, (component, "#555555", "3 3"))
        runs: list[list[tuple[float, float]]] = [[]]
        for row in layers:
            value = float(row["max_abs"].get(component, 0) or 0)
            if value > 0:
                runs[-1].append((x_of(row["layer"]), y_of(value)))
            elif runs[-1]:
                runs.append([])
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<g stroke="{colour}" fill="{colour}">')
        for run in runs:
            if len(run) >= 2:
                points = " ".join(f"{_f(x)},{_f(y)}" for x, y in run)
                out.append(
                    f'<polyline points="{points}" fill="none" stroke-width="{_f(width)}" '
                    f'stroke-linejoin="round"{dash_attr}/>'
                )
            if markers or len(run) == 1:
                for x, y in run:
                    out.append(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(width / 2 + 1)}" stroke="none"/>')
        out.append("</g>")

    # The peak: the global one when it sits on a plotted per-layer site, else the largest plotted point.
    peak_layer, peak_component = glob.get("layer"), glob.get("component")
    peak_row = next((row for row in layers if row["layer"] == peak_layer), None)
    if peak_row is not None and float(peak_row["max_abs"].get(peak_component, 0) or 0) > 0:
        peak_value = float(peak_row["max_abs"][peak_component])
        caption = f"peak {fmt.number(peak_value)} (layer {peak_layer}, {peak_component})"
    else:
        peak_value, peak_layer, peak_component = max(
            (float(row["max_abs"][c]), row["layer"], c)
            for row in layers
            for c in components
            if float(row["max_abs"].get(c, 0) or 0) > 0
        )
        caption = f"largest per-layer value {fmt.number(peak_value)} (layer {peak_layer}, {peak_component})"
    px, py = x_of(peak_layer), y_of(peak_value)
    out.append(
        f'<circle cx="{_f(px)}" cy="{_f(py)}" r="6.00" fill="none" stroke="#C00000" stroke-width="2"/>'
    )
    right_half = px > (LEFT + RIGHT) / 2
    out.append(
        _text(
            px - 10 if right_half else px + 10,
            max(py - 10, TOP - 6),
            escape(caption),
            anchor="end" if right_half else "start",
            extra=' fill="#C00000" font-weight="bold"',
        )
    )

    # Legend, right of the plot.
    out.append('<g font-size="12">')
    lx, ly = RIGHT + 22, TOP + 6
    for index, component in enumerate(components):
        label, colour, dash = COMPONENT_STYLE.get(component, (component, "#555555", "3 3"))
        width = _line_width(index, len(components))
        y = ly + 20 * index
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{_f(lx)}" y1="{_f(y)}" x2="{_f(lx + 28)}" y2="{_f(y)}" stroke="{colour}" '
            f'stroke-width="{_f(width)}"{dash_attr}/>'
        )
        out.append(_text(lx + 36, y + 4, escape(label)))
    y = ly + 20 * len(components) + 4
    out.append(
        f'<circle cx="{_f(lx + 14)}" cy="{_f(y)}" r="6.00" fill="none" stroke="#C00000" stroke-width="2"/>'
    )
    out.append(_text(lx + 36, y + 4, "peak"))
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["COMPONENT_STYLE", "render_chart"]
