"""The "Maximum activations" model-card section: render it, splice it into a card, validate a card.

The section lives between two marker lines, `<!-- maxact-card:start -->` and
`<!-- maxact-card:end -->`. Splicing replaces only what lies between them (inclusive) and the
`maxact:` key of the YAML front matter; every other byte of the card (front matter key order and
formatting, other sections, CRLF or LF, the trailing newline, non-ASCII text) is kept. A card
without a section gets it appended at the end, after one blank line: the end is the one place that
never splits someone else's section, and the reader finds the measurement after the author's prose.

The core never prints or exits: it returns values or raises `UsageError` (exit 2) subclasses.
"""

from __future__ import annotations

import enum
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jinja2
import yaml

from maxact_card import fmt
from maxact_card.card.chart import render_chart
from maxact_card.documents import (
    COMPONENTS,
    RESULTS_SCHEMA,
    atomic_write,
    parse_json,
    schema_error,
    sha256_file,
)
from maxact_card.errors import SchemaError, UsageError
from maxact_card.resources import template_text

START_MARKER = "<!-- maxact-card:start -->"
END_MARKER = "<!-- maxact-card:end -->"
SUMMARY_KEY = "maxact"
CARD_FILE = "README.md"
DEFAULT_CHART_PATH = "maxact/profile.svg"
DEFAULT_RESULTS_PATH = "maxact/results.json"
SECTION_TEMPLATE = "section.md.j2"
INT8_QMAX = 127
QUANTILE_REL_ERROR = 0.02  # the results' quantiles are read from a log histogram, within 2%
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")

COMPONENT_LABELS = {
    "embedding": "Embedding",
    "residual": "Residual stream",
    "attention": "Attention output",
    "mlp": "MLP output",
    "gate": "Gate pre-activation",
    "down_proj_input": "down_proj input",
    "router": "Router logits",
    "final_norm": "Final norm",
}


# --- errors ---------------------------------------------------------------------------------------
class CardProblem(str, enum.Enum):
    """What is wrong with a card that cannot be spliced or validated (each is exit 2)."""

    broken_markers = "broken markers"
    duplicate_sections = "duplicate sections"
    unreadable_front_matter = "unreadable front matter"
    unreadable_card = "unreadable card"


class CardError(UsageError):
    """A card that cannot be parsed; `problem` names what is wrong."""

    def __init__(self, problem: CardProblem, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{problem.value}: {message}", hint=hint)
        self.problem = problem


# --- Markdown helpers -----------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#!])")


def md_text(text: str) -> str:
    """Free text (a device name, a category) as Markdown that renders literally, also in a table cell:
    on one line (`fmt.one_line`), every character Markdown or HTML would read escaped."""
    return _MD_SPECIAL.sub(r"\\\1", fmt.one_line(text).replace("&", "&amp;"))


def md_code(text: str, *, in_table: bool = True) -> str:
    """A code span that shows `text` exactly; pipes are escaped so the span can sit in a table cell."""
    text = fmt.one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def md_token(location: Mapping[str, Any], *, in_table: bool = True) -> str:
    """A measured token as a quoted code span (leading spaces and control characters visible; the
    vocabulary's spelling where the text alone is unreadable) and its id: `fmt.token_parts`."""
    quoted, note = fmt.token_parts(location)
    return f"{md_code(quoted, in_table=in_table)} ({md_text(note)})"


def md_sample(peak: Mapping[str, Any]) -> str:
    """The peak's sample: its id, and where the results carry it, its category and the text around
    the peak (`global.context`), all as literal Markdown."""
    text = md_code(peak["location"]["sample_id"], in_table=False)
    context = peak.get("context")
    if isinstance(context, Mapping):
        text += f" ({md_text(context['category'])}: {md_code(context['excerpt'], in_table=False)})"
    return text


# --- results --------------------------------------------------------------------------------------
def check_results(results: Any, *, source: str = "results") -> None:
    """Raise SchemaError `source::$.json.path: message` (best match first, then how many others)."""
    found = schema_error(results, RESULTS_SCHEMA)
    if found is None:
        return
    where, rest = found
    more = f" ({rest} other error{'s' if rest != 1 else ''})" if rest else ""
    raise SchemaError(
        f"{source}::{where}{more}",
        hint="re-run `maxact-card measure` to write a valid results file",
    )


def parse_results(data: bytes, *, source: str) -> dict[str, Any]:
    """Decode, parse and validate a results file's bytes; bad input raises UsageError/SchemaError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"{source} is not UTF-8 text", hint="pass the JSON file `maxact-card measure` wrote"
        ) from None
    doc = parse_json(text, source=source)
    check_results(doc, source=source)
    return doc


def read_results(path: Path) -> dict[str, Any]:
    """Read and validate a results file from disk."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"results file {path} does not exist", hint="pass the file `maxact-card measure --out` wrote"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read results file {path}: {exc.strerror}") from None
    return parse_results(data, source=str(path))


# --- the section --------------------------------------------------------------------------------
def _site_index(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {site["name"]: site for site in results.get("sites", [])}


def _where(component: str, layer: int | None, moe: bool) -> str:
    at = f" of layer {layer}" if layer is not None else ""
    return {
        "embedding": "the token embeddings",
        "residual": f"the residual stream after layer {layer}"
        if layer is not None
        else "the residual stream",
        "attention": f"the attention output{at}",
        "mlp": f"the {'MoE' if moe else 'MLP'} output{at}",
        "gate": f"the gate pre-activation{at}",
        "down_proj_input": f"the input of down_proj{at}",
        "router": f"the router logits{at}",
        "final_norm": "the output of the final norm",
    }.get(component, f"{component}{at}")


def _label(component: str, moe: bool) -> str:
    if component == "mlp" and moe:
        return "MoE output"
    return COMPONENT_LABELS.get(component, component)


def _percentile_name(key: str) -> str:
    digits = key.removeprefix("q0.")
    whole, rest = digits[:2], digits[2:]
    return f"{whole}.{rest}th" if rest else f"{whole}th"


def _quantizer_sentences(results: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Two sentences on what the peak means for a static per-tensor INT8 scale, from the numbers."""
    glob = results["global"]
    peak = float(glob["max_abs"])
    site_name = glob["site"]
    massive_layers = results.get("massive", {}).get("layers", [])
    if peak <= 0:
        return [
            (f"Every measured activation is zero, so no quantization scale can be derived from "
             f"{md_code(site_name, in_table=False)}."),
            "Check that the model and corpus produced real forward passes.",
        ]
    step = peak / INT8_QMAX
    half = step / 2
    scale = (
        f"Quantized to INT8 with a static per-tensor scale set by this peak, {md_code(site_name, in_table=False)} "
        "gets a step of "
        f"{fmt.number(peak)} / {INT8_QMAX} = {fmt.number(step)}"
    )
    site = sites.get(site_name)
    if site is None:
        return [
            f"{scale}, so every activation below half a step ({fmt.number(half)}) in magnitude rounds to zero.",
            "Sites with a peak far above their typical values need finer scales or 16-bit activations.",
        ]
    median = float(site["quantiles"]["median"])
    steps = median / step
    # Quantiles come from a log histogram (within 2% of the true value): claim "rounds to zero" only
    # when that holds with the error included.
    if median * (1 + QUANTILE_REL_ERROR) < half:
        below = [
            key
            for key in ("q0.9999", "q0.999", "q0.99")
            if float(site["quantiles"][key]) * (1 + QUANTILE_REL_ERROR) < half
        ]
        tail = ""
        if below:
            key = below[0]
            tail = (
                f", as do at least {_percentile_name(key).removesuffix('th')}% of its activations "
                f"({_percentile_name(key)} percentile |a| = {fmt.number(site['quantiles'][key])}, "
                f"below half a step)"
            )
        first = (
            f"{scale}, so its median |a| ({fmt.number(median)}) is {fmt.number(steps, sig=2)} of a step "
            f"and rounds to zero{tail}."
        )
        where = (
            f", above all in layer{'s' if len(massive_layers) > 1 else ''} {fmt.layer_ranges(massive_layers)}, "
            "which meet the massive-activation criterion"
            if massive_layers
            else ""
        )
        second = (
            "Keeping that information needs finer scales (per token or per channel), outlier handling "
            f"such as SmoothQuant-style smoothing or clipping, or 16-bit activations{where}."
        )
        return [first, second]
    first = (
        f"{scale}, so its median |a| ({fmt.number(median)}) lies {fmt.number(steps, sig=3)} steps from zero."
    )
    second = (
        f"Rounding moves an activation by at most half a step ({fmt.number(half)}), "
        f"{fmt.number(50.0 / steps, sig=2)}% of the median; "
        + (
            "the held-out check below measures what that costs."
            if results.get("quant")
            else "measure the held-out error (`maxact-card measure --quant`) before relying on it."
        )
    )
    return [first, second]


def _component_rows(
    results: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]], moe: bool
) -> list[dict]:
    components = results.get("components", {})
    order = [c for c in COMPONENTS if c in components] + sorted(set(components) - set(COMPONENTS))
    rows = []
    for name in order:
        entry = components[name]
        site = sites.get(entry["site"])
        median = float(site["quantiles"]["median"]) if site else 0.0
        loc = entry["location"]
        rows.append(
            {
                "label": _label(name, moe),
                "max_abs": fmt.number(entry["max_abs"]),
                "site": md_code(entry["site"]),
                "layer": "–" if entry["layer"] is None else str(entry["layer"]),
                "channel": str(loc["channel"]),
                "token": md_token(loc),
                "ratio": fmt.ratio(float(entry["max_abs"]) / median) if median > 0 else "n/a",
            }
        )
    return rows


def _layer_table(results: Mapping[str, Any], moe: bool) -> dict[str, Any]:
    layers = sorted(results.get("layers", []), key=lambda row: row["layer"])
    present = {c for row in layers for c in row["max_abs"]}
    columns = [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))
    glob = results["global"]
    rows = []
    for row in layers:
        cells = []
        for component in columns:
            value = row["max_abs"].get(component)
            text = "–" if value is None else fmt.number(value)
            if row["layer"] == glob.get("layer") and component == glob.get("component") and value is not None:
                text = f"**{text}**"
            cells.append(text)
        ratio = row.get("massive_max_ratio")
        rows.append(
            {
                "layer": str(row["layer"]),
                "cells": cells,
                "massive_tokens": fmt.count(row["massive_tokens"]),
                "max_ratio": "–" if ratio is None else fmt.ratio(ratio),
            }
        )
    return {"headers": [_label(c, moe) for c in columns], "rows": rows}


def _quant_view(quant: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not quant:
        return None
    policies = quant.get("policies", {}) or {}
    peak = quant.get("peak_site")
    peak = peak if isinstance(peak, Mapping) else {}
    peak_policies = peak.get("policies") or {}
    rows = []
    for name, policy in policies.items():
        verdict = str(policy.get("verdict", "?"))
        rows.append(
            {
                "policy": md_code(name),
                # Plain words, not emoji: emoji fonts are missing in some viewers and the word is what counts.
                "verdict": {"PASS": "PASS", "FAIL": "**FAIL**"}.get(verdict, md_text(verdict)),
                "worst_site": md_code(policy["worst_site"]) if policy.get("worst_site") else "–",
                "worst_sqnr": fmt.db(policy.get("worst_sqnr_db")),
                "token_p05": fmt.db(policy.get("worst_token_sqnr_p05_db")),
                "failing_sites": fmt.count(policy.get("failing_sites", 0)),
                "peak_sqnr": fmt.db((peak_policies.get(name) or {}).get("sqnr_db"))
                if peak_policies
                else None,
            }
        )
    thresholds = quant.get("thresholds") or {}
    threshold_text = ", ".join(
        f"{md_code(key, in_table=False)} = "
        + (
            fmt.number(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else md_text(value)
        )
        for key, value in thresholds.items()
    )
    recommended = quant.get("recommended")
    any_pass = any(str(p.get("verdict")) == "PASS" for p in policies.values())
    return {
        "rows": rows,
        "peak_site": md_code(peak["site"], in_table=False) if peak_policies and peak.get("site") else None,
        "recommended": md_code(recommended, in_table=False) if recommended else None,
        "none_passed": not any_pass,
        "thresholds": threshold_text,
    }


def _run_view(results: Mapping[str, Any], results_path: str) -> dict[str, Any]:
    model, run, corpus = results["model"], results["run"], results["corpus"]
    versions = run.get("versions", {})
    named = [("torch", "torch"), ("transformers", "transformers"), ("huggingface_hub", "huggingface_hub")]
    version_text = ", ".join(f"{label} {md_text(versions[key])}" for key, label in named if key in versions)
    if "python" in versions:
        version_text += f", Python {md_text(versions['python'])}"
    extra = sorted(set(versions) - {"maxact_card", "torch", "transformers", "huggingface_hub", "python"})
    for key in extra:
        version_text += f", {md_text(key)} {md_text(versions[key])}"
    categories = ", ".join(f"{md_text(k)} {fmt.count(v)}" for k, v in corpus.get("categories", {}).items())
    weights = model.get("weight_files", [])
    if len(weights) <= 4:
        weight_text = ", ".join(
            f"{md_code(w['path'], in_table=False)} (sha256 `{w['sha256'][:12]}…`)" for w in weights
        )
    else:
        total = sum(int(w["size"]) for w in weights)
        weight_text = f"{len(weights)} files, {fmt.count(total)} bytes (sha256 of each in the results file)"
    device = md_text(run["device"])
    if run.get("device_type") and run["device_type"] not in run["device"]:
        device += f" ({md_text(run['device_type'])})"
    world = run.get("world_size") or 1
    if world > 1:
        device += f", {world} processes"
    commit = model.get("commit_sha")
    revision = model.get("revision")
    at = ""
    if commit:
        at = f" at commit `{commit[:12]}`"
    elif revision:
        at = f" at revision {md_code(revision, in_table=False)}"
    started = str(run.get("started_at", ""))[:10]
    return {
        "tool_version": md_text(results["tool"]["version"]),
        "model_id": md_code(model["id"], in_table=False),
        "model_at": at,
        "architecture": md_text(model["architecture"]),
        "num_layers": fmt.count(model["num_layers"]),
        "hidden_size": fmt.count(model["hidden_size"]),
        "corpus_id": md_code(corpus["id"], in_table=False),
        "corpus_sha": corpus["sha256"][:12],
        "categories": categories,
        "samples": fmt.count(run["samples"]),
        "tokens": fmt.count(run["tokens"]),
        "max_seq_len": fmt.count(run["max_seq_len"]),
        "dtype": md_text(run["dtype"]),
        "device": device,
        "seed": str(run["seed"]),
        "date": md_text(started),
        "versions": version_text,
        "weights": weight_text,
        "results_path": results_path,
        "results_link": _link_target(results_path),
        "notes": [md_text(note) for note in model.get("notes", [])],
    }


def _link_target(path: str) -> str:
    """A relative link target: spaces and parentheses would end a Markdown link early."""
    return path.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def section_context(results: Mapping[str, Any], *, chart_path: str, results_path: str) -> dict[str, Any]:
    """Everything the template shows, already formatted: the template only lays it out."""
    sites = _site_index(results)
    moe = "router" in results.get("components", {})
    glob = results["global"]
    loc = glob["location"]
    value = float(glob["value"])
    boot = glob["bootstrap"]
    massive = results["massive"]
    return {
        "start_marker": START_MARKER,
        "end_marker": END_MARKER,
        "results_path": results_path,
        "model_id": md_code(results["model"]["id"], in_table=False),
        "peak": {
            "max_abs": fmt.number(glob["max_abs"]),
            "negative": value < 0,
            "value": fmt.number(value),
            "where": _where(glob["component"], glob["layer"], moe),
            "site": md_code(glob["site"], in_table=False),
            "module": md_code(glob["module"], in_table=False),
            "channel": str(loc["channel"]),
            "token": md_token(loc, in_table=False),
            "position": str(loc["position"]),
            "first_token": loc["position"] == 0,
            "sample_id": md_sample(glob),
        },
        "meaning": _quantizer_sentences(results, sites),
        "bootstrap": {
            "median": fmt.number(boot["median"]),
            "p05": fmt.number(boot["p05"]),
            "p95": fmt.number(boot["p95"]),
            "resamples": fmt.count(boot["resamples"]),
            "samples": fmt.count(results["run"]["samples"]),
        },
        "components": _component_rows(results, sites, moe),
        "massive": {
            "abs_threshold": fmt.number(massive["abs_threshold"]),
            "ratio_threshold": fmt.ratio(massive["ratio_threshold"]),
            "layers": fmt.layer_ranges(massive["layers"]),
            "count": len(massive["layers"]),
            "tokens": fmt.count(massive["tokens"]),
            "max_ratio": None if massive.get("max_ratio") is None else fmt.ratio(massive["max_ratio"]),
        },
        "quant": _quant_view(results.get("quant")),
        "chart_path": _link_target(chart_path),
        "layer_table": _layer_table(results, moe),
        "num_layers": len(results.get("layers", [])),
        "run": _run_view(results, results_path),
        "missing": [
            {"site": md_code(m["site"], in_table=False), "reason": md_text(m["reason"])}
            for m in results.get("missing_sites", [])
        ],
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: values are escaped for Markdown before they get here
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_section(
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
) -> str:
    """The "## Maximum activations" section, markers included, LF line endings, one trailing newline."""
    template = _environment().from_string(template_text(SECTION_TEMPLATE))
    text = template.render(**section_context(results, chart_path=chart_path, results_path=results_path))
    # Collapse accidental runs of blank lines and trailing spaces so the output never depends on
    # template whitespace details.
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    tidy: list[str] = []
    for line in lines:
        if line == "" and tidy and tidy[-1] == "":
            continue
        tidy.append(line)
    return "\n".join(tidy) + "\n"


# --- front-matter summary --------------------------------------------------------------------------
def card_summary(
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
) -> dict[str, Any]:
    """The machine-readable summary kept under `maxact:` in the card's front matter."""
    glob = results["global"]
    summary: dict[str, Any] = {
        "schema_version": results["schema_version"],
        "results": results_path,
        "chart": chart_path,
        "global_max_abs": glob["max_abs"],
        "site": glob["site"],
        "component": glob["component"],
        "layer": glob["layer"],
        "massive_layers": list(results["massive"]["layers"]),
    }
    quant = results.get("quant")
    if quant:
        summary["quant"] = {name: p.get("verdict") for name, p in (quant.get("policies") or {}).items()}
        summary["quant_recommended"] = quant.get("recommended")
    return summary


def _summary_yaml(summary: Mapping[str, Any]) -> str:
    """The `maxact:` block alone, LF endings. Only this block is dumped; the rest of the YAML is never touched."""
    return yaml.safe_dump(
        {SUMMARY_KEY: dict(summary)},
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
        width=4096,
    )


# --- parsing a card -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontMatter:
    """The YAML block: `text[start:end]` is its content (between the `---` lines)."""

    start: int
    end: int
    data: dict[str, Any]


@dataclass(frozen=True)
class CardParts:
    """A parsed card: where the front matter and the section are, and the line ending it uses."""

    text: str
    eol: str
    bom: str
    front_matter: FrontMatter | None
    body_start: int
    section: tuple[int, int] | None  # start of the start-marker line, end of the end-marker line (no EOL)
    section_lines: tuple[int, int] | None  # 1-based line numbers of the two markers

    @property
    def section_text(self) -> str | None:
        """The section as it stands in the card, markers included."""
        return None if self.section is None else self.text[self.section[0] : self.section[1]]


_FM_OPEN = re.compile(r"\A(\ufeff?)([ \t\r\n]*---[ \t]*(?:\r\n|\n))")
_FM_CLOSE = re.compile(r"^---[ \t]*(?:\r\n|\n|\Z)", re.MULTILINE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _line_no(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _detect_eol(text: str) -> str:
    index = text.find("\n")
    return "\r\n" if index > 0 and text[index - 1] == "\r" else "\n"


class _FrontMatterLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing aliases: a few lines of `&a [*b, *b, ...]` expand to gigabytes
    (a billion laughs), and model-card metadata never needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) repeats another value; write the value out instead",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _parse_front_matter(text: str) -> tuple[str, FrontMatter | None, int]:
    opening = _FM_OPEN.match(text)
    if opening is None:
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        return bom, None, len(bom)
    start = opening.end()
    closing = _FM_CLOSE.search(text, start)
    if closing is None:
        raise CardError(
            CardProblem.unreadable_front_matter,
            "the front matter opened by `---` on line 1 is never closed",
            hint="add a line `---` after the YAML metadata",
        )
    yaml_text = text[start : closing.start()]
    try:
        data = yaml.load(yaml_text, Loader=_FrontMatterLoader)
    except RecursionError:
        raise CardError(CardProblem.unreadable_front_matter, "the YAML front matter is nested too deeply",
                        hint="model-card metadata is a few levels of `key: value`") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + _line_no(text, start)})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the YAML front matter does not parse{where}: {problem}",
            hint="fix the YAML between the `---` lines",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the YAML front matter is a {type(data).__name__}, not a mapping of keys",
            hint="model-card metadata must be `key: value` lines",
        )
    return opening.group(1), FrontMatter(start=start, end=closing.start(), data=data), closing.end()


def _find_markers(text: str, body_start: int) -> list[tuple[str, int, int]]:
    """(kind, line start offset, line end offset without EOL) of every marker line outside code fences."""
    found: list[tuple[str, int, int]] = []
    fence: str | None = None
    offset = body_start
    for line in text[body_start:].splitlines(keepends=True):
        content = line.rstrip("\r\n")
        fence_match = _FENCE.match(content)
        if fence_match:
            mark = fence_match.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence) and content.strip() == mark:
                fence = None
        elif fence is None and len(content) - len(content.lstrip(" ")) <= 3:
            stripped = content.strip()
            if stripped == START_MARKER:
                found.append(("start", offset, offset + len(content)))
            elif stripped == END_MARKER:
                found.append(("end", offset, offset + len(content)))
        offset += len(line)
    return found


def parse_card(card_text: str) -> CardParts:
    """Locate the front matter and the maxact section of a card.

    Raises CardError (a UsageError, exit 2) naming the problem: broken markers (a start without
    an end, an end before any start), duplicate sections, or unreadable front matter.
    """
    bom, front_matter, body_start = _parse_front_matter(card_text)
    markers = _find_markers(card_text, body_start)
    pairs: list[tuple[int, int, int, int]] = []
    open_start: tuple[int, int] | None = None
    for kind, line_start, line_end in markers:
        line = _line_no(card_text, line_start)
        if kind == "start":
            if open_start is not None:
                raise CardError(
                    CardProblem.broken_markers,
                    f"the start marker on line {_line_no(card_text, open_start[0])} has no end marker "
                    f"before the next start marker on line {line}",
                    hint=f"restore `{END_MARKER}` after the section, or delete the partial section, then re-render",
                )
            open_start = (line_start, line_end)
        else:
            if open_start is None:
                raise CardError(
                    CardProblem.broken_markers,
                    f"the end marker on line {line} comes before any start marker",
                    hint=f"restore `{START_MARKER}` before the section, or delete the stray marker, then re-render",
                )
            pairs.append((open_start[0], line_end, _line_no(card_text, open_start[0]), line))
            open_start = None
    if open_start is not None:
        raise CardError(
            CardProblem.broken_markers,
            f"the start marker on line {_line_no(card_text, open_start[0])} has no end marker",
            hint=f"restore `{END_MARKER}` after the section, or delete the partial section, then re-render",
        )
    if len(pairs) > 1:
        where = ", ".join(f"lines {a}–{b}" for _, _, a, b in pairs)
        raise CardError(
            CardProblem.duplicate_sections,
            f"the card has {len(pairs)} maxact sections ({where})",
            hint="delete all but one of them (markers included), then re-render",
        )
    section = (pairs[0][0], pairs[0][1]) if pairs else None
    section_lines = (pairs[0][2], pairs[0][3]) if pairs else None
    return CardParts(
        text=card_text,
        eol=_detect_eol(card_text),
        bom=bom,
        front_matter=front_matter,
        body_start=body_start,
        section=section,
        section_lines=section_lines,
    )


# --- splicing -------------------------------------------------------------------------------------
_SUMMARY_LINE = re.compile(rf"^{SUMMARY_KEY}[ \t]*:(?:[ \t]|\r?\n|$)")
_CONTINUATION = re.compile(r"^(?:[ \t]|\r?\n|$|-(?:[ \t]|\r?\n|$))")


def _replace_summary(yaml_text: str, block: str) -> str:
    """Replace (or append) the top-level `maxact:` block of a YAML text; every other line is kept."""
    lines = yaml_text.splitlines(keepends=True)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if _SUMMARY_LINE.match(lines[i]):
            j = i + 1
            while j < len(lines) and _CONTINUATION.match(lines[j]):
                j += 1
            while j > i + 1 and lines[j - 1].strip() == "":  # trailing blank lines belong to what follows
                j -= 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    if not spans:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"  # cannot happen for text between `---` lines, but never glue two keys
        return "".join(lines) + block
    # Duplicate top-level keys would be invalid YAML for most readers: keep the first place only.
    for start, end in reversed(spans[1:]):
        del lines[start:end]
    first_start, first_end = spans[0]
    lines[first_start:first_end] = [block]
    return "".join(lines)


def _fresh_front_matter(results: Mapping[str, Any]) -> str:
    """Minimal metadata for a card that has none, written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    source = results.get("model", {}).get("source")
    data = ModelCardData(library_name="transformers") if source in ("hub", "local") else ModelCardData()
    text = data.to_yaml()
    return "" if text.strip() in ("", "{}") else text.rstrip("\n") + "\n"


def _title(results: Mapping[str, Any]) -> str:
    return f"# {md_text(results.get('model', {}).get('id', 'Model card'))}\n"


def splice_card(
    card_text: str | None,
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
) -> str:
    """Put the rendered section and the `maxact:` summary into a card; None (or blank) → a new card.

    Only the section (between the markers) and the `maxact:` front-matter block change; the
    section is appended after one blank line when the card has none. Raises CardError for a card
    that cannot be parsed (broken markers, duplicate sections, unreadable front matter).
    """
    section = render_section(results, chart_path=chart_path, results_path=results_path)
    summary = card_summary(results, chart_path=chart_path, results_path=results_path)
    block = section.rstrip("\n")
    summary_yaml = _summary_yaml(summary)

    if card_text is None or card_text.strip(" \t\r\n\ufeff") == "":
        eol = _detect_eol(card_text or "")
        text = (
            "---\n"
            + _fresh_front_matter(results)
            + summary_yaml
            + "---\n\n"
            + _title(results)
            + "\n"
            + section
        )
        text = text.replace("\n", eol)
        _verify(text, None, block.replace("\n", eol), summary)
        return text

    parts = parse_card(card_text)
    eol = parts.eol
    block_eol = block.replace("\n", eol)
    text = card_text
    if parts.section is not None:
        start, end = parts.section
        text = text[:start] + block_eol + text[end:]
    else:
        if text.endswith(("\n\n", "\r\n\r\n", "\n\r\n")):
            separator = ""
        elif text.endswith("\n"):
            separator = eol
        else:
            separator = eol + eol
        trailing = eol if text.endswith("\n") else ""
        text = text + separator + block_eol + trailing

    summary_block = summary_yaml.replace("\n", eol)
    if parts.front_matter is None:
        fresh = ("---\n" + _fresh_front_matter(results)).replace("\n", eol) + summary_block + "---" + eol
        body = text[len(parts.bom) :]
        # One blank line between the new metadata and the card, unless the card begins with one.
        # A byte-order mark is dropped: before `---` it hides the metadata from huggingface_hub.
        gap = "" if body.startswith(("\n", "\r\n")) else eol
        text = fresh + gap + body
    else:
        fm = parts.front_matter
        text = text[: fm.start] + _replace_summary(text[fm.start : fm.end], summary_block) + text[fm.end :]
    _verify(text, parts, block_eol, summary)
    return text


def _verify(text: str, before: CardParts | None, block: str, summary: Mapping[str, Any]) -> None:
    """Re-parse the spliced card: the section and summary are in place and no other key changed."""
    try:
        after = parse_card(text)
    except CardError as exc:
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"adding the `{SUMMARY_KEY}:` block would break the card ({exc.message})",
            hint="write the front matter as plain block-style `key: value` lines, then re-render",
        ) from None
    if after.section_text != block:
        raise CardError(
            CardProblem.broken_markers,
            "the section did not land between the markers after splicing",
            hint="report this with the card attached",
        )
    data = after.front_matter.data if after.front_matter else {}
    if data.get(SUMMARY_KEY) != dict(summary):
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the front matter could not be edited safely (the `{SUMMARY_KEY}:` key did not read back)",
            hint="write the front matter as plain block-style `key: value` lines, then re-render",
        )
    if before is not None and before.front_matter is not None:
        old = {k: v for k, v in before.front_matter.data.items() if k != SUMMARY_KEY}
        new = {k: v for k, v in data.items() if k != SUMMARY_KEY}
        if old != new:
            raise CardError(
                CardProblem.unreadable_front_matter,
                "the front matter could not be edited safely (another key changed)",
                hint="write the front matter as plain block-style `key: value` lines, then re-render",
            )


# --- files ----------------------------------------------------------------------------------------
def decode_card(data: bytes, *, source: str) -> str:
    """A card's bytes as text; a card that is not UTF-8 is unreadable (exit 2)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(
            CardProblem.unreadable_card,
            f"{source} is not UTF-8 text (byte {exc.start})",
            hint="save the card as UTF-8",
        ) from None


def relative_link(target: Path, base_dir: Path) -> str | None:
    """`target` relative to `base_dir` in POSIX form, or None when it lies outside `base_dir`."""
    try:
        rel = Path(os.path.relpath(Path(target).resolve(), Path(base_dir).resolve()))
    except ValueError:  # another drive on Windows
        return None
    if rel.parts and rel.parts[0] == "..":
        return None
    return rel.as_posix()


# --- validation -----------------------------------------------------------------------------------
class CheckStatus(str, enum.Enum):
    """The outcome of one validation check."""

    passed = "pass"
    failed = "fail"
    skipped = "skip"


@dataclass(frozen=True)
class Check:
    """One validation check: its name, outcome, what was found, and what to do when it failed."""

    name: str
    status: CheckStatus
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "status": self.status.value, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class ValidationReport:
    """All checks of one card; `ok` when none failed."""

    target: str
    card: str
    results: str
    checks: tuple[Check, ...] = field(default_factory=tuple)
    #: the results the card was checked against, when they were valid (not part of `to_dict`)
    results_doc: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not fail a card)."""
        return all(check.status is not CheckStatus.failed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        counts = {status.value: sum(1 for c in self.checks if c.status is status) for status in CheckStatus}
        return {
            "target": self.target,
            "card": self.card,
            "results": self.results,
            "ok": self.ok,
            "counts": counts,
            "checks": [check.to_dict() for check in self.checks],
        }


@dataclass(frozen=True)
class WeightFile:
    """A weight file as the card's repository holds it: size when known, and its sha256 on demand."""

    path: str
    size: int | None
    sha256: Callable[[], str]


class CardSource(Protocol):
    """Where a card and the files beside it come from: a local folder or a Hub repo."""

    label: str
    card_name: str
    render_hint: str

    def read(self, path: str) -> bytes | None:
        """The bytes of `path` (relative to the card's folder), or None when it does not exist."""
        ...

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """The commit the files were read at (None for a local folder) and the weight files."""
        ...


class LocalSource:
    """A card in a local folder, with the weights (if any) beside it."""

    def __init__(self, card_path: Path) -> None:
        self.card_path = Path(card_path)
        self.root = self.card_path.parent
        self.card_name = self.card_path.name
        self.label = str(self.card_path)
        self.render_hint = f"maxact-card render {{results}} --card {self.card_path}"

    def read(self, path: str) -> bytes | None:
        """Read a file beside the card; None when it is missing."""
        try:
            return (self.root / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """Every *.safetensors / *.bin / *.gguf below the card's folder (hidden folders skipped)."""
        files: list[WeightFile] = []
        for current, dirs, names in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.endswith(WEIGHT_SUFFIXES):
                    full = Path(current) / name
                    rel = full.relative_to(self.root).as_posix()
                    files.append(WeightFile(rel, full.stat().st_size, functools.partial(sha256_file, full)))
        return None, files


class HubSource:
    """A card in a Hub repo, read through maxact_card.hub (imported only when used)."""

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.card_name = CARD_FILE
        self.label = f"{repo_id}@{revision}" if revision else repo_id
        self.render_hint = (
            f"maxact-card render {{results}} --card README.md in a checkout of {repo_id}, "
            f"then `maxact-card publish`"
        )

    def read(self, path: str) -> bytes | None:
        """Download one file of the repo; None when it does not exist."""
        from maxact_card import hub

        return hub.read_repo_file(self.repo_id, path, self.revision, self.token)

    def weights(self) -> tuple[str | None, list[WeightFile]]:
        """The repo's commit and the sha256 of its weight files, from the Hub's metadata."""
        from maxact_card import hub

        commit, hashes = hub.repo_weight_state(self.repo_id, self.revision, self.token)
        return commit, [WeightFile(p, None, functools.partial(str, sha)) for p, sha in sorted(hashes.items())]


def _safe_relative(path: Any) -> str | None:
    """A path from the card's own metadata, accepted only if it stays inside the card's folder."""
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or ":" in path:
        return None
    if any(part in ("..", "") for part in path.replace("\\", "/").split("/")):
        return None
    return path


def _first_difference(card: str, expected: str, first_line: int) -> str:
    have, want = card.split("\n"), expected.split("\n")
    for index, (a, b) in enumerate(zip(have, want)):
        if a != b:
            return f"line {first_line + index} reads {_clip(a)!r}, the results give {_clip(b)!r}"
    if len(have) != len(want):
        return f"the section has {len(have)} lines, the results give {len(want)}"
    return "the section differs"


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_weights(results: Mapping[str, Any], source: CardSource) -> Check:
    model = results["model"]
    recorded = {w["path"]: w for w in model.get("weight_files", [])}
    if not recorded:
        return Check("weights", CheckStatus.skipped, "the results record no weight files")
    commit_now, files = source.weights()
    commit_then = model.get("commit_sha")
    actual = {f.path: f for f in files}
    measure_hint = "re-run `maxact-card measure` on the weights this card ships with, then render again"
    if not actual:
        if commit_now and commit_then and commit_now != commit_then:
            return Check(
                "weights",
                CheckStatus.failed,
                f"the results were measured at commit {commit_then[:12]}, the repo is at {commit_now[:12]}",
                measure_hint,
            )
        return Check(
            "weights",
            CheckStatus.skipped,
            f"no weight files beside the card to compare with the {len(recorded)} the results record",
        )
    stale: list[str] = []
    for path, entry in recorded.items():
        found = actual.get(path)
        if found is None:
            stale.append(f"{path} is missing")
        elif found.size is not None and found.size != entry["size"]:
            stale.append(
                f"{path} has {fmt.count(found.size)} bytes, the results measured {fmt.count(entry['size'])}"
            )
        elif found.sha256() != entry["sha256"]:
            stale.append(f"{path} has another sha256 than the one measured ({entry['sha256'][:12]}…)")
    if stale:
        at = (
            f" (measured at commit {commit_then[:12]}, repo now at {commit_now[:12]})"
            if commit_now and commit_then and commit_now != commit_then
            else ""
        )
        return Check("weights", CheckStatus.failed, "stale results: " + "; ".join(stale) + at, measure_hint)
    notes = []
    extra = sorted(set(actual) - set(recorded))
    if extra:
        notes.append(f"also present, not measured: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
    if commit_now and commit_then and commit_now != commit_then:
        notes.append(f"repo moved from {commit_then[:12]} to {commit_now[:12]} without touching the weights")
    message = ("the weight file matches the results' sha256" if len(recorded) == 1 else
               f"all {len(recorded)} weight files match the results' sha256")
    return Check("weights", CheckStatus.passed, message + (f" ({'; '.join(notes)})" if notes else ""))


def validate_card(source: CardSource, *, results_file: tuple[str, bytes] | None = None) -> ValidationReport:
    """Check a card against its results: one section, valid results, section/summary/chart/weights agree.

    `results_file` is (name, bytes) of a results file given explicitly; otherwise the file named in
    the card's `maxact:` summary, or `maxact/results.json` beside the card. Raises CardError (exit 2)
    for an unreadable card, broken markers or duplicate sections; everything else is a check.
    """
    raw = source.read(source.card_name)
    if raw is None:
        raise CardError(
            CardProblem.unreadable_card,
            f"no {source.card_name} at {source.label}",
            hint="pass the model folder, the README.md itself, or a Hub repo id",
        )
    text = decode_card(raw, source=source.label)
    parts = parse_card(text)
    checks: list[Check] = []
    summary_now = parts.front_matter.data.get(SUMMARY_KEY) if parts.front_matter else None
    summary_now = summary_now if isinstance(summary_now, dict) else {}
    results_path = _safe_relative(summary_now.get("results")) or DEFAULT_RESULTS_PATH
    chart_path = _safe_relative(summary_now.get("chart")) or DEFAULT_CHART_PATH
    render_hint = source.render_hint.format(results=results_path)

    if parts.section is None:
        checks.append(
            Check("section", CheckStatus.failed, "the card has no maxact section", f"run `{render_hint}`")
        )
    else:
        first, last = parts.section_lines or (0, 0)
        checks.append(Check("section", CheckStatus.passed, f"one maxact section, lines {first}–{last}"))

    results: dict[str, Any] | None = None
    results_bytes: bytes | None
    if results_file is not None:
        results_name, results_bytes = results_file
    else:
        results_name, results_bytes = results_path, source.read(results_path)
    if results_bytes is None:
        checks.append(
            Check(
                "results",
                CheckStatus.failed,
                f"{results_name} does not exist beside the card",
                "add the results file `maxact-card measure --out` wrote, or pass --results",
            )
        )
    else:
        try:
            results = parse_results(results_bytes, source=results_name)
        except UsageError as exc:
            checks.append(Check("results", CheckStatus.failed, exc.message, exc.hint))
        else:
            checks.append(
                Check(
                    "results",
                    CheckStatus.passed,
                    f"{results_name} is valid (schema version {results['schema_version']})",
                )
            )

    dependent = ("section-text", "front-matter", "weights", "chart")
    if results is None:
        checks.extend(
            Check(name, CheckStatus.skipped, "no valid results to compare with") for name in dependent
        )
        return ValidationReport(source.label, source.card_name, results_name, tuple(checks))

    # The section, byte for byte.
    expected = render_section(results, chart_path=chart_path, results_path=results_path).rstrip("\n")
    if parts.section_text is None:
        checks.append(Check("section-text", CheckStatus.skipped, "no section to compare"))
    else:
        have = parts.section_text.replace("\r\n", "\n")
        if have == expected:
            checks.append(
                Check("section-text", CheckStatus.passed, "the section matches the results byte for byte")
            )
        else:
            first_line = parts.section_lines[0] if parts.section_lines else 1
            checks.append(
                Check(
                    "section-text",
                    CheckStatus.failed,
                    "the section does not match the results: "
                    + _first_difference(have, expected, first_line),
                    f"re-render it (never edit it by hand): `{render_hint}`",
                )
            )

    # The front-matter summary.
    want = card_summary(results, chart_path=chart_path, results_path=results_path)
    if parts.front_matter is None or SUMMARY_KEY not in parts.front_matter.data:
        checks.append(
            Check(
                "front-matter",
                CheckStatus.failed,
                f"the front matter has no `{SUMMARY_KEY}:` summary",
                f"run `{render_hint}`",
            )
        )
    elif parts.front_matter.data[SUMMARY_KEY] != want:
        have_summary = parts.front_matter.data[SUMMARY_KEY]
        have_summary = have_summary if isinstance(have_summary, dict) else {}
        keys = [
            k
            for k in list(want) + [k for k in have_summary if k not in want]
            if have_summary.get(k) != want.get(k)
        ]
        detail = "; ".join(f"{k}: card {have_summary.get(k)!r}, results {want.get(k)!r}" for k in keys[:4])
        checks.append(
            Check(
                "front-matter",
                CheckStatus.failed,
                f"the `{SUMMARY_KEY}:` summary disagrees with the results ({detail})",
                f"re-render it: `{render_hint}`",
            )
        )
    else:
        checks.append(
            Check("front-matter", CheckStatus.passed, f"the `{SUMMARY_KEY}:` summary matches the results")
        )

    checks.append(_check_weights(results, source))

    # The chart.
    chart = source.read(chart_path)
    if chart is None:
        checks.append(
            Check(
                "chart",
                CheckStatus.failed,
                f"{chart_path} does not exist beside the card",
                f"run `{render_hint}` (it writes the chart)",
            )
        )
    elif chart != render_chart(results).encode("utf-8"):
        checks.append(
            Check(
                "chart",
                CheckStatus.failed,
                f"{chart_path} does not match the chart the results give",
                f"re-render it: `{render_hint}`",
            )
        )
    else:
        checks.append(Check("chart", CheckStatus.passed, f"{chart_path} matches the results"))
    return ValidationReport(source.label, source.card_name, results_name, tuple(checks), results)


__all__ = [
    "CARD_FILE",
    "DEFAULT_CHART_PATH",
    "DEFAULT_RESULTS_PATH",
    "END_MARKER",
    "START_MARKER",
    "SUMMARY_KEY",
    "CardError",
    "CardParts",
    "CardProblem",
    "CardSource",
    "Check",
    "CheckStatus",
    "FrontMatter",
    "HubSource",
    "LocalSource",
    "ValidationReport",
    "atomic_write",
    "card_summary",
    "check_results",
    "decode_card",
    "parse_card",
    "parse_results",
    "read_results",
    "relative_link",
    "render_section",
    "section_context",
    "splice_card",
    "validate_card",
]
